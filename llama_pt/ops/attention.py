"""Causal self-attention kernels, chosen by name.

Backends:
- ``xformers``: xformers' memory-efficient attention with a causal mask (CUDA only).
- ``sdpa``: torch.nn.functional.scaled_dot_product_attention (flash / efficient kernels on CUDA,
  a fused math kernel on CPU).
- ``auto``: xformers on CUDA when importable, otherwise sdpa.

Tensors are [batch, seq, heads, head_dim]; keys and values may have fewer (grouped) heads.

With a document mask (.documents, several documents packed into each row) the same backends run
block-diagonal causal attention: xformers with its BlockDiagonalCausalMask over the flattened batch; sdpa
on CUDA with flash attention's variable-length kernel when this torch has it and the dtype and head size
suit it (.attention_kernels `cuda_flash`, through its own backward), otherwise SDPA with the boolean mask
(the memory-efficient kernel on CUDA, the fused math kernel on CPU).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .documents import DocumentMask


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """model.attention (one of llama_pt.config.ATTENTION_BACKENDS) on `device`: `auto` picks xformers on
    CUDA when importable, else sdpa; an explicit xformers needs both."""
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if name == "xformers" and not (device.type == "cuda" and xformers_available()):
        raise ValueError("model.attention=xformers needs CUDA and an importable xformers")
    return name


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, s, kv, d] -> [b, s, kv * n_rep, d], each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    b, s, kv, d = x.shape
    return x[:, :, :, None, :].expand(b, s, kv, n_rep, d).reshape(b, s, kv * n_rep, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
                     q_offset: int = 0, documents: Optional[DocumentMask] = None) -> torch.Tensor:
    """Softmax(QK^T / sqrt(d)) V with query i (at absolute position q_offset + i) seeing keys <= it, and
    with `documents` only those of its own document."""
    if documents is not None:
        if q_offset or q.shape[1] != k.shape[1]:
            raise ValueError("a document mask applies to a whole sequence, not to decoding with a KV cache")
        return _document_attention(q, k, v, backend, documents)
    n_rep = q.shape[2] // k.shape[2]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    if backend == "xformers" and q_offset == 0:
        import xformers.ops as xops
        return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    if q_offset == 0 and sq == sk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        # Decoding with a KV cache: query i sits at position q_offset + i of the key sequence.
        allowed = torch.arange(sk, device=q.device)[None, :] <= (q_offset + torch.arange(sq, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.transpose(1, 2)


def _document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                        documents: DocumentMask) -> torch.Tensor:
    """Block-diagonal causal attention, differentiable by autograd (the module docstring says which kernel)."""
    b, s, heads, d = q.shape
    if backend == "xformers":
        import xformers.ops as xops
        n_rep = heads // k.shape[2]
        flat = [t.reshape(1, b * s, heads, d) for t in (q, _expand_kv(k, n_rep), _expand_kv(v, n_rep))]
        bias = xops.fmha.BlockDiagonalCausalMask.from_seqlens(documents.lengths())
        return xops.memory_efficient_attention(*flat, attn_bias=bias).view(b, s, heads, d)
    if q.device.type == "cuda":
        from .attention_kernels import KernelAttention, select_kernel  # that module builds on this one
        kernel = select_kernel(backend, q.device, q.dtype, d, documents=True)
        if kernel == "cuda_flash":
            return KernelAttention.apply(q, k, v, kernel, documents)
    n_rep = heads // k.shape[2]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.visible()).transpose(1, 2)
