"""Bytes one LLaMA layer keeps for its backward, per activation mode: the formula and the measurement.

The analysis of Korthikanti et al. 2022 (Sec. 4, "Activation Memory"; their 34sbh + 5as^2b per GPT
layer), re-derived term by term for the LLaMA block as llama_pt builds it: RMSNorm instead of LayerNorm,
SwiGLU with hidden size f instead of a 4h GeLU MLP, RoPE, grouped-query attention (g kv heads), no
dropout, and a memory-efficient attention kernel that keeps the output and a log-sum-exp instead of the
a s^2 b softmax. docs/activation_memory.md derives every term; `layer_activation_bytes` is that table
in code and `measure_saved_bytes` counts what autograd actually keeps (tests/ops assert they agree).

Conventions (as Korthikanti et al.): activations only. Parameters, their gradients, and the half-precision
copies of weights that autocast makes (and caches for the step) are excluded; so are module buffers (the
RoPE tables). A tensor that several ops save, or views of one tensor, count once (distinct storages).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import ACTIVATION_MODES

# precision -> (bytes of the residual stream and the norms' float math, bytes of the matmul outputs)
PRECISIONS = {"fp32": (4, 4), "fp64": (8, 8), "bf16_autocast": (4, 2), "fp16_autocast": (4, 2)}


def layer_activation_bytes(mode: str, *, seq: int, batch: int, dim: int, ffn_dim: int, n_heads: int,
                           n_kv_heads: Optional[int] = None, tp: int = 1, sequence_parallel: bool = False,
                           overlap: bool = True, precision: str = "bf16_autocast") -> int:
    """Bytes saved for backward by one transformer layer on one rank (docs/activation_memory.md).

    seq, batch: the micro-batch; dim (h), ffn_dim (f), n_heads (a), n_kv_heads (g, default a): the model;
    tp (t), sequence_parallel, overlap: llama_pt.parallel's layout (overlap changes what `none` keeps
    under SP); precision: one of PRECISIONS (autocast: float32 weights and residual, half-precision matmuls).
    """
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"activation mode {mode!r} is unknown (known: {', '.join(ACTIVATION_MODES)})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown (known: {', '.join(PRECISIONS)})")
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
    # none: plain autograd, per RMSNorm: its input, rstd and x*rstd; then what the linears keep of its output.
    norm = residual + shard * r + shard * dim * r
    if t == 1:
        # plain nn.Linear: fp32 keeps the norm output once; autocast casts it once per linear (3 + 2).
        inputs = (5 if autocast else 2) * tokens * dim * e
    elif sp and overlap:
        inputs = 2 * shard * dim * e                           # the shard; re-gathered in backward
    else:
        inputs = 2 * tokens * dim * e                          # one full copy per column group
    # k and v as the attention saw them: expanded to the a_l query heads by a copy, except where the
    # expansion is a view (one local kv head) or nothing (as many kv heads as query heads).
    kv_kept = g_l if g_l in (1, a_l) else a_l
    attention = 2 * attn_out + 2 * tokens * kv_kept * hd * e + lse_bytes  # q, o; k, v
    mlp = 4 * tokens * f_l * e                                 # a, u, silu(a), silu(a) * u
    return 2 * norm + inputs + attention + mlp


def _weight_storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


_VIEW_OR_CAST = {"TBackward0", "ToCopyBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0"}


def _derived_from_weight(t: torch.Tensor, weights: set[int]) -> bool:
    """True for a weight, a buffer, or a cast/view of a weight (autocast's half-precision copies)."""
    if t.untyped_storage().data_ptr() in weights:
        return True
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
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _derived_from_weight(t, weights):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
