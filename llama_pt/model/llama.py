"""The LLaMA decoder in plain PyTorch (Touvron et al. 2023, Section 2.2).

Read top to bottom: RMSNorm, rotary embeddings, attention with grouped key/value heads, the SwiGLU
feed-forward, the pre-norm block, and the model. Parallelism and the activation modes are applied from
outside (llama_pt.parallel, llama_pt.blocks) by replacing submodules, found by their paths
(llama_pt.model.module_plan); nothing here knows about them. Every linear layer is an attribute of its
parent (`layers.3.attention.wq`), which is where a tensor-parallel shard or an adapter takes its place;
modules are built from their parts so that a replacement can be assembled from an existing one.

Rotary embeddings use the "rotate half" pairing (dimension i with i + head_dim/2), the layout of
Hugging Face's LlamaForCausalLM, so weights move between the two without permutation.

Packed documents (Llama 3, Dubey et al. 2024, Sec. 3.2): `Llama.forward` optionally takes each token's
position (its RoPE angle is looked up per token) and the document each token belongs to (attention stays
inside a document: llama_pt.ops.documents), so that several documents in one row compute what each
computes alone.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import causal_attention
from ..ops.documents import DocumentMask
from ..config import ModelConfig


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are upcast for norms and rotations; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in at least float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), each [max_seq_len, head_dim] (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [b, s, heads, head_dim] by per-position angles; cos/sin are [s, head_dim], or [b, s, head_dim]
    when each row has its own positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over the heads
    return (_at_least_fp32(x) * cos + _at_least_fp32(rotated) * sin).type_as(x)


@dataclass
class KVCache:
    """Keys and values of one layer for incremental decoding: [batch, max_len, kv_heads, head_dim]."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class Attention(nn.Module):
    """Causal self-attention over grouped key/value heads, with RoPE on queries and keys."""

    def __init__(self, wq: nn.Module, wk: nn.Module, wv: nn.Module, wo: nn.Module, head_dim: int,
                 backend: str = "sdpa"):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.head_dim = head_dim
        self.backend = backend  # an attention backend name (llama_pt.ops.attention)

    @classmethod
    def build(cls, cfg: ModelConfig) -> "Attention":
        return cls(nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False),
                   nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False),
                   nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False),
                   nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False), cfg.head_dim)

    def project_qkv(self, x):
        """The three input projections, one call: a tensor-parallel subclass fuses their communication here."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None,
                documents: Optional[DocumentMask] = None):
        # Shapes come from the projections, not from x: under sequence parallelism x holds a
        # sequence shard and the (column-parallel) projections return the full sequence.
        q, k, v = self.project_qkv(x)
        b, s = q.shape[:2]
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[:b, start_pos:start_pos + s] = k
            cache.v[:b, start_pos:start_pos + s] = v
            k, v = cache.k[:b, :start_pos + s], cache.v[:b, :start_pos + s]
        out = causal_attention(q, k, v, backend=self.backend, q_offset=start_pos, documents=documents)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    @classmethod
    def build(cls, dim: int, hidden_dim: int) -> "FeedForward":
        return cls(nn.Linear(dim, hidden_dim, bias=False), nn.Linear(hidden_dim, dim, bias=False),
                   nn.Linear(dim, hidden_dim, bias=False))

    def project_in(self, x):
        """Gate and up projections, one call: a tensor-parallel subclass fuses their communication here."""
        return self.w1(x), self.w3(x)

    def forward(self, x):
        gate, up = self.project_in(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + Attn(norm(x)); out = h + FFN(norm(h)).

    Built from its four parts, so a block that computes the same function differently (the activation
    modes of llama_pt.blocks) is made from the parts of this one: `type(block)(*block.parts())`.
    """

    def __init__(self, attention_norm: RMSNorm, attention: Attention, ffn_norm: RMSNorm, feed_forward: FeedForward):
        super().__init__()
        self.attention_norm, self.attention = attention_norm, attention
        self.ffn_norm, self.feed_forward = ffn_norm, feed_forward

    @classmethod
    def build(cls, cfg: ModelConfig) -> "TransformerBlock":
        return cls(RMSNorm(cfg.dim, cfg.norm_eps), Attention.build(cfg), RMSNorm(cfg.dim, cfg.norm_eps),
                   FeedForward.build(cfg.dim, cfg.ffn_hidden_dim))

    def parts(self) -> tuple[RMSNorm, Attention, RMSNorm, FeedForward]:
        return self.attention_norm, self.attention, self.ffn_norm, self.feed_forward

    def forward(self, x, cos, sin, start_pos: int = 0, cache: Optional[KVCache] = None,
                documents: Optional[DocumentMask] = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, cache, documents)
        return h + self.feed_forward(self.ffn_norm(h))


def draw_seed() -> int:
    """A model seed drawn from the global random state (one draw): what `Llama(cfg)` uses when given none,
    so that `torch.manual_seed(s); Llama(cfg)` is the model every layout builds from train.seed=s."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu"))


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter `name` (its full name in the plain model, e.g. "layers.5.attention.wq.weight"):
    a pure function of the model seed and the name (SHA-256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def initial_value(name: str, shape: torch.Size | tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of the parameter `name` of Llama(cfg) for model seed `seed`, in float32 on the CPU
    (the same numbers whatever device the model lives on, whichever process asks).

    GPT-2 / LLaMA style: norm weights are ones; every other weight is Normal(0, init_std), the residual-branch
    outputs (wo, w2) scaled by 1/sqrt(2 * n_layers); drawn from a generator of its own seeded with
    `parameter_seed(seed, name)`. The padding rows of the embedding and the head (ids >= vocab_size,
    llama_pt.model.vocab) are zero and stay zero: never looked up, their logits masked, they get no gradient
    (nor weight decay, being zero)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
    value = torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(parameter_seed(seed, name)))
    if name in ("tok_embeddings.weight", "output.weight"):
        value[cfg.vocab_size:] = 0
    return value


def init_parameters(module: nn.Module, cfg: ModelConfig, seed: int, prefix: str = "") -> None:
    """Every parameter of `module` set to its `initial_value`; `module` is the part of Llama(cfg) at path
    `prefix` ("" for the whole model, "layers.5" for one layer), which makes its parameters' full names."""
    with torch.no_grad():
        for name, p in module.named_parameters(prefix=prefix):
            p.copy_(initial_value(name, p.shape, cfg, seed))


def materialize(module: nn.Module, cfg: ModelConfig, seed: int, device, prefix: str = "") -> nn.Module:
    """A part of Llama(cfg) built on the meta device (no storage), given storage on `device` and its initial
    values (`init_parameters`, for the part at path `prefix`); returns it. Building the model on meta and
    materializing only some parts gives exactly those parts of `Llama(cfg, seed)`, at the memory of the parts."""
    module.to_empty(device=device)
    init_parameters(module, cfg, seed, prefix)
    return module


def set_rope_tables(module: nn.Module, cfg: ModelConfig, device) -> None:
    """(Re)compute the RoPE buffers rope_cos / rope_sin of `module` (a Llama or a pipeline stage) on `device`."""
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    module.rope_cos, module.rope_sin = cos.to(device), sin.to(device)


class Llama(nn.Module):
    """The decoder: embedding, n_layers pre-norm blocks, final norm, head (untied).

    Initial weights (`initial_value`): each parameter from a generator of its own, seeded from the model seed
    and the parameter's name, so every parameter's initial value is the same whichever process builds it and
    whatever the layout (tensor / pipeline / data parallel: llama_pt.train.model_setup builds the model on the
    meta device and materializes only what a rank keeps). `seed` None draws the model seed from the global
    random state (`draw_seed`, one draw, before anything else: the random state after `Llama(cfg)` is that
    after one draw), as other modules draw their initial values from it. On the meta device (`with
    torch.device("meta")`) nothing is initialised nor drawn: see `materialize`.

    (Before this rule the whole model was drawn from the global random state in parameter order; the
    distribution of every weight is unchanged, the numbers for a given seed are not.)
    """

    def __init__(self, cfg: ModelConfig, seed: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        device = torch.get_default_device()  # meta under `with torch.device("meta")`
        if device.type != "meta" and seed is None:
            seed = draw_seed()  # the only draw: the modules below are made on meta, then given their values
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
            self.layers = nn.ModuleList(TransformerBlock.build(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if device.type != "meta":
            materialize(self, cfg, seed, device)
            set_rope_tables(self, cfg, device)

    def reset_parameters(self, seed: int) -> None:
        """Every parameter to its initial value for model seed `seed` (`initial_value`)."""
        init_parameters(self, self.cfg, seed)

    def set_attention_backend(self, backend: str) -> None:
        for layer in self.layers:
            layer.attention.backend = backend

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: Optional[list[KVCache]] = None,
                positions: Optional[torch.Tensor] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [batch, seq, padded vocab] for tokens [batch, seq] placed at positions start_pos...; those of
        the padding ids are not masked here (llama_pt.model.vocab.mask_padded_vocab).

        positions [batch, seq]: each token's own RoPE position instead (e.g. restarting in every document);
        documents [batch, seq]: the document of each token, a new value starting a new document; a token
        attends only to the earlier tokens of its own document (llama_pt.ops.documents)."""
        s = tokens.shape[1]
        if start_pos + s > self.cfg.max_seq_len:
            raise ValueError(f"sequence end {start_pos + s} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[start_pos:start_pos + s], self.rope_sin[start_pos:start_pos + s]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [batch, seq, head_dim]
        mask = None if documents is None else DocumentMask(documents)  # built once, shared by the layers
        h = self.tok_embeddings(tokens)                       # a pipeline's first stage: the embedding,
        for i, layer in enumerate(self.layers):                 # every stage: a contiguous run of layers,
            h = layer(h, cos, sin, start_pos, None if caches is None else caches[i], mask)
        return self.output(self.norm(h))                      # the last stage: the final norm and the head
