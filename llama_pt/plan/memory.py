"""Bytes per GPU: model states by ZeRO stage, activations by mode, temporary buffers (docs/planner.md).

Model states, per parameter held by this rank (Rajbhandari et al. 2020, ZeRO, Sec. 3.1 and 5), with
precision `bf16` (mixed precision as DeepSpeed's bf16 mode runs it): bf16 weights 2 B, bf16 gradients
2 B, optimizer 12 B = fp32 master weights 4 + Adam's two moments 4 + 4. With `fp32`: weights 4,
gradients 4, moments 8 (the weights are the master copy). ZeRO-1 divides the optimizer bytes by the
data-parallel size, ZeRO-2 also the gradients, ZeRO-3 also the weights.

Activations of one micro-batch (gradient accumulation runs micro-batches one after another):
n_layers x llama_pt.blocks.memory.layer_activation_bytes (the formula of docs/activation_memory.md,
Korthikanti et al. 2022 Sec. 4 re-derived for the LLaMA layer) plus what lives outside the layers:
the token batch, the final RMSNorm, the output projection's input and the loss's saved softmax. Under
`full` recomputation one layer's `none` activations are alive again while its backward runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..blocks.memory import layer_activation_bytes
from .layout import Layout

STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}  # weights, gradients, optimizer per parameter
ADAM_STEP_TEMP_BYTES = 4      # fp32 temporary per optimizer-shard parameter inside the Adam step
ZERO3_PREFETCH_LAYERS = 2     # gathered layers alive at once under ZeRO-3 (the current and the prefetched)


def local_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters one tensor-parallel rank holds (llama_pt.parallel's sharding; all of them for tp=1).

    Column-parallel q, w1, w3 and the output head keep 1/t of their rows, row-parallel wo, w2 1/t of
    their columns, the vocabulary-parallel embedding 1/t of its rows; k and v keep n_kv_heads/t heads, or
    one replicated head when n_kv_heads < t; the RMSNorm weights are replicated.
    """
    h, hd, t = model.dim, model.head_dim, tp
    kv_local = model.kv_heads // t if model.kv_heads >= t else 1
    attention = 2 * h * (model.n_heads // t) * hd + 2 * h * kv_local * hd
    mlp = 3 * h * (model.ffn_hidden_dim // t)
    per_layer = attention + mlp + 2 * h
    return model.n_layers * per_layer + 2 * (model.vocab_size // t) * h + h


def state_bytes(layout: Layout, zero_stage: int) -> dict[str, int]:
    """Weights, gradients and optimizer state on one GPU under a ZeRO stage (0-3)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {zero_stage} is not one of 0, 1, 2, 3")
    psi = local_parameters(layout.model, layout.tp)
    w, g, o = STATE_BYTES[layout.precision]
    shard = lambda stage: layout.dp if zero_stage >= stage else 1  # noqa: E731
    return {"weights": -(-psi * w // shard(3)), "gradients": -(-psi * g // shard(2)),
            "optimizer": -(-psi * o // shard(1))}


def _layer_kwargs(layout: Layout) -> dict:
    m = layout.model
    return dict(seq=layout.seq_len, batch=layout.micro_batch, dim=m.dim, ffn_dim=m.ffn_hidden_dim,
                n_heads=m.n_heads, n_kv_heads=m.kv_heads, tp=layout.tp, sequence_parallel=layout.sp,
                overlap=layout.overlap, precision="bf16_autocast" if layout.precision == "bf16" else "fp32")


def activation_bytes(layout: Layout) -> dict[str, int]:
    """Saved-for-backward bytes of one micro-batch on one GPU, by part (docs/planner.md, "Activations")."""
    m, t, T = layout.model, layout.tp, layout.micro_tokens
    kw = _layer_kwargs(layout)
    r = 4                                               # residual stream and norm math: fp32 (also under autocast)
    e = 2 if layout.precision == "bf16" else 4         # matmul outputs
    shard = T // t if layout.sp else T                  # tokens of a residual-stream tensor on this rank
    v_local = m.vocab_size // t
    head_input = (shard if layout.sp and layout.overlap else T) * m.dim * e
    if t == 1:
        loss = T * m.vocab_size * 4 + T * 8 + 4        # log-softmax (fp32), flattened targets, total weight
    else:
        loss = T * v_local * 4 + T * 8 + T * 1         # softmax (fp32), local target ids, outside mask
    parts = {
        "layers": m.n_layers * layer_activation_bytes(layout.activation, **kw),
        "tokens": layout.micro_batch * (layout.seq_len + 1) * 8,   # the int64 batch (inputs + targets)
        "final_norm": 2 * shard * m.dim * r + shard * r,          # input, normalised, 1/rms
        "head_input": head_input,                                  # what the output projection saves
        "loss": loss,
    }
    if layout.activation == "full":  # one layer recomputed with everything saved, during its backward
        parts["recompute"] = layer_activation_bytes("none", **kw)
    return parts


def buffer_bytes(layout: Layout, zero_stage: int, reserve: int) -> dict[str, int]:
    """Temporary buffers alive during the forward/backward of a micro-batch."""
    m, t, T = layout.model, layout.tp, layout.micro_tokens
    e = 2 if layout.precision == "bf16" else 4
    v_local = m.vocab_size // t
    psi = local_parameters(m, t)
    g = STATE_BYTES[layout.precision][1]
    # logits in the matmul dtype, their fp32 copy for the loss (under bf16), and their fp32 gradient
    logits = T * v_local * (e + (4 if e != 4 else 0) + 4)
    parts = {"logits": logits}
    if layout.dp > 1:  # one gradient bucket being reduced while backward goes on
        parts["dp_bucket"] = min(layout.bucket_size, psi) * g
    if t > 1:  # the gathered input of a column-parallel group, and the next one in flight (overlap)
        parts["tp_buffers"] = (2 if layout.overlap else 1) * T * m.dim * e
    if zero_stage == 3 and layout.dp > 1:
        per_layer = (psi - 2 * v_local * m.dim - m.dim) // m.n_layers
        parts["zero3_gathered"] = ZERO3_PREFETCH_LAYERS * per_layer * STATE_BYTES[layout.precision][0]
    parts["reserve"] = reserve
    return parts


@dataclass
class MemoryPlan:
    states: dict[str, int]
    activations: dict[str, int]
    buffers: dict[str, int]
    step_temporaries: dict[str, int] = field(default_factory=dict)

    @property
    def train_peak(self) -> int:
        """During forward/backward: states + one micro-batch's activations + buffers."""
        return sum(self.states.values()) + sum(self.activations.values()) + sum(self.buffers.values())

    @property
    def step_peak(self) -> int:
        """During the optimizer step (activations freed): states + the step's temporaries + reserve."""
        return sum(self.states.values()) + sum(self.step_temporaries.values()) + self.buffers.get("reserve", 0)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.step_peak)


def memory_plan(layout: Layout, reserve: int, zero_stage: int | None = None) -> MemoryPlan:
    """The per-GPU memory of `layout` (at its own ZeRO stage unless one is given)."""
    stage = layout.zero_stage if zero_stage is None else zero_stage
    states = state_bytes(layout, stage)
    psi = local_parameters(layout.model, layout.tp)
    optimizer_params = -(-psi // layout.dp) if stage >= 1 else psi
    step = {"adam_temporaries": optimizer_params * ADAM_STEP_TEMP_BYTES}
    if stage in (1, 2) and layout.dp > 1:  # the updated weights are all-gathered in buckets
        step["allgather_bucket"] = min(layout.bucket_size, psi) * STATE_BYTES[layout.precision][0]
    return MemoryPlan(states=states, activations=activation_bytes(layout),
                      buffers=buffer_bytes(layout, stage, reserve), step_temporaries=step)
