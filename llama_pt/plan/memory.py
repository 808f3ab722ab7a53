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

LoRA and QLoRA (peft.method; docs/planner.md, "LoRA and QLoRA"): the states above are those of the
trainable parameters only (the LoRA factors and peft.modules_to_save); the frozen base is held as weights
alone, in the training precision (lora) or with its projections in NF4 with double quantisation (qlora,
llama_pt.adapters.nf4_storage_bytes per matrix; Dettmers et al. 2023, Sec. 3). A layer keeps what its
activation mode keeps with the LoRA branches of peft.targets (layer_activation_bytes' lora terms); a
frozen head keeps no input (its input gradient needs only its weight). QLoRA adds one projection
dequantised to the compute dtype as a temporary buffer (llama_pt.adapters.nf4.dequantize_bytes).

Pipeline parallelism (llama_pt.plan.pipeline, docs/planner.md "Pipeline parallelism"): every term is that of
one pipeline rank's Stage. Its states are those of its layers, plus the embedding on the first stage and the
final norm and head on the last; its activations are its in-flight micro-batches' (Stage.in_flight: the
schedule's peak) times each chunk's layers, with the token batch, final norm, head input and loss of the
micro-batches in flight at the first or last chunk; the logits buffers only on the last stage, and two
received point-to-point messages (an activation and a gradient) on every stage. Without pipeline
parallelism the one Stage is the whole model with one micro-batch alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from ..adapters.nf4 import dequantize_bytes, nf4_storage_bytes
from ..blocks.memory import layer_activation_bytes
from ..config import ModelConfig
from .layout import Layout
from .pipeline import Stage, p2p_message_bytes, whole_model

STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}  # weights, gradients, optimizer per parameter
ADAM_STEP_TEMP_BYTES = 4      # fp32 temporary per optimizer-shard parameter inside the Adam step
ZERO3_PREFETCH_LAYERS = 2     # gathered layers alive at once under ZeRO-3 (the current and the prefetched)


def projection_shapes(model: ModelConfig, tp: int) -> dict[str, tuple[int, int]]:
    """(rows, columns) of each projection of one layer on one tensor-parallel rank (llama_pt.parallel's sharding).

    Column-parallel wq, wk, wv, w1, w3 keep 1/t of their rows, row-parallel wo, w2 1/t of their columns;
    k and v keep n_kv_heads/t heads, or one replicated head when n_kv_heads < t.
    """
    h, hd, t = model.dim, model.head_dim, tp
    q_local = (model.n_heads // t) * hd
    kv_local = (model.kv_heads // t if model.kv_heads >= t else 1) * hd
    f_local = model.ffn_hidden_dim // t
    return {"wq": (q_local, h), "wk": (kv_local, h), "wv": (kv_local, h), "wo": (h, q_local),
            "w1": (f_local, h), "w2": (h, f_local), "w3": (f_local, h)}


def local_parameters(model: ModelConfig, tp: int, stage: Optional[Stage] = None) -> int:
    """Parameters one tensor-parallel rank holds (all of them for tp=1): its share of every projection
    (projection_shapes), the RMSNorm weights (replicated), 1/t of the rows of the vocabulary-parallel
    embedding and of the column-parallel output head. With a pipeline `stage`: its layers, the embedding on
    the first stage, the final norm and the head on the last."""
    h = model.dim
    stage = stage or whole_model(model.n_layers)
    per_layer = sum(rows * cols for rows, cols in projection_shapes(model, tp).values()) + 2 * h
    vocab = (model.padded_vocab_size // tp) * h
    return stage.layers * per_layer + stage.first * vocab + stage.last * (vocab + h)


def _vocab_rows(layout: Layout) -> int:
    """Parameters of the embedding, or of the output head, on one tensor-parallel rank."""
    return (layout.model.padded_vocab_size // layout.tp) * layout.model.dim


def adapter_parameters(layout: Layout) -> int:
    """LoRA factors on one tensor-parallel rank (Hu et al. 2021): a projection W of (rows, columns) gets
    A (rank x columns) and B (rows x rank), in every layer, for each name in peft.targets. Under tensor
    parallelism A of a column-parallel and B of a row-parallel projection are whole on every rank, so the
    count is rank x (rows + columns) of the local shape either way. 0 without PEFT."""
    if layout.peft.method == "none":
        return 0
    shapes = projection_shapes(layout.model, layout.tp)
    return layout.model.n_layers * sum(layout.peft.rank * sum(shapes[name]) for name in layout.peft.targets)


def trainable_parameters(layout: Layout, stage: Optional[Stage] = None) -> int:
    """Parameters with gradients and optimizer state on one tensor-parallel rank (of one pipeline `stage`):
    all of them for full training; the LoRA factors and the modules in peft.modules_to_save under LoRA and
    QLoRA (no pipeline parallelism: layout_from_config refuses it)."""
    if layout.peft.method == "none":
        return local_parameters(layout.model, layout.tp, stage)
    return adapter_parameters(layout) + len(layout.peft.modules_to_save) * _vocab_rows(layout)


def _base_layer_bytes(layout: Layout) -> int:
    """Bytes of one layer of the frozen base: its projections (in NF4 under QLoRA: nf4_storage_bytes per
    matrix, padding included) and its two RMSNorm weights, at the weight bytes of the precision."""
    m, w = layout.model, STATE_BYTES[layout.precision][0]
    sizes = [rows * cols for rows, cols in projection_shapes(m, layout.tp).values()]
    projections = sum(map(nf4_storage_bytes, sizes)) if layout.peft.method == "qlora" else sum(sizes) * w
    return projections + 2 * m.dim * w


def frozen_base_bytes(layout: Layout) -> int:
    """Bytes of the frozen base on one tensor-parallel rank (0 for full training): every layer
    (_base_layer_bytes), the final norm, and the embedding and the head unless in peft.modules_to_save,
    these at the weight bytes of the precision (bf16: 2, fp32: 4)."""
    if layout.peft.method == "none":
        return 0
    m, w = layout.model, STATE_BYTES[layout.precision][0]
    frozen_vocab = 2 - len(layout.peft.modules_to_save)
    return m.n_layers * _base_layer_bytes(layout) + (m.dim + frozen_vocab * _vocab_rows(layout)) * w


def layer_weight_bytes(layout: Layout) -> int:
    """Bytes of one layer's weights as held: what ZeRO-3 gathers for the layer's forward and backward."""
    w = STATE_BYTES[layout.precision][0]
    if layout.peft.method == "none":
        per_layer = (local_parameters(layout.model, layout.tp) - 2 * _vocab_rows(layout) - layout.model.dim)
        return per_layer // layout.model.n_layers * w
    return _base_layer_bytes(layout) + adapter_parameters(layout) // layout.model.n_layers * w


def state_bytes(layout: Layout, zero_stage: int, stage: Optional[Stage] = None) -> dict[str, int]:
    """Model states on one GPU (of one pipeline `stage`) under a ZeRO stage (0-3): weights, gradients and
    optimizer state of the trainable parameters, and under PEFT the frozen base (weights only; divided by d
    under ZeRO-3 too). ZeRO shards over the d data-parallel ranks of the stage."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {zero_stage} is not one of 0, 1, 2, 3")
    psi = trainable_parameters(layout, stage)
    w, g, o = STATE_BYTES[layout.precision]
    shard = lambda stage: layout.dp if zero_stage >= stage else 1  # noqa: E731
    states = {"weights": -(-psi * w // shard(3)), "gradients": -(-psi * g // shard(2)),
              "optimizer": -(-psi * o // shard(1))}
    if layout.peft.method != "none":
        states = {"frozen_base": -(-frozen_base_bytes(layout) // shard(3)), **states}
    return states


def _layer_bytes(mode: str, layout: Layout) -> int:
    """One layer's saved bytes for one micro-batch."""
    return _cached_layer_bytes(mode, tuple(sorted(_layer_kwargs(layout).items())))


@lru_cache(maxsize=4096)
def _cached_layer_bytes(mode: str, kwargs: tuple) -> int:
    """layer_activation_bytes by value (the search asks for the same layer many times)."""
    return layer_activation_bytes(mode, **dict(kwargs))


def _layer_kwargs(layout: Layout) -> dict:
    m, peft = layout.model, layout.peft
    kw = dict(seq=layout.seq_len, batch=layout.micro_batch, dim=m.dim, ffn_dim=m.ffn_hidden_dim,
              n_heads=m.n_heads, n_kv_heads=m.kv_heads, tp=layout.tp, sequence_parallel=layout.sp,
              overlap=layout.overlap, precision="bf16_autocast" if layout.precision == "bf16" else "fp32")
    if peft.method != "none":  # the layer's LoRA branches (llama_pt.blocks.memory, docs/activation_memory.md)
        kw.update(lora_rank=peft.rank, lora_targets=peft.targets, lora_dropout=peft.dropout > 0, trained_base=False)
    return kw


def activation_bytes(layout: Layout, stage: Optional[Stage] = None) -> dict[str, int]:
    """Saved-for-backward bytes on one GPU at its peak, by part (docs/planner.md, "Activations"): one
    micro-batch without pipeline parallelism; a pipeline `stage`'s in-flight micro-batches with it."""
    m, t, T = layout.model, layout.tp, layout.micro_tokens
    stage = stage or whole_model(m.n_layers)
    r = 4                                               # residual stream and norm math: fp32 (also under autocast)
    e = 2 if layout.precision == "bf16" else 4         # matmul outputs
    shard = T // t if layout.sp else T                  # tokens of a residual-stream tensor on this rank
    v_local = m.padded_vocab_size // t
    head_input = (shard if layout.sp and layout.overlap else T) * m.dim * e
    if layout.peft.method != "none" and "output" not in layout.peft.modules_to_save:
        head_input = 0                                  # a frozen head needs only its weight for dL/dx
    if t == 1:
        loss = T * m.padded_vocab_size * 4 + T * 8 + 4  # log-softmax (fp32), flattened targets, total weight
    else:
        loss = T * v_local * 4 + T * 8 + T * 1         # softmax (fp32), local target ids, outside mask
    ends = max(stage.embedding_in_flight, stage.head_in_flight)  # micro-batches whose token batch is kept
    heads = stage.head_in_flight
    parts = {
        "layers": stage.activation_layers * _layer_bytes(layout.activation, layout),
        "tokens": ends * layout.micro_batch * (layout.seq_len + 1) * 8,   # the int64 batch (inputs + targets)
        "final_norm": heads * (2 * shard * m.dim * r + shard * r),       # input, normalised, 1/rms
        "head_input": heads * head_input,                                 # what the output projection saves
        "loss": heads * loss,
    }
    if layout.activation == "full" and stage.layers:  # one layer recomputed with everything saved, in its backward
        parts["recompute"] = _layer_bytes("none", layout)
    return parts


def buffer_bytes(layout: Layout, zero_stage: int, reserve: int, stage: Optional[Stage] = None) -> dict[str, int]:
    """Temporary buffers alive during the forward/backward of a micro-batch (on one pipeline `stage`)."""
    m, t, T = layout.model, layout.tp, layout.micro_tokens
    stage = stage or whole_model(m.n_layers)
    e = 2 if layout.precision == "bf16" else 4
    v_local = m.padded_vocab_size // t
    psi = trainable_parameters(layout, stage)
    g = STATE_BYTES[layout.precision][1]
    parts = {}
    if stage.last:  # logits in the matmul dtype, their fp32 copy for the loss (under bf16), their fp32 gradient
        parts["logits"] = T * v_local * (e + (4 if e != 4 else 0) + 4)
    if layout.pp > 1:  # a received activation and a received gradient
        parts["p2p_buffers"] = 2 * p2p_message_bytes(layout.micro_batch, layout.seq_len, m.dim, t, layout.sp)
    if layout.dp > 1:  # one gradient bucket being reduced while backward goes on
        parts["dp_bucket"] = min(layout.bucket_size, psi) * g
    if t > 1:  # the gathered input of a column-parallel group, and the next one in flight (overlap)
        parts["tp_buffers"] = (2 if layout.overlap else 1) * T * m.dim * e
    if zero_stage == 3 and layout.dp > 1:
        parts["zero3_gathered"] = ZERO3_PREFETCH_LAYERS * layer_weight_bytes(layout)
    if layout.peft.method == "qlora":  # one projection dequantised to the compute dtype at a time
        largest = max(rows * cols for rows, cols in projection_shapes(m, t).values())
        parts["nf4_dequantized"] = dequantize_bytes(largest, e)
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


def stage_memory_plan(layout: Layout, reserve: int, zero_stage: int, stage: Stage) -> MemoryPlan:
    """The memory of one GPU of pipeline `stage` at ZeRO stage `zero_stage`."""
    states = state_bytes(layout, zero_stage, stage)
    psi = trainable_parameters(layout, stage)
    optimizer_params = -(-psi // layout.dp) if zero_stage >= 1 else psi
    step = {"adam_temporaries": optimizer_params * ADAM_STEP_TEMP_BYTES}
    if zero_stage in (1, 2) and layout.dp > 1:  # the updated weights are all-gathered in buckets
        step["allgather_bucket"] = min(layout.bucket_size, psi) * STATE_BYTES[layout.precision][0]
    return MemoryPlan(states=states, activations=activation_bytes(layout, stage),
                      buffers=buffer_bytes(layout, zero_stage, reserve, stage), step_temporaries=step)


def memory_plans(layout: Layout, reserve: int, zero_stage: Optional[int] = None) -> tuple[MemoryPlan, ...]:
    """Every pipeline rank's memory (one plan without pipeline parallelism), at the layout's ZeRO stage
    unless one is given."""
    zero = layout.zero_stage if zero_stage is None else zero_stage
    return tuple(stage_memory_plan(layout, reserve, zero, stage) for stage in layout.stages)


def memory_plan(layout: Layout, reserve: int, zero_stage: Optional[int] = None) -> MemoryPlan:
    """The per-GPU memory of `layout` on its fullest GPU: the pipeline rank with the highest peak."""
    return max(memory_plans(layout, reserve, zero_stage), key=lambda plan: plan.peak)
