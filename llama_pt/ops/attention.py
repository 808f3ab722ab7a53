"""Causal self-attention kernels, chosen by name.

Backends:
- ``xformers``: xformers' memory-efficient attention with a causal mask (CUDA only).
- ``sdpa``: torch.nn.functional.scaled_dot_product_attention (flash / efficient kernels on CUDA,
  a fused math kernel on CPU).
- ``auto``: xformers on CUDA when importable, otherwise sdpa.

Tensors are [batch, seq, heads, head_dim]; keys and values may have fewer (grouped) heads.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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
                     q_offset: int = 0) -> torch.Tensor:
    """Softmax(QK^T / sqrt(d)) V with query i (at absolute position q_offset + i) seeing keys <= it."""
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
