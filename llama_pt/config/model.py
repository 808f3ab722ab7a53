"""Model hyper-parameters, the sizes derived from them, and the named presets.

Touvron et al. 2023 (LLaMA), Section 2.2: pre-normalisation with RMSNorm, SwiGLU with a hidden size
of 2/3 * 4d (rounded up to a multiple of `multiple_of`), rotary embeddings. Llama-2/3 add grouped-query
attention (`n_kv_heads`) and `ffn_dim_multiplier`.

Vocabulary padding: the embedding and the output head have `padded_vocab_size` rows, `vocab_size` rounded up
to a multiple of `vocab_multiple` (Megatron's make-vocab-size-divisible-by), so that a vocabulary grown to a
new tokenizer (Cui et al. 2023, Chinese-LLaMA: 32000 + 17953 pieces) still splits over tensor-parallel
ranks. Rows from `vocab_size` on are padding: zero, never looked up, their logits masked out of the loss,
perplexity and sampling (llama_pt.model.vocab), and left out of Hugging Face folders.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from .fields import ConfigError, reject_unknown_fields


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    init_std: float = 0.02
    vocab_multiple: int = 64

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4d, scaled by ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first invalid field."""
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "vocab_multiple"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be positive")
        if self.dim % self.n_heads:
            raise ConfigError(f"{prefix}.n_heads={self.n_heads} does not divide {prefix}.dim={self.dim}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.dim/{prefix}.n_heads={self.head_dim} must be even for RoPE")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{prefix}.n_heads={self.n_heads} is not a multiple of {prefix}.n_kv_heads={self.kv_heads}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ConfigError(f"{prefix}.ffn_dim_multiplier={self.ffn_dim_multiplier} must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], prefix: str = "model") -> "ModelConfig":
        reject_unknown_fields(cls, values, prefix)
        return cls(**values).validate(prefix)

    @classmethod
    def from_stored(cls, values: dict[str, Any], prefix: str = "model") -> "ModelConfig":
        """The config a checkpoint stored. One written before vocabulary padding existed has no vocab_multiple
        and tables of exactly vocab_size rows: it gets the default (64) when that pads nothing, so that it equals
        a config left at the default, else 1."""
        if "vocab_multiple" not in values:
            default = cls.vocab_multiple
            values = {**values, "vocab_multiple": default if values.get("vocab_size", 0) % default == 0 else 1}
        return cls.from_dict(values, prefix)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of `Llama(cfg)` from the config alone (untied embedding and head, padding rows
    included)."""
    d, hd = cfg.dim, cfg.head_dim
    attention = d * (cfg.n_heads * hd) + 2 * d * (cfg.kv_heads * hd) + (cfg.n_heads * hd) * d
    ffn = 3 * d * cfg.ffn_hidden_dim
    norms = 2 * d
    per_layer = attention + ffn + norms
    return cfg.n_layers * per_layer + 2 * cfg.padded_vocab_size * d + d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (N without the embedding lookup) plus attention.

    The attention term is 12 * n_layers * dim * seq_len (PaLM, Chowdhery et al. 2022, Appendix B:
    QK^T and AV, forward and backward, without exploiting the causal mask).
    """
    n_matmul = count_parameters(cfg) - cfg.padded_vocab_size * cfg.dim
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


# ---- presets: LLaMA-1 sizes are the paper's Table 2 (dim, heads, layers); Llama-2 and Llama-3 follow
# their released configurations. The small presets exist for tests and the CPU demo.
_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)

PRESETS: dict[str, ModelConfig] = {
    "llama1_7b": ModelConfig(dim=4096, n_heads=32, n_layers=32, **_LLAMA1),
    "llama1_13b": ModelConfig(dim=5120, n_heads=40, n_layers=40, **_LLAMA1),
    "llama1_33b": ModelConfig(dim=6656, n_heads=52, n_layers=60, **_LLAMA1),
    "llama1_65b": ModelConfig(dim=8192, n_heads=64, n_layers=80, **_LLAMA1),
    "llama2_7b": ModelConfig(dim=4096, n_heads=32, n_layers=32, **_LLAMA2),
    "llama2_13b": ModelConfig(dim=5120, n_heads=40, n_layers=40, **_LLAMA2),
    "llama2_70b": ModelConfig(dim=8192, n_heads=64, n_kv_heads=8, n_layers=80, ffn_dim_multiplier=1.3,
                              **{**_LLAMA2, "multiple_of": 4096}),
    "llama3_8b": ModelConfig(dim=4096, n_heads=32, n_kv_heads=8, n_layers=32, vocab_size=128256,
                             multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                             rope_theta=500000.0, max_seq_len=8192),
    # ~125M and ~1B shapes for benchmarks (GPT-3 small / TinyLlama-like proportions).
    "llama_125m": ModelConfig(dim=768, n_heads=12, n_layers=12, **_LLAMA1),
    "llama_1b": ModelConfig(dim=2048, n_heads=16, n_layers=22, **_LLAMA1),
    # Tiny shapes for tests and the CPU demo.
    "tiny": ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=512, multiple_of=32,
                        max_seq_len=256),
    "demo": ModelConfig(dim=128, n_heads=4, n_layers=4, vocab_size=1024, multiple_of=64,
                        max_seq_len=256),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]
