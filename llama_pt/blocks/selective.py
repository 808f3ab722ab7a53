"""The LLaMA block with a hand-written backward that saves only the expensive activations.

Touvron et al. 2023 (LLaMA), Sec. 2.4: "we reduce the amount of activations that are recomputed during
the backward pass with checkpointing. More precisely, we save the activations that are expensive to
compute, such as the outputs of linear layers. This is achieved by manually implementing the backward
function for the transformer layers, instead of relying on the PyTorch autograd."

Two autograd functions, one per residual half of the pre-norm block (llama_pt.model.llama.TransformerBlock):

  _AttentionHalf   h = x + Wo attn(rope(Wq n1), rope(Wk n1), Wv n1),      n1 = rmsnorm(x) * g1
     saves        x, q and k (after RoPE), v, o = attn(...), lse           (weights are not activations)
     recomputes   n1 (RMSNorm); RoPE needs no recomputation: the kernel's backward takes the rotated
                  q, k, and RoPE's own backward is the inverse rotation of the gradient (no activation)
  _MLPHalf         y = h + W2 (silu(a) * u),   a = W1 n2,  u = W3 n2,      n2 = rmsnorm(h) * g2
     saves        h (the residual sum, i.e. the MLP's input), a, u
     recomputes   n2 (RMSNorm), silu(a), silu(a) * u

Packed documents (llama_pt.ops.documents): the layer's spec carries the forward pass's DocumentMask (built
once by Llama.forward, shared by the layers, no activation of any), and the attention kernels compute
block-diagonal causal attention and its log-sum-exp with it; per-token RoPE tables [b, s, head_dim] serve
RoPE and its backward alike.

Nothing else is needed (docs/activation_memory.md derives it): Wo's output is never used in backward
(only its input o and the incoming gradient), and the residual sum h replaces it, because h is what the
MLP half needs anyway; the layer's output is the next layer's x. Saving q and k after RoPE costs the
same bytes as before it and spares recomputing the rotation.

Tensor and sequence parallelism (Shoeybi et al. 2019, Sec. 3; Korthikanti et al. 2022, Sec. 4.2.2):
the functions receive the rank's weight shards and issue the collectives themselves, through the
instrumented llama_pt.parallel.comm primitives, with the TP group and settings the block was built with
(`SelectiveBlock(..., tp=llama_pt.parallel.tp_context(pstate))`, done by llama_pt.blocks.modes). Forward: all-gather of the normalised sequence shard
(SP) before the column-parallel projections; all-reduce (TP) or reduce-scatter (SP) after Wo and W2.
Backward of each half, with `overlap` (asynchronous handles, as llama_pt.parallel.layers):

  all-gather(dY) [SP, the dual of the forward reduce-scatter; blocking: everything needs it]
  recompute the norm; issue all-gather(norm shard) [SP]   -> in flight during the next three lines
  row-parallel dgrad + wgrad (Wo / W2), attention or SwiGLU backward
  dgrad = sum_i dZ_i W_i                                  (timeline span "dgrad")
  wait all-gather; issue reduce-scatter(dgrad) [SP] or all-reduce(dgrad) [TP]
  wgrad dW_i = dZ_i^T n                                   (timeline span "wgrad"), in flight meanwhile
  wait; RMSNorm backward on the (shard of the) input; add the residual gradient

Weight gradients are returned for the parameters themselves, so autograd accumulates them into .grad
through the parameters' AccumulateGrad nodes and the parameter hooks of llama_pt.parallel.tensor_parallel (sum of
sequence-parallel norm weights over TP, of replicated kv heads over their replicas) run as for autograd.

LoRA (llama_pt.adapters.lora): a projection with an update (`adapter_of(linear)`) gets (alpha / r) B A
(x * noise) added to its output, computed here; A and B are extra inputs of the functions (None where not
adapted), their gradients returned like the weights' (so A's sum over TP and B's over kv replicas run).
  column (q/k/v, w1/w3)  u = A (full input * noise), saved with the dropout mask (bool); in backward
                         (dU = scale dZ B, A) joins column_parallel_backward with the projections' pairs:
                         (dU A) * noise enters dgrad before the TP reduction, dA = dU^T (X * noise)
                         is computed while it is in flight
  row (wo, w2)           partial A_r (x_r * noise) all-reduced over TP into u (saved, full sequence), B
                         maps back this rank's sequence shard of u under SP; in backward the gathered
                         output gradient gives the complete dB and dU, dA = dU^T (x_r * noise) the rank's
                         columns, and (dU A_r) * noise joins the gradient of o or of silu(a) * u
Dropout noise is drawn as LowRankUpdate draws it, in autograd's order, so every mode and layout drops the
same elements for the same random state. Without adapters nothing of this runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..adapters.lora import LowRankUpdate, adapter_of, dropout_noise
from ..model.llama import TransformerBlock, _at_least_fp32, apply_rope
from ..ops.attention import resolve_attention_backend
from ..ops.attention_kernels import AttentionState, attention_backward, attention_forward, select_kernel
from ..ops.documents import DocumentMask
from ..parallel import comm
from ..parallel.comm import BWD, FWD
from ..parallel.layers import ShardSpec, TPContext, column_parallel_backward


@dataclass(frozen=True)
class LayerSpec:
    """What a layer call needs besides its inputs and weights: shapes, the attention kernel, the TP layout, the
    matmul dtype, and the forward pass's document mask (None: one document per row)."""
    eps: float
    head_dim: int
    kernel: str
    group: Optional[object]  # the TP process group; None for one process
    sequence_parallel: bool
    overlap: bool
    compute_dtype: torch.dtype
    documents: Optional[DocumentMask] = None


# ---- elementwise pieces: forward as in llama_pt.model.llama, backward by hand ----

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = (x * rstd).type_as(x) * weight, rstd = 1/sqrt(mean(x^2) + eps) in at least float32.

    Returns y, the normalised x before the weight (in x's dtype), and rstd.
    """
    x32 = _at_least_fp32(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = (x32 * rstd).type_as(x)
    return normed * weight, normed, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor,
                      weight: torch.Tensor, need_weight_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dx and d(weight) of rms_norm: with n = x * rstd, dx = rstd (dn - n mean(dn * n))."""
    dy = dy.to(torch.promote_types(normed.dtype, weight.dtype))
    dweight = (dy * normed).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype) if need_weight_grad else None
    dn = _at_least_fp32((dy * weight).to(normed.dtype))
    n32 = _at_least_fp32(x) * rstd
    dx = rstd * (dn - n32 * (dn * n32).mean(-1, keepdim=True))
    return dx.to(x.dtype), dweight


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjoint of apply_rope: y = x cos + R(x) sin with R(x1, x2) = (-x2, x1), so dx = dy cos + R^T(dy sin)
    where R^T(z1, z2) = (z2, -z1): the rotation by the opposite angle; no activation needed."""
    half = dy.shape[-1] // 2
    d32 = _at_least_fp32(dy)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    z = d32 * sin
    return (d32 * cos + torch.cat([z[..., half:], -z[..., :half]], dim=-1)).type_as(dy)


def swiglu(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(a) * u (Shazeer 2020): the product the MLP's down projection reads."""
    return F.silu(a) * u


def swiglu_backward(dp: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """da = dp u silu'(a) (aten's silu_backward, as autograd computes it), du = dp silu(a)."""
    return torch.ops.aten.silu_backward(dp * u, a), dp * F.silu(a)


def compile_elementwise() -> None:
    """Replace the elementwise pieces the layer runs and recomputes by torch.compile'd versions, so each
    is one fused kernel on GPU instead of several passes over memory (opt-in; benchmarks/bench_layer.py
    --compile). Affects every SelectiveBlock from the next call on; calling it again changes nothing."""
    module = globals()
    for name in _ELEMENTWISE:
        if name not in _COMPILED:
            _COMPILED[name] = module[name] = torch.compile(module[name], dynamic=False)


_ELEMENTWISE = ("rms_norm", "rms_norm_backward", "apply_rope", "rope_backward", "swiglu", "swiglu_backward")
_COMPILED: dict[str, object] = {}


def _cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w if w.dtype == dtype else w.to(dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ---- the collectives around the column- and row-parallel matmuls ----

def _gather_input(n: torch.Tensor, spec: LayerSpec, phase: str) -> comm.Pending:
    """The full-sequence input of the column-parallel projections (a no-op without SP)."""
    if spec.sequence_parallel:
        return comm.all_gather_seq(n, spec.group, phase, async_op=phase == BWD and spec.overlap)
    return comm.Pending(None, lambda: n, "noop")


def _reduce_output(partial: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Sum of the row-parallel partial outputs: reduce-scatter to sequence shards (SP) or all-reduce (TP)."""
    if spec.sequence_parallel:
        return comm.reduce_scatter_seq(partial, spec.group, FWD).wait()
    return comm.all_reduce(partial, spec.group, FWD).wait()


def _output_grad(dy: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Gradient of the row-parallel output in the matmul dtype, over the full sequence."""
    g = dy.to(spec.compute_dtype)
    return comm.all_gather_seq(g, spec.group, BWD).wait() if spec.sequence_parallel else g


def _column_backward(grads: list[torch.Tensor], weights: list[torch.Tensor], gather: comm.Pending,
                     spec: LayerSpec, needs: list[bool],
                     masks: Optional[list[Optional[torch.Tensor]]] = None
                     ) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    return column_parallel_backward(grads, weights, gather, spec.group, spec.sequence_parallel, spec.overlap,
                                    spec.compute_dtype, needs, masks)


# ---- the low-rank updates of adapted projections (LoRA, llama_pt.adapters.lora) ----

@dataclass(frozen=True)
class LowRankSpec:
    """How one adapted projection's update (alpha / r) B A (x * noise) runs in a layer call: `scale` = alpha / r,
    `dropout` the probability this call applies (0 outside training), `columns` the input columns of a
    row-parallel A (its dropout noise is drawn for the full width, as LowRankUpdate.noise draws it)."""
    scale: float
    dropout: float
    columns: Optional[ShardSpec]

    @classmethod
    def of(cls, adapter: LowRankUpdate) -> "LowRankSpec":
        return cls(adapter.scale, adapter.active_dropout, getattr(adapter.lora_A, "tp_shard", None))


NOT_ADAPTED = (None, None)  # (A, B) of a projection without an update


def _low_rank_inputs(linears) -> tuple[tuple[Optional[LowRankSpec], ...], list[Optional[torch.Tensor]]]:
    """The specs of the projections' updates and their (A, B) parameters, flat (None where not adapted)."""
    specs, tensors = [], []
    for linear in linears:
        adapter = adapter_of(linear)
        specs.append(None if adapter is None else LowRankSpec.of(adapter))
        tensors += NOT_ADAPTED if adapter is None else (adapter.lora_A, adapter.lora_B)
    return tuple(specs), tensors


def _pairs(ab: tuple, n: int) -> list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """(A, B) per projection from the functions' trailing inputs (none given: no projection adapted)."""
    return [(ab[2 * i], ab[2 * i + 1]) for i in range(n)] if ab else [NOT_ADAPTED] * n


def _down(x: torch.Tensor, a: torch.Tensor, low: LowRankSpec, cdt: torch.dtype
          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """u = A (x * noise) [.., r] and the dropout mask to keep for backward (bool; None without dropout)."""
    noise = None if low.dropout == 0 else dropout_noise(x, low.dropout, low.columns)
    u = F.linear(x if noise is None else x * noise, _cast(a, cdt))
    return u, None if noise is None else noise != 0


def _up(u: torch.Tensor, b: torch.Tensor, low: LowRankSpec, cdt: torch.dtype) -> torch.Tensor:
    return low.scale * F.linear(u, _cast(b, cdt))


def _noise(keep: Optional[torch.Tensor], low: LowRankSpec, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The forward's dropout multiplier, rebuilt exactly from its mask (the Bernoulli draws are 0 or 1)."""
    return None if keep is None else keep.to(dtype).div_(1 - low.dropout)


def _column_forward(full: torch.Tensor, weights, lows, pairs, cdt: torch.dtype):
    """Z_i = full W_i^T for column-parallel projections reading the (gathered) input, plus the update of the
    adapted ones; in projection order, the order of the dropout draws autograd makes. Returns the outputs
    and, per projection, (u, mask) to keep (None, None where not adapted)."""
    outs, kept = [], []
    for w, low, (a, b) in zip(weights, lows, pairs):
        z = F.linear(full, _cast(w, cdt))
        if low is None:
            kept.append(NOT_ADAPTED)
        else:
            u, keep = _down(full, a, low, cdt)
            z = z + _up(u, b, low, cdt)
            kept.append((u, keep))
        outs.append(z)
    return outs, kept


def _row_forward(x_in: torch.Tensor, w: torch.Tensor, low: Optional[LowRankSpec], pair, spec: LayerSpec):
    """The row-parallel projection summed over TP (a sequence shard under SP) plus its update: this rank's
    partial products A_r (x_r * noise) [b, s, r] are all-reduced into the full u, and B maps back only this
    rank's sequence shard of u under SP (as RowParallelLinear cuts the update). Returns the output, u and
    the mask."""
    cdt = spec.compute_dtype
    y = _reduce_output(F.linear(x_in, _cast(w, cdt)), spec)
    if low is None:
        return y, None, None
    a, b = pair
    u, keep = _down(x_in, a, low, cdt)
    u = comm.all_reduce(u, spec.group, FWD).wait()
    return y + _up(comm.split_seq(u, spec.group) if spec.sequence_parallel else u, b, low, cdt), u, keep


def _row_backward(g: torch.Tensor, x_in: torch.Tensor, d_in: torch.Tensor, low: LowRankSpec, pair, u, keep,
                  needs: tuple[bool, bool], cdt: torch.dtype) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The update's backward for a row-parallel projection with input x_in. g, the gradient of the output over
    the full sequence, is the same on every rank, so dU = scale g B and dB = scale g^T u are complete on each
    (B is replicated); dA = dU^T (x_in * noise) is this rank's columns, and (dU A) * noise is added to d_in,
    the gradient of x_in. Returns (dA, dB), None where not needed."""
    a, b = pair
    du = torch.matmul(g, _cast(b, cdt)).mul_(low.scale)
    db = torch.matmul(_flat(g).t(), _flat(u)).mul_(low.scale).to(b.dtype) if needs[1] else None
    noise = _noise(keep, low, cdt)
    term = torch.matmul(du, _cast(a, cdt))
    d_in.add_(term if noise is None else term.mul_(noise))
    da = (torch.matmul(_flat(du).t(), _flat(x_in if noise is None else x_in * noise)).to(a.dtype)
          if needs[0] else None)
    return da, db


def _column_terms(dz: list[torch.Tensor], lows, pairs, kept, needs: list[tuple[bool, bool]], cdt: torch.dtype):
    """The updates' share of the column-parallel backward, for column_parallel_backward to run with the
    projections' own: per adapted projection the pair (dU, A) with dU = scale dZ B ([b, s, r], partial over
    TP: this rank's output rows), its dropout multiplier as the input mask, and dB = scale dZ^T u.
    Returns the extra (grads, weights, needs, masks), the adapted projections' indices and the dB list."""
    grads, weights, need_a, masks, adapted = [], [], [], [], []
    dbs: list[Optional[torch.Tensor]] = [None] * len(dz)
    for i, (g, low, (a, b), (u, keep), (na, nb)) in enumerate(zip(dz, lows, pairs, kept, needs)):
        if low is None:
            continue
        grads.append(torch.matmul(g, _cast(b, cdt)).mul_(low.scale))
        dbs[i] = torch.matmul(_flat(g).t(), _flat(u)).mul_(low.scale).to(b.dtype) if nb else None
        weights.append(a)
        need_a.append(na)
        masks.append(_noise(keep, low, cdt))
        adapted.append(i)
    return grads, weights, need_a, masks, adapted, dbs


def _interleave(das: list[Optional[torch.Tensor]], dbs: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    return [t for pair in zip(das, dbs) for t in pair]


def _adapter_needs(needs: tuple[bool, ...], first: int, n: int) -> list[tuple[bool, bool]]:
    """(A needs a gradient, B needs one) per projection; the trailing inputs start at index `first`."""
    return [(first + 2 * i < len(needs) and needs[first + 2 * i],
             first + 2 * i + 1 < len(needs) and needs[first + 2 * i + 1]) for i in range(n)]


def _column_backward_with_updates(dz: list[torch.Tensor], weights: list[torch.Tensor], gather: comm.Pending,
                                  spec: LayerSpec, needs_w: list[bool], lows, pairs, kept,
                                  needs_ab: list[tuple[bool, bool]]):
    """column_parallel_backward over the projections and their updates' (dU, A) pairs together: the updates'
    input gradients join dgrad before the one TP reduction, dA_i = dU_i^T (X * noise_i) is computed with the
    weight gradients while it is in flight (A's hook then sums it over TP). Returns dX, the weight gradients
    and the (dA, dB) of every projection, interleaved."""
    grads, extra_w, need_a, masks, adapted, dbs = _column_terms(dz, lows, pairs, kept, needs_ab, spec.compute_dtype)
    n = len(weights)
    dx, dws = _column_backward(list(dz) + grads, list(weights) + extra_w, gather, spec, needs_w + need_a,
                               [None] * n + masks if adapted else None)
    das: list[Optional[torch.Tensor]] = [None] * n
    for i, da in zip(adapted, dws[n:]):
        das[i] = da
    return dx, dws[:n], _interleave(das, dbs)


class _AttentionHalf(torch.autograd.Function):
    """h = x + Wo attn(...); trailing inputs: (A, B) of wq, wk, wv, wo (None where not adapted), `lows`
    their LowRankSpecs."""

    @staticmethod
    def forward(ctx, x, norm_w, wq, wk, wv, wo, cos, sin, spec: LayerSpec, lows=(None,) * 4, *ab):
        cdt = spec.compute_dtype
        pairs = _pairs(ab, 4)
        with torch.autocast(x.device.type, enabled=False):
            n1 = rms_norm(x, norm_w, spec.eps)[0].to(cdt)
            full = _gather_input(n1, spec, FWD).wait()
            b, s = full.shape[:2]
            qkv, kept = _column_forward(full, (wq, wk, wv), lows[:3], pairs[:3], cdt)
            q, k, v = (t.view(b, s, -1, spec.head_dim) for t in qkv)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            state = attention_forward(q, k, v, spec.kernel, spec.documents)
            o = state.out.reshape(b, s, -1)
            y, u_o, keep_o = _row_forward(o, wo, lows[3], pairs[3], spec)
            h = x + y
        kept.append((u_o, keep_o))
        ctx.save_for_backward(x, norm_w, wq, wk, wv, wo, q, k, v, o, state.lse, cos, sin,
                              *(t for pair in pairs for t in pair), *(t for pair in kept for t in pair))
        ctx.spec, ctx.extras, ctx.lows = spec, state.extras, lows
        return h

    @staticmethod
    def backward(ctx, dh):
        x, norm_w, wq, wk, wv, wo, q, k, v, o, lse, cos, sin, *rest = ctx.saved_tensors
        pairs, kept = _pairs(rest[:8], 4), _pairs(rest[8:], 4)
        spec, needs, lows = ctx.spec, ctx.needs_input_grad, ctx.lows
        needs_ab = _adapter_needs(needs, 10, 4)
        cdt = spec.compute_dtype
        g = _output_grad(dh, spec)
        n1, normed, rstd = rms_norm(x, norm_w, spec.eps)
        gather = _gather_input(n1.to(cdt), spec, BWD)
        b, s = g.shape[:2]
        d_o = torch.matmul(g, _cast(wo, cdt))
        dwo = torch.matmul(_flat(g).t(), _flat(o)).to(wo.dtype) if needs[5] else None
        dab_o = (_row_backward(g, o, d_o, lows[3], pairs[3], *kept[3], needs_ab[3], cdt) if lows[3] is not None
                 else NOT_ADAPTED)
        state = AttentionState(spec.kernel, o.view(b, s, -1, spec.head_dim), lse, ctx.extras, spec.documents)
        dq, dk, dv = attention_backward(d_o.view(b, s, -1, spec.head_dim), q, k, v, state)
        dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
        dn, (dwq, dwk, dwv), dab = _column_backward_with_updates(
            [t.reshape(b, s, -1) for t in (dq, dk, dv)], [wq, wk, wv], gather, spec, list(needs[2:5]),
            lows[:3], pairs[:3], kept[:3], needs_ab[:3])
        dx, dnorm = rms_norm_backward(dn, x, normed, rstd, norm_w, needs[1])
        return dh + dx, dnorm, dwq, dwk, dwv, dwo, None, None, None, None, *dab, *dab_o


class _MLPHalf(torch.autograd.Function):
    """y = h + W2 (silu(W1 n2) * W3 n2); trailing inputs: (A, B) of w1, w3, w2 (None where not adapted),
    `lows` their LowRankSpecs."""

    @staticmethod
    def forward(ctx, h, norm_w, w1, w3, w2, spec: LayerSpec, lows=(None,) * 3, *ab):
        cdt = spec.compute_dtype
        pairs = _pairs(ab, 3)
        with torch.autocast(h.device.type, enabled=False):
            n2 = rms_norm(h, norm_w, spec.eps)[0].to(cdt)
            full = _gather_input(n2, spec, FWD).wait()
            (a, u), kept = _column_forward(full, (w1, w3), lows[:2], pairs[:2], cdt)
            z, u_2, keep_2 = _row_forward(swiglu(a, u), w2, lows[2], pairs[2], spec)
            y = h + z
        kept.append((u_2, keep_2))
        ctx.save_for_backward(h, norm_w, w1, w3, w2, a, u,
                              *(t for pair in pairs for t in pair), *(t for pair in kept for t in pair))
        ctx.spec, ctx.lows = spec, lows
        return y

    @staticmethod
    def backward(ctx, dy):
        h, norm_w, w1, w3, w2, a, u, *rest = ctx.saved_tensors
        pairs, kept = _pairs(rest[:6], 3), _pairs(rest[6:], 3)
        spec, needs, lows = ctx.spec, ctx.needs_input_grad, ctx.lows
        needs_ab = _adapter_needs(needs, 7, 3)
        cdt = spec.compute_dtype
        g = _output_grad(dy, spec)
        n2, normed, rstd = rms_norm(h, norm_w, spec.eps)
        gather = _gather_input(n2.to(cdt), spec, BWD)
        dp = torch.matmul(g, _cast(w2, cdt))
        p = swiglu(a, u) if needs[4] or lows[2] is not None else None
        dw2 = torch.matmul(_flat(g).t(), _flat(p)).to(w2.dtype) if needs[4] else None
        dab_2 = (_row_backward(g, p, dp, lows[2], pairs[2], *kept[2], needs_ab[2], cdt) if lows[2] is not None
                 else NOT_ADAPTED)
        da, du = swiglu_backward(dp, a, u)
        dn, (dw1, dw3), dab = _column_backward_with_updates([da, du], [w1, w3], gather, spec, list(needs[2:4]),
                                                            lows[:2], pairs[:2], kept[:2], needs_ab[:2])
        dh, dnorm = rms_norm_backward(dn, h, normed, rstd, norm_w, needs[1])
        return dy + dh, dnorm, dw1, dw3, dw2, None, None, *dab, *dab_2


def layer_spec(block: "SelectiveBlock", x: torch.Tensor, documents: Optional[DocumentMask] = None) -> LayerSpec:
    """The spec of `block` for an input like x (and packed documents)."""
    attn, tp = block.attention, block.tp
    device = x.device
    cdt = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else attn.wq.weight.dtype
    backend = resolve_attention_backend(attn.backend, device)
    return LayerSpec(eps=block.attention_norm.eps, head_dim=attn.head_dim,
                     kernel=select_kernel(backend, device, cdt, attn.head_dim, documents is not None),
                     group=None if tp is None else tp.group,
                     sequence_parallel=bool(tp is not None and tp.sequence_parallel and comm.group_size(tp.group) > 1),
                     overlap=True if tp is None else tp.overlap, compute_dtype=cdt, documents=documents)


class SelectiveBlock(TransformerBlock):
    """TransformerBlock whose training forward runs the two hand-written functions (activation mode `selective`).

    `tp`: the TP group and settings of a tensor-parallel model's block (llama_pt.parallel.tp_context), None
    in one process. Decoding with a KV cache and forwards without gradient take the plain path (nothing is
    saved there).
    """

    def __init__(self, attention_norm, attention, ffn_norm, feed_forward, tp: Optional[TPContext] = None):
        super().__init__(attention_norm, attention, ffn_norm, feed_forward)
        self.tp = tp

    def forward(self, x, cos, sin, start_pos: int = 0, cache=None, documents=None):
        if cache is not None or start_pos != 0 or not torch.is_grad_enabled():
            return super().forward(x, cos, sin, start_pos, cache, documents)
        spec = layer_spec(self, x, documents)
        attn, ffn = self.attention, self.feed_forward
        lows, ab = _low_rank_inputs((attn.wq, attn.wk, attn.wv, attn.wo))
        h = _AttentionHalf.apply(x, self.attention_norm.weight, attn.wq.weight, attn.wk.weight, attn.wv.weight,
                                 attn.wo.weight, cos, sin, spec, lows, *ab)
        lows, ab = _low_rank_inputs((ffn.w1, ffn.w3, ffn.w2))
        return _MLPHalf.apply(h, self.ffn_norm.weight, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight, spec, lows, *ab)
