"""Pipeline parallelism in the planner: the stage split, the schedules' bubble and in-flight micro-batches,
and the point-to-point volume (docs/planner.md, "Pipeline parallelism").

Notation: p pipeline stages (parallel.pipeline_parallel), V model chunks per stage (parallel.virtual_stages;
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
arXiv:2104.04473, Sec. 2.2.2), m micro-batches per data-parallel rank per optimizer step.

Process groups (llama_pt.parallel's order): TP innermost, then DP, then PP, so the two ends of a stage
boundary are t d ranks apart, on the same node only when t d is less than the GPUs of a node.
Virtual stage j = c p + r is model chunk c of pipeline rank r (Megatron's interleaved assignment: rank r
holds virtual stages r, r + p, r + 2p, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")   # parallel.pipeline_schedule


def stage_layers(n_layers: int, stages: int, embedding_layers: float = 1.0, head_layers: float = 1.0) -> list[int]:
    """Transformer layers of each of `stages` (virtual) stages, in order.

    The embedding counts as `embedding_layers` layers on the first stage and the head as `head_layers` on the
    last (parallel.pipeline_embedding_layers / pipeline_head_layers). With W = n_layers + embedding_layers +
    head_layers, stage j ends after layer round((j+1) W / stages - embedding_layers) (clamped to [0, n_layers]):
    each stage boundary is within half a layer of where an even split of W puts it, so every stage's load is
    within one layer of W / stages (uneven splits allowed; a stage may hold only the embedding or the head).
    """
    if stages < 1 or n_layers < 1:
        raise ConfigError(f"cannot split {n_layers} layers over {stages} pipeline stages")
    if embedding_layers < 0 or head_layers < 0:
        raise ConfigError(f"parallel.pipeline_embedding_layers={embedding_layers} and pipeline_head_layers="
                          f"{head_layers} must be non-negative")
    total = n_layers + embedding_layers + head_layers
    ends = [min(n_layers, max(0, math.floor((j + 1) * total / stages - embedding_layers + 0.5)))
            for j in range(stages - 1)] + [n_layers]
    return [end - start for start, end in zip([0] + ends[:-1], ends)]


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Share of a pipelined step that a stage idles (Narayanan et al. 2021, Sec. 2.2.1 and 2.2.2).

    GPipe and 1F1B: the pipeline fills and drains once, (p-1) slots of a micro-batch's forward + backward
    around m busy ones: (p-1) / (m + p - 1). Interleaved 1F1B with V chunks per stage: a chunk's slot is 1/V
    of a micro-batch's, so (p-1) / (V m + p - 1). (The paper writes the bubble time over the ideal time,
    (p-1)/m and (p-1)/(V m); this is the same bubble as a share of the whole step.)
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pipeline_schedule={schedule!r} is unknown (known: {', '.join(SCHEDULES)})")
    chunks = v if schedule == "interleaved_1f1b" else 1
    return (p - 1) / (chunks * m + p - 1)


def in_flight(schedule: str, p: int, m: int, v: int, rank: int) -> tuple[int, ...]:
    """Micro-batches whose activations each model chunk of pipeline rank `rank` keeps at the rank's peak.

    - GPipe runs all m forwards before any backward (Huang et al. 2019; Narayanan et al. 2021, Sec. 2.2.1):
      m on every stage.
    - 1F1B (PipeDream-Flush) runs p - rank - 1 warm-up forwards, then one forward before each backward:
      at most p - rank (Narayanan et al. 2021, Sec. 2.2.1: "at most p microbatches" on the first stage).
    - Interleaved 1F1B (Megatron-LM's forward_backward_pipelining_with_interleaving, schedules.py): the warm-up
      is (p - rank - 1) * 2 + (V - 1) * p chunk-forwards, at most V m; the peak is after one more forward;
      the k-th forward of a rank runs model chunk (k // p) mod V. On the first stage that is
      2(p-1) + (V-1) p + 1 = V p + p - 1 chunks of L / (V p) layers: L (1 + (p-1)/(V p)) layers' activations
      (Korthikanti et al. 2022, Sec. 4.2.3).
    """
    if schedule == "gpipe":
        return (m,)
    if schedule == "1f1b":
        return (min(m, p - rank),)
    peak = min((p - rank - 1) * 2 + (v - 1) * p + 1, v * m)
    return tuple(sum(1 for k in range(peak) if (k // p) % v == c) for c in range(v))


@dataclass(frozen=True)
class Stage:
    """What one pipeline rank holds: the layers of each of its model chunks, whether it has the embedding
    (first chunk of rank 0) and the final norm + head + loss (last chunk of rank p-1), and how many
    micro-batches each chunk keeps in flight at the rank's peak."""
    rank: int
    chunk_layers: tuple[int, ...]
    first: bool
    last: bool
    in_flight: tuple[int, ...]

    @property
    def layers(self) -> int:
        return sum(self.chunk_layers)

    @property
    def activation_layers(self) -> int:
        """Layer-micro-batches whose activations are alive at the peak."""
        return sum(n * layers for n, layers in zip(self.in_flight, self.chunk_layers))

    @property
    def embedding_in_flight(self) -> int:
        return self.in_flight[0] if self.first else 0

    @property
    def head_in_flight(self) -> int:
        return self.in_flight[-1] if self.last else 0


def whole_model(n_layers: int) -> Stage:
    """The one stage of a run without pipeline parallelism: one micro-batch alive at a time."""
    return Stage(0, (n_layers,), True, True, (1,))


def pipeline_stages(n_layers: int, p: int, v: int, schedule: str, m: int, embedding_layers: float = 1.0,
                    head_layers: float = 1.0) -> tuple[Stage, ...]:
    """Every pipeline rank's Stage (stage_layers over p V virtual stages, virtual stage c p + r on rank r)."""
    if p == 1:
        return (whole_model(n_layers),)
    split = stage_layers(n_layers, p * v, embedding_layers, head_layers)
    return tuple(Stage(r, tuple(split[c * p + r] for c in range(v)), r == 0, r == p - 1,
                       in_flight(schedule, p, m, v, r)) for r in range(p))


def validate_pipeline(p: int, v: int, schedule: str, m: int, n_layers: int) -> None:
    """ConfigError (one line) unless the schedule can run p stages of V chunks on m micro-batches."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pipeline_schedule={schedule!r} is unknown (known: {', '.join(SCHEDULES)})")
    if p < 1 or v < 1:
        raise ConfigError(f"parallel.pipeline_parallel={p} and parallel.virtual_stages={v} must be positive")
    if v > 1 and schedule != "interleaved_1f1b":
        raise ConfigError(f"parallel.virtual_stages={v} needs parallel.pipeline_schedule=interleaved_1f1b")
    if p * v > n_layers:
        raise ConfigError(f"{p} x {v} pipeline stages exceed the model's {n_layers} layers")
    if schedule == "interleaved_1f1b" and p > 1 and m % p:
        # Narayanan et al. 2021, Sec. 2.2.2: the interleaved schedule needs m to be a multiple of p
        raise ConfigError(f"parallel.pipeline_schedule=interleaved_1f1b needs the micro-batches per step ({m}) "
                          f"to be a multiple of parallel.pipeline_parallel={p}")


def p2p_message_bytes(micro_batch: int, seq_len: int, dim: int, tp: int, sequence_parallel: bool) -> int:
    """Bytes one GPU sends across a stage boundary for one micro-batch in one direction: the residual stream
    b s h, float32 in llama_pt (4 bytes, also under bf16 autocast), and the gradient of the same shape going
    back. Under sequence parallelism the residual stream is already split over the t ranks of a TP group, so
    each sends its 1/t (what Megatron's scatter-gather optimisation achieves, Narayanan et al. 2021, Sec.
    4.1); without it every TP rank sends the whole tensor (we do not model scatter-gather without SP)."""
    tokens = micro_batch * seq_len
    return (tokens // tp if sequence_parallel else tokens) * dim * 4


def p2p_sends_per_micro_batch(stage: Stage, p: int) -> int:
    """Messages a rank sends per micro-batch: a forward activation from every chunk but the model's last and a
    backward gradient from every chunk but the model's first (V chunks: up to 2V; Narayanan et al. 2021,
    Sec. 2.2.2: interleaving multiplies the communication by V)."""
    if p == 1:
        return 0
    v = len(stage.chunk_layers)
    return 2 * v - stage.first - stage.last


def p2p_link(world_size: int, gpus_per_node: int) -> str:
    """Adjacent stages are t d ranks apart (TP, then DP, then PP), so once the pipeline spans more than one
    node some boundary crosses InfiniBand, and the slowest boundary paces every stage."""
    return "nvlink" if world_size <= gpus_per_node else "ib"
