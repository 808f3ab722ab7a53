"""Pipeline parallelism in the planner: each rank's chunks, the schedules' bubble and in-flight micro-batches,
and the point-to-point volume (docs/planner.md, "Pipeline parallelism"). The settings, their checks and the
stage split are the config layer's (llama_pt.config: ParallelConfig, validate_layout / validate_pipeline_run,
pipeline.stage_layers), so the planner plans the pipeline the trainer runs.

Notation: p pipeline stages (parallel.pipeline_parallel), V model chunks per stage (parallel.virtual_stages;
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
arXiv:2104.04473, Sec. 2.2.2), m micro-batches per data-parallel rank per optimizer step.

Process groups (llama_pt.parallel's order): TP innermost, then DP, then PP, so the two ends of a stage
boundary are t d ranks apart, on the same node only when t d is less than the GPUs of a node.
Model chunk k runs on pipeline rank k % p (Megatron's interleaved assignment: rank r holds chunks r, r + p,
r + 2p, ...), as in llama_pt.config.pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..config import PIPELINE_SCHEDULES, stage_layers


@lru_cache(maxsize=1024)
def chunk_layers(n_layers: int, p: int, v: int = 1, embedding_layers: float = 1.0,
                 head_layers: float = 1.0) -> tuple[int, ...]:
    """Transformer layers of each of the p V model chunks, in order: the split the trainer runs
    (llama_pt.config.pipeline.stage_layers, balanced with the embedding and head weights), as counts.
    Cached: the split is an exact dynamic programme, and the search asks for the same one many times."""
    return tuple(len(r) for r in stage_layers(n_layers, p * v, embedding_layers, head_layers))


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Share of a pipelined step that a stage idles (Narayanan et al. 2021, Sec. 2.2.1 and 2.2.2).

    GPipe and 1F1B: the pipeline fills and drains once, (p-1) slots of a micro-batch's forward + backward
    around m busy ones: (p-1) / (m + p - 1). Interleaved 1F1B with V chunks per stage: a chunk's slot is 1/V
    of a micro-batch's, so (p-1) / (V m + p - 1). (The paper writes the bubble time over the ideal time,
    (p-1)/m and (p-1)/(V m); this is the same bubble as a share of the whole step.)
    """
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}")
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
    """Every pipeline rank's Stage: the trainer's split into p V chunks (chunk_layers), chunk k on rank k % p."""
    if p == 1:
        return (whole_model(n_layers),)
    split = chunk_layers(n_layers, p, v, embedding_layers, head_layers)
    return tuple(Stage(r, tuple(split[r::p]), r == 0, r == p - 1, in_flight(schedule, p, m, v, r))
                 for r in range(p))


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
