"""Causal attention as a forward that returns (output, log-sum-exp) and a separate backward.

The hand-written layer (llama_pt.ops.layer_backward) saves the attention output O and the row-wise
log-sum-exp L of the scaled scores, and in backward hands both back to the kernel's own backward, which
rebuilds the probabilities block by block as exp(S - L): the s x s attention matrix is never stored,
and on GPU never materialised either (Rabe & Staats 2021; Dao et al. 2022, FlashAttention, Alg. 2 and 4;
Touvron et al. 2023, Sec. 2.4, the xformers kernel).

Kernels, chosen by device and backend name (`select_kernel`), never assumed:
- ``xformers``        CUDA: xformers.ops.fmha memory_efficient_attention_forward_requires_grad / _backward
- ``cuda_flash``      CUDA: aten._scaled_dot_product_flash_attention (+ _backward), half precision, head_dim <= 256
- ``cuda_efficient``  CUDA: aten._scaled_dot_product_efficient_attention (+ _backward), any float dtype
- ``cpu_flash``       CPU:  aten._scaled_dot_product_flash_attention_for_cpu (+ _backward), blockwise like the GPU ones
- ``math``            any device: explicit scores, for CPUs whose torch lacks the fused op (and as a reference)

Layout: q [b, s, heads, d], k and v [b, s, kv_heads, d] (grouped-query attention: each kv head serves
heads / kv_heads consecutive query heads; the kernels see expanded copies that live only inside a
call, and the key/value gradients are summed back over each group). The output is [b, s, heads, d];
the log-sum-exp is [b, heads, s'] (s' = s, or s rounded up to a multiple of 32 by the CUDA
memory-efficient kernels), float32 for half-precision inputs, otherwise the input dtype.

Document masking (.documents; Dubey et al. 2024, Sec. 3.2): with a `DocumentMask` every kernel computes
block-diagonal causal attention, and the log-sum-exp is that of each query's visible scores:
- ``xformers``        BlockDiagonalCausalMask over the flattened batch [1, b * s, heads, d]
- ``cuda_flash``      the variable-length kernel (aten._flash_attention_forward / _backward) over the
                      flattened batch, the documents' cumulative lengths in place of a mask; its log-sum-exp
                      is [heads, b * s]
- ``cuda_efficient``  the additive -inf bias [b, heads, s, s] (rows aligned to 16 elements)
- ``cpu_flash``       the additive -inf mask [b, 1, s, s] in the scores' dtype (is_causal off)
- ``math``            the boolean block-diagonal causal mask on the explicit scores
`select_kernel(..., documents=True)` picks cuda_flash only where this torch has the variable-length op.
`KernelAttention` is a kernel's forward and backward as an autograd function, for the plain model path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .attention import _expand_kv, xformers_available
from .documents import DocumentMask

KERNELS = ("xformers", "cuda_flash", "cuda_efficient", "cpu_flash", "math")


def _has_aten(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def select_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                  documents: bool = False) -> str:
    """The kernel for a resolved backend name ("sdpa" or "xformers") on this device and dtype; `documents`:
    for a document mask (flash attention then needs its variable-length op)."""
    if backend not in ("sdpa", "xformers"):
        raise ValueError(f"attention backend {backend!r} must be resolved to 'sdpa' or 'xformers' first")
    if device.type == "cuda":
        if backend == "xformers":
            if not xformers_available():
                raise ValueError("model.attention=xformers needs CUDA and an importable xformers")
            return "xformers"
        half = dtype in (torch.float16, torch.bfloat16)
        sm80 = torch.cuda.get_device_capability(device) >= (8, 0)
        varlen = not documents or _has_aten("_flash_attention_forward")
        flash = half and sm80 and head_dim <= 256 and head_dim % 8 == 0 and varlen
        return "cuda_flash" if flash else "cuda_efficient"
    if backend == "xformers":
        raise ValueError(f"model.attention=xformers has no kernel on {device.type}")
    return "cpu_flash" if _has_aten("_scaled_dot_product_flash_attention_for_cpu") else "math"


@dataclass
class AttentionState:
    """What the backward needs besides q, k, v: the output, the log-sum-exp and the kernel's extras
    (random-number state, sequence bookkeeping; a few scalars, no activation-sized tensor)."""
    kernel: str
    out: torch.Tensor  # [b, s, heads, d]
    lse: torch.Tensor  # [b, heads, s'] ([heads, b * s] for cuda_flash with documents)
    extras: tuple[Any, ...] = field(default_factory=tuple)
    documents: Optional[DocumentMask] = None  # shared by every layer of the forward pass


def _heads_first(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[b, s, h, d] -> [b, h, s, d] views (the aten kernels' logical layout)."""
    return [x.transpose(1, 2) for x in xs]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str,
                      documents: Optional[DocumentMask] = None) -> AttentionState:
    """Causal softmax(q k^T / sqrt(d)) v with the log-sum-exp of each query row's scaled scores; with
    `documents`, each query sees only the keys of its own document."""
    n_rep = q.shape[2] // k.shape[2]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    b, s, heads, d = q.shape
    if kernel == "xformers":
        from xformers.ops import fmha
        mask = _xformers_mask(documents)
        if documents is None:
            out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=mask)
            return AttentionState(kernel, out, lse)
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(*_flat(q, k, v), attn_bias=mask)
        return AttentionState(kernel, out.view(b, s, heads, d), lse, (), documents)
    if kernel == "cuda_flash" and documents is not None:
        cu, longest = documents.cu_seqlens()
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            *(t.reshape(b * s, heads, d) for t in (q, k, v)), cu, cu, longest, longest, 0.0, True, False)
        return AttentionState(kernel, out.view(b, s, heads, d), lse, (rng_state, unused), documents)
    qh, kh, vh = _heads_first(q, k, v)
    if kernel == "cuda_flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            qh, kh, vh, 0.0, True, False)
        extras = (cum_q, cum_k, max_q, max_k, seed, offset)
    elif kernel == "cuda_efficient":
        bias = _efficient_bias(documents, qh)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            qh, kh, vh, bias, True, 0.0, documents is None)
        extras = (seed, offset)
    elif kernel == "cpu_flash":
        mask = None if documents is None else documents.additive(qh.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kh, vh, 0.0, documents is None, attn_mask=mask)
        extras = ()
    elif kernel == "math":
        out, lse = _math_forward(qh, kh, vh, documents)
        extras = ()
    else:
        raise ValueError(f"unknown attention kernel {kernel!r} (known: {', '.join(KERNELS)})")
    return AttentionState(kernel, out.transpose(1, 2), lse, extras, documents)


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       state: AttentionState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (k and v with their own, possibly fewer, heads) from the saved output and log-sum-exp."""
    kv_heads = k.shape[2]
    n_rep = q.shape[2] // kv_heads
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    kernel, out, lse, documents = state.kernel, state.out, state.lse, state.documents
    b, s, heads, d = q.shape
    if kernel == "xformers":
        from xformers.ops import fmha
        mask = _xformers_mask(documents)
        if documents is None:
            dq, dk, dv = fmha.memory_efficient_attention_backward(grad_out, out, lse, q, k, v, attn_bias=mask)
        else:
            g, o, q1, k1, v1 = _flat(grad_out, out, q, k, v)
            dq, dk, dv = (t.view(b, s, heads, d) for t in
                          fmha.memory_efficient_attention_backward(g, o, lse, q1, k1, v1, attn_bias=mask))
    elif kernel == "cuda_flash" and documents is not None:
        cu, longest = documents.cu_seqlens()
        rng_state, unused = state.extras
        grads = torch.ops.aten._flash_attention_backward(
            *(t.reshape(b * s, heads, d) for t in (grad_out, q, k, v, out)), lse, cu, cu, longest, longest, 0.0,
            True, rng_state, unused)
        dq, dk, dv = (t.view(b, s, heads, d) for t in grads)
    else:
        gh, qh, kh, vh, oh = _heads_first(grad_out, q, k, v, out)
        if kernel == "cuda_flash":
            cum_q, cum_k, max_q, max_k, seed, offset = state.extras
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                gh, qh, kh, vh, oh, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
        elif kernel == "cuda_efficient":
            seed, offset = state.extras
            grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                gh, qh, kh, vh, _efficient_bias(documents, qh), oh, lse, seed, offset, 0.0, [True, True, True, False],
                documents is None)[:3]
        elif kernel == "cpu_flash":
            mask = None if documents is None else documents.additive(qh.dtype)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                gh, qh, kh, vh, oh, lse, 0.0, documents is None, attn_mask=mask)
        elif kernel == "math":
            grads = _math_backward(gh, qh, kh, vh, oh, lse, documents)
        else:
            raise ValueError(f"unknown attention kernel {kernel!r} (known: {', '.join(KERNELS)})")
        dq, dk, dv = (g.transpose(1, 2) for g in grads)
    return dq, _sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads)


class KernelAttention(torch.autograd.Function):
    """A kernel's forward and backward as one autograd function: q, k, v [b, s, heads or kv, d] -> out."""

    @staticmethod
    def forward(ctx, q, k, v, kernel: str, documents: Optional[DocumentMask] = None):
        state = attention_forward(q, k, v, kernel, documents)
        ctx.save_for_backward(q, k, v, state.out, state.lse)
        ctx.kernel, ctx.extras, ctx.documents = kernel, state.extras, documents
        return state.out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        state = AttentionState(ctx.kernel, out, lse, ctx.extras, ctx.documents)
        return (*attention_backward(grad_out.contiguous(), q, k, v, state), None, None)


def _flat(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[b, s, h, d] -> [1, b * s, h, d]: the flattened batch a block-diagonal mask describes."""
    return [x.reshape(1, -1, *x.shape[2:]) for x in xs]


def _xformers_mask(documents: Optional[DocumentMask]):
    from xformers.ops import fmha
    if documents is None:
        return fmha.LowerTriangularMask()
    return fmha.BlockDiagonalCausalMask.from_seqlens(documents.lengths())


def _efficient_bias(documents: Optional[DocumentMask], qh: torch.Tensor) -> Optional[torch.Tensor]:
    """The memory-efficient kernel's attention bias [b, heads, s, s] (None: its own causal mask)."""
    if documents is None:
        return None
    b, heads, s, _ = qh.shape
    return documents.additive(qh.dtype, key_align=16).expand(b, heads, s, s)


def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Adjoint of _expand_kv: [b, s, kv * n_rep, d] -> [b, s, kv, d], summing each kv head's query group."""
    b, s, heads, d = grad.shape
    if heads == kv_heads:
        return grad
    return grad.reshape(b, s, kv_heads, heads // kv_heads, d).sum(3)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _math_scores(q: torch.Tensor, k: torch.Tensor, documents: Optional[DocumentMask]) -> torch.Tensor:
    s = q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    visible = torch.ones(s, s, dtype=torch.bool, device=q.device).tril() if documents is None else documents.visible()
    return scores.masked_fill(~visible, float("-inf"))


def _math_forward(q, k, v, documents: Optional[DocumentMask] = None):
    """[b, h, s, d] inputs; computed in at least float32; the output in q's dtype."""
    q_, k_, v_ = (x.to(_compute_dtype(q)) for x in (q, k, v))
    scores = _math_scores(q_, k_, documents)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v_).to(q.dtype), lse


def _math_backward(grad_out, q, k, v, out, lse, documents: Optional[DocumentMask] = None):
    """FlashAttention's backward (Dao et al. 2022, Alg. 4) in one block: P = exp(S - L),
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)."""
    compute = lse.dtype
    q32, k32, v32, g32, o32 = (x.to(compute) for x in (q, k, v, grad_out, out))
    probs = torch.exp(_math_scores(q32, k32, documents) - lse[..., None])
    dv = torch.matmul(probs.transpose(-1, -2), g32)
    dp = torch.matmul(g32, v32.transpose(-1, -2))
    ds = probs * (dp - (g32 * o32).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
    dq, dk = torch.matmul(ds, k32), torch.matmul(ds.transpose(-1, -2), q32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
