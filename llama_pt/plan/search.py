"""The layout search: every (TP, PP, V, schedule, DP, ZeRO stage, micro-batch, activation mode) that can run a
model on a cluster, the ones that fit in memory ranked by predicted tokens/s/GPU (docs/planner.md, "Search").

    python -m llama_pt.plan search model=llama2_70b train.seq_len=4096 train.global_batch_tokens=4194304 \\
        gpu=h100 nodes=128 [gpus_per_node=8] [top=10]

The model, sequence length, global batch and precision come from the composed config; the layout fields come
from the enumeration:

- TP t: the divisors of the GPUs of a node that the model's heads, kv heads, SwiGLU width and vocabulary split
  over (llama_pt.config.validate_layout), with sequence parallelism whenever t > 1 and overlap on;
- PP p: the divisors of W / t up to the number of layers; then d = W / (t p) must divide the global batch's
  sequences and the micro-batch the per-rank sequences (the trainer's batch split);
- schedule and V: without PP none; with it gpipe, 1f1b, and interleaved_1f1b with V = 2 .. MAX_VIRTUAL chunks
  (p V at most the layers, m a multiple of p: llama_pt.plan.pipeline.validate_pipeline);
- ZeRO 0, 1, 2 (the trainer's stages); with PP only 0 and 1: ZeRO-2 reduce-scatters the gradients of every
  micro-batch, which pipelines interleave (DeepSpeed refuses ZeRO-2/3 with its pipeline engine);
- micro-batch b in MICRO_BATCHES, activation mode none, selective or full.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping

from ..config import ACTIVATION_MODES, ZERO_STAGES, ConfigError, ParallelConfig, validate_layout
from .hardware import Accelerator
from .layout import Layout, layout_from_config
from .memory import memory_plans
from .pipeline import validate_pipeline
from .throughput import StepTime, step_time

MICRO_BATCHES = (1, 2, 4, 8)
MAX_VIRTUAL = 8
GIB = 1024 ** 3


@dataclass(frozen=True)
class Ranked:
    """One layout that fits: its fullest GPU's peak and which pipeline rank that is, and its step time."""
    layout: Layout
    peak: int
    fullest_stage: int
    time: StepTime


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _schedules(p: int, m: int, n_layers: int) -> Iterator[tuple[str, int]]:
    if p == 1:
        yield "1f1b", 1
        return
    yield "gpipe", 1
    yield "1f1b", 1
    for v in range(2, MAX_VIRTUAL + 1):
        try:
            validate_pipeline(p, v, "interleaved_1f1b", m, n_layers)
        except ConfigError:
            continue
        yield "interleaved_1f1b", v


def candidates(base: Layout, world_size: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout of the enumeration (module docstring) that can run, fitting or not."""
    model, seq = base.model, base.seq_len
    sequences = base.global_batch_tokens // seq
    for t in divisors(gpus_per_node):
        try:
            validate_layout(world_size, ParallelConfig(tensor_parallel=t, sequence_parallel=t > 1), model, seq)
        except ConfigError:
            continue
        for p in divisors(world_size // t):
            d = world_size // (t * p)
            if p > model.n_layers or sequences % d:
                continue
            for b in MICRO_BATCHES:
                if (sequences // d) % b:
                    continue
                m = sequences // (d * b)
                for schedule, v in _schedules(p, m, model.n_layers):
                    for zero in (ZERO_STAGES if p == 1 else (0, 1)):
                        for mode in ACTIVATION_MODES:
                            yield replace(base, world_size=world_size, gpus_per_node=gpus_per_node, tp=t,
                                          sp=t > 1, overlap=True, pp=p, vp=v, schedule=schedule, zero_stage=zero,
                                          activation=mode, micro_batch=b)


def search(cfg: Mapping[str, Any], gpu: Accelerator, world_size: int, gpus_per_node: int) -> list[Ranked]:
    """The layouts of the composed config `cfg`'s model, sequence length, global batch and precision that fit on
    `world_size` GPUs, fastest first (predicted tokens/s/GPU; ties: less memory first)."""
    if not gpu.has_timing:
        raise ValueError(f"the search ranks by step time, which is not modelled for {gpu.name}")
    # the config's model and batch, checked as the trainer would for one process; the layout fields are ours
    one = {**cfg, "parallel": {**cfg["parallel"], "tensor_parallel": 1, "sequence_parallel": False},
           "train": {**cfg["train"], "micro_batch_size": 1}}
    base = layout_from_config(one, 1, 1)
    if base.peft.method != "none":
        raise ConfigError("the search plans full training (peft.method=none)")
    found = []
    for layout in candidates(base, world_size, gpus_per_node):
        peaks = [plan.peak for plan in memory_plans(layout, gpu.reserve_bytes)]
        peak = max(peaks)
        if peak <= gpu.memory_bytes:
            found.append(Ranked(layout, peak, peaks.index(peak), step_time(layout, gpu)))
    return sorted(found, key=lambda r: (-r.time.tokens_per_s_per_gpu, r.peak))


def format_table(ranked: list[Ranked], top: int) -> str:
    """The best `top` layouts as a table: the layout, the fullest GPU's peak, the bubble and the speed."""
    head = ("rank", "TP", "PP", "V", "schedule", "DP", "ZeRO", "mbs", "m", "activation", "peak GiB", "bubble",
            "tokens/s/GPU", "MFU")
    rows = [head]
    for i, r in enumerate(ranked[:top], 1):
        lay, tm = r.layout, r.time
        rows.append((str(i), str(lay.tp), str(lay.pp), str(lay.vp), lay.schedule if lay.pp > 1 else "-", str(lay.dp),
                     str(lay.zero_stage), str(lay.micro_batch), str(lay.grad_accum), lay.activation,
                     f"{r.peak / GIB:.1f}", f"{lay.bubble:.1%}", f"{tm.tokens_per_s_per_gpu:,.0f}", f"{tm.mfu:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
