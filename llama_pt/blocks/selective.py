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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..model.llama import TransformerBlock, _at_least_fp32, apply_rope
from ..ops.attention import resolve_attention_backend
from ..ops.attention_kernels import AttentionState, attention_backward, attention_forward, select_kernel
from ..parallel import comm
from ..parallel.comm import BWD, FWD
from ..parallel.layers import TPContext, column_parallel_backward


@dataclass(frozen=True)
class LayerSpec:
    """What a layer call needs besides tensors: shapes, the attention kernel, the TP layout, the matmul dtype."""
    eps: float
    head_dim: int
    kernel: str
    group: Optional[object]  # the TP process group; None for one process
    sequence_parallel: bool
    overlap: bool
    compute_dtype: torch.dtype


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
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
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
                     spec: LayerSpec, needs: list[bool]) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    return column_parallel_backward(grads, weights, gather, spec.group, spec.sequence_parallel, spec.overlap,
                                    spec.compute_dtype, needs)


class _AttentionHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_w, wq, wk, wv, wo, cos, sin, spec: LayerSpec):
        cdt = spec.compute_dtype
        with torch.autocast(x.device.type, enabled=False):
            n1 = rms_norm(x, norm_w, spec.eps)[0].to(cdt)
            full = _gather_input(n1, spec, FWD).wait()
            b, s = full.shape[:2]
            q, k, v = (F.linear(full, _cast(w, cdt)).view(b, s, -1, spec.head_dim) for w in (wq, wk, wv))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            state = attention_forward(q, k, v, spec.kernel)
            o = state.out.reshape(b, s, -1)
            h = x + _reduce_output(F.linear(o, _cast(wo, cdt)), spec)
        ctx.save_for_backward(x, norm_w, wq, wk, wv, wo, q, k, v, o, state.lse, cos, sin)
        ctx.spec, ctx.extras = spec, state.extras
        return h

    @staticmethod
    def backward(ctx, dh):
        x, norm_w, wq, wk, wv, wo, q, k, v, o, lse, cos, sin = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        g = _output_grad(dh, spec)
        n1, normed, rstd = rms_norm(x, norm_w, spec.eps)
        gather = _gather_input(n1.to(spec.compute_dtype), spec, BWD)
        b, s = g.shape[:2]
        d_o = torch.matmul(g, _cast(wo, spec.compute_dtype))
        dwo = torch.matmul(_flat(g).t(), _flat(o)).to(wo.dtype) if needs[5] else None
        state = AttentionState(spec.kernel, o.view(b, s, -1, spec.head_dim), lse, ctx.extras)
        dq, dk, dv = attention_backward(d_o.view(b, s, -1, spec.head_dim), q, k, v, state)
        dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
        dn, (dwq, dwk, dwv) = _column_backward([t.reshape(b, s, -1) for t in (dq, dk, dv)], [wq, wk, wv],
                                               gather, spec, list(needs[2:5]))
        dx, dnorm = rms_norm_backward(dn, x, normed, rstd, norm_w, needs[1])
        return dh + dx, dnorm, dwq, dwk, dwv, dwo, None, None, None


class _MLPHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, norm_w, w1, w3, w2, spec: LayerSpec):
        cdt = spec.compute_dtype
        with torch.autocast(h.device.type, enabled=False):
            n2 = rms_norm(h, norm_w, spec.eps)[0].to(cdt)
            full = _gather_input(n2, spec, FWD).wait()
            a, u = F.linear(full, _cast(w1, cdt)), F.linear(full, _cast(w3, cdt))
            y = h + _reduce_output(F.linear(swiglu(a, u), _cast(w2, cdt)), spec)
        ctx.save_for_backward(h, norm_w, w1, w3, w2, a, u)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, dy):
        h, norm_w, w1, w3, w2, a, u = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        g = _output_grad(dy, spec)
        n2, normed, rstd = rms_norm(h, norm_w, spec.eps)
        gather = _gather_input(n2.to(spec.compute_dtype), spec, BWD)
        dp = torch.matmul(g, _cast(w2, spec.compute_dtype))
        dw2 = torch.matmul(_flat(g).t(), _flat(swiglu(a, u))).to(w2.dtype) if needs[4] else None
        da, du = swiglu_backward(dp, a, u)
        dn, (dw1, dw3) = _column_backward([da, du], [w1, w3], gather, spec, list(needs[2:4]))
        dh, dnorm = rms_norm_backward(dn, h, normed, rstd, norm_w, needs[1])
        return dy + dh, dnorm, dw1, dw3, dw2, None


def layer_spec(block: "SelectiveBlock", x: torch.Tensor) -> LayerSpec:
    """The spec of `block` for an input like x."""
    attn, tp = block.attention, block.tp
    device = x.device
    cdt = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else attn.wq.weight.dtype
    backend = resolve_attention_backend(attn.backend, device)
    return LayerSpec(eps=block.attention_norm.eps, head_dim=attn.head_dim,
                     kernel=select_kernel(backend, device, cdt, attn.head_dim),
                     group=None if tp is None else tp.group,
                     sequence_parallel=bool(tp is not None and tp.sequence_parallel and comm.group_size(tp.group) > 1),
                     overlap=True if tp is None else tp.overlap, compute_dtype=cdt)


class SelectiveBlock(TransformerBlock):
    """TransformerBlock whose training forward runs the two hand-written functions (activation mode `selective`).

    `tp`: the TP group and settings of a tensor-parallel model's block (llama_pt.parallel.tp_context), None
    in one process. Decoding with a KV cache and forwards without gradient take the plain path (nothing is
    saved there).
    """

    def __init__(self, attention_norm, attention, ffn_norm, feed_forward, tp: Optional[TPContext] = None):
        super().__init__(attention_norm, attention, ffn_norm, feed_forward)
        self.tp = tp

    def forward(self, x, cos, sin, start_pos: int = 0, cache=None):
        if cache is not None or start_pos != 0 or not torch.is_grad_enabled():
            return super().forward(x, cos, sin, start_pos, cache)
        spec = layer_spec(self, x)
        attn, ffn = self.attention, self.feed_forward
        h = _AttentionHalf.apply(x, self.attention_norm.weight, attn.wq.weight, attn.wk.weight, attn.wv.weight,
                                 attn.wo.weight, cos, sin, spec)
        return _MLPHalf.apply(h, self.ffn_norm.weight, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight, spec)
