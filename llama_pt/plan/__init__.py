"""Memory and throughput planner: what a run needs per GPU and how fast it goes, before launching it.

    python -m llama_pt.plan +experiment=llama1_65b parallel=tp8 gpu=a100_80gb nodes=256 [parallel.pipeline_parallel=4]
    python -m llama_pt.plan search model=llama2_70b train.seq_len=4096 gpu=h100 nodes=128

docs/planner.md gives the formulas and where every constant comes from.
"""
from .hardware import GPUS, Accelerator, get_gpu
from .layout import Layout, layout_from_config
from .memory import activation_bytes, local_parameters, memory_plan, state_bytes
from .pipeline import Stage, bubble_fraction, chunk_layers
from .report import Plan, check_fits, format_report, make_plan, plan_layout
from .search import Ranked, search
from .throughput import StepTime, step_time

__all__ = ["Accelerator", "GPUS", "Layout", "Plan", "Ranked", "Stage", "StepTime", "activation_bytes",
           "bubble_fraction", "check_fits", "chunk_layers", "format_report", "get_gpu", "layout_from_config",
           "local_parameters", "make_plan", "memory_plan", "plan_layout", "search", "state_bytes", "step_time"]
