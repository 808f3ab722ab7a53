"""How a model is cut into pipeline stages: the layers of every stage (and virtual stage), from balancing
weights. Torch-free and pure, so the launcher's check, the trainer and the planner compute the same split.

Pipeline parallelism (Huang et al. 2019, GPipe; Narayanan et al. 2021, Megatron PTD-P, Sec. 2.2) runs a
contiguous run of layers on each of P stages; the first also runs the embedding, the last the final norm and
the head. When balancing, each transformer layer costs 1 and the embedding and the head cost
`parallel.pipeline_embedding_layers` and `parallel.pipeline_head_layers` layers (default 1.0 each: the head's
matmul over the vocabulary and the cross-entropy cost about a layer at LLaMA sizes; the embedding's lookup
costs little time but its table and gradient weigh on memory like a layer, and equal weights at both ends
keep even splits even). With V virtual stages (interleaved 1F1B) the model is cut into P*V model chunks;
chunk k runs on stage k % P (Megatron's assignment), the embedding in chunk 0, the head in chunk P*V-1.
"""
from __future__ import annotations

from functools import lru_cache


def stage_layers(n_layers: int, stages: int, embedding_layers: float = 1.0,
                 head_layers: float = 1.0) -> list[range]:
    """The layers of each of `stages` consecutive model chunks (at least one layer each), as ranges of
    global layer indices covering 0..n_layers-1 in order.

    A chunk's cost is its layer count, plus `embedding_layers` on the first and `head_layers` on the last.
    The split minimises the largest cost, then the sum of squared costs (the most even among the best),
    then prefers more layers in earlier chunks; uneven splits are allowed (e.g. 5 layers on 2 stages with
    the default weights: 3 + 2, costs 4 and 3). Exact, by dynamic programming over (chunk, first layer).
    """
    if stages < 1:
        raise ValueError(f"stages={stages} must be positive")
    if n_layers < stages:
        raise ValueError(f"{n_layers} layers cannot fill {stages} pipeline chunks (at least one layer each)")
    if embedding_layers < 0 or head_layers < 0:
        raise ValueError("embedding_layers and head_layers must not be negative")

    def cost(chunk: int, count: int) -> float:
        extra = (embedding_layers if chunk == 0 else 0.0) + (head_layers if chunk == stages - 1 else 0.0)
        return count + extra

    @lru_cache(maxsize=None)
    def best(chunk: int, start: int) -> tuple[tuple[float, float, tuple[int, ...]], tuple[int, ...]]:
        """(key, counts) of the best split of layers start.. over chunks chunk..stages-1; key sorts best first."""
        left = stages - chunk
        if left == 1:
            c = cost(chunk, n_layers - start)
            return (c, c * c, (-(n_layers - start),)), (n_layers - start,)
        options = []
        for count in range(1, n_layers - start - (left - 1) + 1):
            (worst, squares, neg), rest = best(chunk + 1, start + count)
            c = cost(chunk, count)
            options.append(((max(worst, c), squares + c * c, (-count, *neg)), (count, *rest)))
        return min(options)

    counts = best(0, 0)[1]
    best.cache_clear()
    out, start = [], 0
    for count in counts:
        out.append(range(start, start + count))
        start += count
    return out


def chunk_costs(split: list[range], embedding_layers: float = 1.0, head_layers: float = 1.0) -> list[float]:
    """The balancing cost of each chunk of a split (as `stage_layers` weighs it)."""
    last = len(split) - 1
    return [len(r) + (embedding_layers if i == 0 else 0.0) + (head_layers if i == last else 0.0)
            for i, r in enumerate(split)]


def describe_split(split: list[range], stages: int) -> str:
    """One line: the layers of each stage, e.g. ``stage 0: emb + layers 0-2 | stage 1: layers 3-4 + head``;
    with virtual stages each stage lists its chunks."""
    last = len(split) - 1
    parts = []
    for stage in range(stages):
        pieces = []
        for k in range(stage, len(split), stages):
            r = split[k]
            layers = f"layers {r.start}-{r.stop - 1}" if len(r) > 1 else f"layer {r.start}"
            pieces.append(("emb + " if k == 0 else "") + layers + (" + head" if k == last else ""))
        parts.append(f"stage {stage}: " + ", ".join(pieces))
    return " | ".join(parts)
