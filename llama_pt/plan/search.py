"""The layout search: every (TP, PP, V, schedule, DP, ZeRO stage, micro-batch, activation mode) that can run a
model on a cluster, the ones that fit in memory ranked by predicted tokens/s/GPU (docs/planner.md, "Search").

    python -m llama_pt.plan search model=llama2_70b train.seq_len=4096 train.global_batch_tokens=4194304 \\
        gpu=h100 nodes=128 [gpus_per_node=8] [top=10]

The model, sequence length, global batch and precision come from the composed config; the layout is the
config's own parallel.* fields (and train.micro_batch_size, model.activation), set for every combination of:

- TP t: the divisors of the GPUs of a node, with sequence parallelism whenever t > 1 and overlap on;
- PP p: the divisors of W / t;
- schedule and V: without PP 1f1b; with it gpipe, 1f1b, and interleaved_1f1b with V = 2 .. MAX_VIRTUAL chunks;
- ZeRO 0, 1, 2 (the trainer's stages);
- micro-batch b in MICRO_BATCHES, activation mode none, selective or full;

and kept when the run's config resolves for W processes (llama_pt.config.resolve, as train.py resolves it:
the heads, kv heads, SwiGLU width and vocabulary split over t, W divisible by t p, p V at most the layers,
d = W / (t p) dividing the batch and b the per-rank sequences, at least p micro-batches under 1F1B and a
multiple of p interleaved, no ZeRO-2 with PP, no ZeRO with V > 1) and the planner accepts it
(llama_pt.plan.layout.layout_from_config). So the search proposes only layouts the trainer runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..config import ACTIVATION_MODES, ZERO_STAGES, ConfigError
from .hardware import Accelerator
from .layout import Layout, layout_from_config
from .memory import memory_plans
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


def _schedules(p: int) -> Iterator[tuple[str, int]]:
    if p == 1:
        yield "1f1b", 1
        return
    yield "gpipe", 1
    yield "1f1b", 1
    for v in range(2, MAX_VIRTUAL + 1):
        yield "interleaved_1f1b", v


def with_layout(cfg: Mapping[str, Any], tp: int, pp: int, vp: int, schedule: str, zero_stage: int, micro_batch: int,
                activation: str) -> dict[str, Any]:
    """The composed config `cfg` with the layout fields the search sets (the keys a Hydra override would)."""
    parallel = {**(cfg.get("parallel") or {}), "tensor_parallel": tp, "sequence_parallel": tp > 1, "overlap": True,
                "pipeline_parallel": pp, "virtual_stages": vp, "pipeline_schedule": schedule, "zero_stage": zero_stage}
    return {**cfg, "parallel": parallel, "train": {**cfg["train"], "micro_batch_size": micro_batch},
            "model": {**cfg["model"], "activation": activation}}


def candidates(cfg: Mapping[str, Any], world_size: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout of the enumeration (module docstring) that the config layer and the planner accept, fitting
    or not."""
    for t in divisors(gpus_per_node):
        for p in divisors(world_size // t):
            for b in MICRO_BATCHES:
                for schedule, v in _schedules(p):
                    for zero in ZERO_STAGES:
                        for mode in ACTIVATION_MODES:
                            try:
                                yield layout_from_config(with_layout(cfg, t, p, v, schedule, zero, b, mode),
                                                         world_size, gpus_per_node)
                            except ConfigError:
                                continue


def search(cfg: Mapping[str, Any], gpu: Accelerator, world_size: int, gpus_per_node: int) -> list[Ranked]:
    """The layouts of the composed config `cfg`'s model, sequence length, global batch and precision that fit on
    `world_size` GPUs, fastest first (predicted tokens/s/GPU; ties: less memory first)."""
    if not gpu.has_timing:
        raise ValueError(f"the search ranks by step time, which is not modelled for {gpu.name}")
    # the config's model and batch, checked as the trainer would for one process; the layout fields are ours
    base = layout_from_config(with_layout(cfg, 1, 1, 1, "1f1b", 0, 1, cfg["model"].get("activation", "none")), 1, 1)
    if base.peft.method != "none":
        raise ConfigError("the search plans full training (peft.method=none)")
    found = []
    for layout in candidates(cfg, world_size, gpus_per_node):
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
