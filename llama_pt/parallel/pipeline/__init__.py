"""Pipeline parallelism (Huang et al. 2019, GPipe; Narayanan et al. 2021, Megatron PTD-P, Sec. 2.2), composed
with TP/SP and the DP engines. The model stays plain PyTorch and is cut from outside:

- stages.py     `PipelineStage`: the parts of a Llama one stage runs (embedding, its layers by global index,
                final norm + head), its model chunks (virtual stages), and `build_stage` from a full model
- schedules.py  the order of forward and backward passes on each stage (GPipe, 1F1B, interleaved 1F1B),
                as pure functions, and `run_schedule`, which executes one with point-to-point transfers
- p2p.py        the transfers between stages: asynchronous sends, tagged receives, bytes counted
- forward.py    `PipelineLogits`: the stages as one forward-only model (evaluation), logits on every stage
- timeline.py   what a stage did when (forward, backward, waiting for a peer): idle fraction (the bubble)

Why our own schedules and not torch.distributed.pipelining: docs/parallelism.md, "Pipeline parallelism".
"""
from .forward import PipelineLogits
from .p2p import StageLink
from .schedules import SCHEDULES, Action, run_schedule, schedule_actions
from .stages import PipelineStage, build_stage
from .timeline import StageTimeline, idle_fraction

__all__ = ["Action", "PipelineLogits", "PipelineStage", "SCHEDULES", "StageLink", "StageTimeline", "build_stage", "idle_fraction",
           "run_schedule", "schedule_actions"]
