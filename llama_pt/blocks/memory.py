"""Bytes one LLaMA layer keeps for its backward, per activation mode: the formula and the measurement.

The analysis of Korthikanti et al. 2022 (Sec. 4, "Activation Memory"; their 34sbh + 5as^2b per GPT
layer), re-derived term by term for the LLaMA block as llama_pt builds it: RMSNorm instead of LayerNorm,
SwiGLU with hidden size f instead of a 4h GeLU MLP, RoPE, grouped-query attention (g kv heads), no
dropout, and a memory-efficient attention kernel that keeps the output and a log-sum-exp instead of the
a s^2 b softmax; and what LoRA's low-rank updates add (llama_pt.adapters.lora), with or without dropout,
on a trained or a frozen base. docs/activation_memory.md derives every term; `layer_activation_bytes` is
that table in code and `measure_saved_bytes` counts what autograd actually keeps (tests/ops assert they
agree).

Conventions (as Korthikanti et al.): activations only. Parameters, their gradients, and the half-precision
copies of weights that autocast makes (and caches for the step) are excluded; so are module buffers (the
RoPE tables). A tensor that several ops save, or views of one tensor, count once (distinct storages).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..adapters.lora import PROJECTIONS
from ..config import ACTIVATION_MODES

# precision -> (bytes of the residual stream and the norms' float math, bytes of the matmul outputs)
PRECISIONS = {"fp32": (4, 4), "fp64": (8, 8), "bf16_autocast": (4, 2), "fp16_autocast": (4, 2)}


def layer_activation_bytes(mode: str, *, seq: int, batch: int, dim: int, ffn_dim: int, n_heads: int,
                           n_kv_heads: Optional[int] = None, tp: int = 1, sequence_parallel: bool = False,
                           overlap: bool = True, precision: str = "bf16_autocast", lora_rank: int = 0,
                           lora_targets: Iterable[str] = tuple(PROJECTIONS), lora_dropout: bool = False,
                           trained_base: bool = True) -> int:
    """Bytes saved for backward by one transformer layer on one rank (docs/activation_memory.md).

    seq, batch: the micro-batch; dim (h), ffn_dim (f), n_heads (a), n_kv_heads (g, default a): the model;
    tp (t), sequence_parallel, overlap: llama_pt.parallel's layout (overlap changes what `none` keeps
    under SP); precision: one of PRECISIONS (autocast: float32 weights and residual, half-precision matmuls).
    LoRA (llama_pt.adapters.lora): lora_rank (0: no adapters), lora_targets (the adapted projections, names
    of PROJECTIONS), lora_dropout (dropout > 0, in training); trained_base False: the layer's own weights
    and norms are frozen (as under LoRA), so plain autograd (`none`) keeps no input for their gradients.
    The layer input is taken to need its gradient (every layer but the first of a frozen model).
    """
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activation mode {mode!r} is unknown (known: {', '.join(ACTIVATION_MODES)})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown (known: {', '.join(PRECISIONS)})")
    targets = set(lora_targets) if lora_rank else set()
    if targets - set(PROJECTIONS):
        raise ValueError(f"LoRA target {sorted(targets - set(PROJECTIONS))[0]!r} is not one of {', '.join(PROJECTIONS)}")
    layout = dict(tp=tp, sequence_parallel=sequence_parallel and tp > 1, overlap=overlap, precision=precision,
                  trained_base=trained_base)
    return (_block_bytes(mode, seq=seq, batch=batch, dim=dim, ffn_dim=ffn_dim, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, **layout)
            + _adapter_bytes(mode, tokens=seq * batch, dim=dim, ffn_dim=ffn_dim, rank=lora_rank, targets=targets,
                             dropout=lora_dropout, **layout))


def _block_bytes(mode: str, *, seq: int, batch: int, dim: int, ffn_dim: int, n_heads: int,
                 n_kv_heads: Optional[int], tp: int, sequence_parallel: bool, overlap: bool, precision: str,
                 trained_base: bool) -> int:
    """The block's own bytes, without adapters (docs/activation_memory.md, one section per mode)."""
    g = n_heads if n_kv_heads is None else n_kv_heads
    r, e = PRECISIONS[precision]          # residual / norm bytes, matmul-output bytes
    lse = 8 if precision == "fp64" else 4  # the log-sum-exp: float32 (float64 for float64 inputs)
    autocast = e != r
    t = tp
    sp = sequence_parallel and t > 1
    tokens = seq * batch                   # s b
    hd = dim // n_heads                    # head dim
    a_l = n_heads // t                     # query heads on this rank
    g_l = g // t if g >= t else 1          # kv heads on this rank (one replicated head when g < t)
    f_l = ffn_dim // t
    shard = tokens // t if sp else tokens  # tokens of a residual-stream tensor on this rank

    residual = shard * dim * r             # one [s, b, h] tensor of the residual stream: x or h
    if mode == "full":
        return residual                                        # the layer input only
    attn_out = tokens * a_l * hd * e                           # q (after RoPE) or o, local heads
    lse_bytes = batch * a_l * seq * lse
    if mode == "selective":
        return (2 * residual                                   # x and h = x + attention
                + 2 * attn_out + 2 * tokens * g_l * hd * e     # q, o; k, v with their own heads
                + lse_bytes + 2 * tokens * f_l * e)            # a = W1 n2, u = W3 n2
    # none: plain autograd, per RMSNorm: its input, rstd and (for the weight's gradient) x*rstd; then what
    # the linears keep of its output.
    norm = residual + shard * r + (shard * dim * r if trained_base else 0)
    if t > 1 and overlap:
        # the overlapped column-parallel function keeps its input, trained or not: the shard under SP
        # (re-gathered in backward), the full input otherwise
        inputs = 2 * shard * dim * e
    elif not trained_base:
        inputs = 0                                             # frozen linears keep no input
    elif t == 1:
        # plain nn.Linear: fp32 keeps the norm output once; autocast casts it once per linear (3 + 2).
        inputs = (5 if autocast else 2) * tokens * dim * e
    else:
        inputs = 2 * tokens * dim * e                          # one full copy per column group
    # k and v as the attention saw them: expanded to the a_l query heads by a copy, except where the
    # expansion is a view (one local kv head) or nothing (as many kv heads as query heads).
    kv_kept = g_l if g_l in (1, a_l) else a_l
    attention = 2 * attn_out + 2 * tokens * kv_kept * hd * e + lse_bytes  # q, o; k, v
    mlp = (4 if trained_base else 3) * tokens * f_l * e        # a, u, silu(a), (for W2's gradient) silu(a) * u
    return 2 * norm + inputs + attention + mlp


COLUMN_GROUPS = {"wq": "attention", "wk": "attention", "wv": "attention", "w1": "mlp", "w3": "mlp"}
# The column-parallel projections read the norm output (gathered under SP); wo and w2 read this rank's heads
# and hidden units.


def _adapter_bytes(mode: str, *, tokens: int, dim: int, ffn_dim: int, rank: int, targets: set[str], dropout: bool,
                   tp: int, sequence_parallel: bool, overlap: bool, precision: str, trained_base: bool) -> int:
    """What the low-rank updates of `targets` keep on one rank beyond the block (docs/activation_memory.md,
    "LoRA adapters").

    Every adapted projection keeps u = A x [s, b, rank] over the full sequence (also under SP: a column
    projection's input is gathered, a row projection's partial u is all-reduced), in the matmul dtype.
    `selective` adds its dropout masks as bool: the full [s, b, h] input of each column projection, this
    rank's [s, b, h/t] or [s, b, f/t] of wo / w2. `none` keeps what autograd keeps for A's gradient: with
    dropout the noise and the dropped input per projection; without, the input, where the block does not
    keep that storage already."""
    if mode == "full" or not targets:
        return 0
    r, e = PRECISIONS[precision]
    t = tp
    column = [n for n in targets if n in COLUMN_GROUPS]
    row_width = {"wo": dim // t, "w2": ffn_dim // t}
    row = [row_width[n] for n in targets if n in row_width]
    low = len(targets) * tokens * rank * e
    if mode == "selective":
        return low + (tokens * (len(column) * dim + sum(row)) if dropout else 0)
    if dropout:
        # t = 1: the noise has the norm output's dtype (r); t > 1: column_parallel casts the input first (e).
        return low + len(column) * tokens * dim * ((r if t == 1 else e) + e) + 2 * tokens * sum(row) * e
    groups = len({COLUMN_GROUPS[n] for n in column})
    if t == 1 and e != r:
        kept = len(column) * tokens * dim * e            # autocast casts the input once per linear
    elif sequence_parallel:
        kept = groups * tokens * dim * e                 # one more all-gather per column group
    elif trained_base or (t > 1 and overlap):
        kept = 0                                         # the base keeps the same storage
    else:
        kept = groups * tokens * dim * e                 # the norm output (its cast at t > 1), once per group
    # wo's input o is kept by the attention anyway; w2's silu(a) * u only by a trained W2
    w2_input = 0 if trained_base or "w2" not in targets else tokens * (ffn_dim // t) * e
    return low + kept + w2_input


def _weight_storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


_VIEW_OR_CAST = {"TBackward0", "ToCopyBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0"}


def _derived_from_weight(t: torch.Tensor, weights: set[int], frozen: dict[tuple, list[torch.Tensor]]) -> bool:
    """True for a weight, a buffer, or a cast/view of a weight (autocast's half-precision copies). A cast of
    a frozen weight has no autograd history to follow: it is recognised by its values (`frozen`: the
    parameters that need no gradient, by shape; autocast does not cache their casts, so every linear
    keeps its own copy until backward, which is memory, but not activations)."""
    if t.untyped_storage().data_ptr() in weights:
        return True
    if t.grad_fn is None and not t.requires_grad:
        base = t if t._base is None else t._base  # a matmul may save the cast transposed
        return any(w.dtype != base.dtype and torch.equal(base, w.detach().to(base.dtype))
                   for w in frozen.get(tuple(base.shape), ()))
    node = t.grad_fn
    while node is not None and type(node).__name__ in _VIEW_OR_CAST:
        node = node.next_functions[0][0]
    variable = getattr(node, "variable", None)
    return variable is not None and variable.untyped_storage().data_ptr() in weights


def measure_saved_bytes(fn: Callable[[], object], model: nn.Module) -> tuple[object, int]:
    """Run fn() and return (its result, bytes of the distinct activation storages autograd saved meanwhile).

    Every tensor an op or autograd function saves for backward passes through the pack hook of
    torch.autograd.graph.saved_tensors_hooks; storages are keyed by address (a saved tensor stays alive,
    so an address is never reused while fn runs) and weights, buffers and their casts are left out.
    """
    weights = _weight_storages(model)
    frozen: dict[tuple, list[torch.Tensor]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            frozen.setdefault(tuple(param.shape), []).append(param)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _derived_from_weight(t, weights, frozen):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
