"""Whether a parallel layout can shard a model over a world of processes: pure arithmetic, torch-free,
checked once when the run's config is resolved (before any process group or model exists)."""
from __future__ import annotations

from .fields import ConfigError
from .model import ModelConfig
from .sections import ParallelConfig


def validate_layout(world_size: int, cfg: ParallelConfig, model: ModelConfig, seq_len: int,
                    seq_len_field: str = "seq_len") -> None:
    """Raise ConfigError (one line naming the field) unless `cfg` can shard `model` over `world_size` ranks.

    Pure arithmetic: call it before creating process groups or building the model.
    """
    t = cfg.tensor_parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be positive")
    if world_size % t:
        raise ConfigError(f"parallel.tensor_parallel={t} does not divide the world size {world_size}")
    if model.dim % t:
        raise ConfigError(f"model.dim={model.dim} is not divisible by parallel.tensor_parallel={t}")
    if model.n_heads % t:
        raise ConfigError(f"model.n_heads={model.n_heads} is not divisible by parallel.tensor_parallel={t}")
    kv = model.kv_heads
    if kv >= t and kv % t:
        raise ConfigError(f"model.n_kv_heads={kv} is not divisible by parallel.tensor_parallel={t}")
    if kv < t and t % kv:
        raise ConfigError(f"parallel.tensor_parallel={t} is not a multiple of model.n_kv_heads={kv} "
                          f"(fewer kv heads than TP ranks are replicated)")
    if model.ffn_hidden_dim % t:
        raise ConfigError(f"model.ffn_hidden_dim={model.ffn_hidden_dim} (from model.dim, multiple_of, "
                          f"ffn_dim_multiplier) is not divisible by parallel.tensor_parallel={t}")
    if model.padded_vocab_size % t:
        raise ConfigError(f"model.vocab_size={model.vocab_size} padded to a multiple of model.vocab_multiple="
                          f"{model.vocab_multiple} ({model.padded_vocab_size}) is not divisible by "
                          f"parallel.tensor_parallel={t}")
    if cfg.sequence_parallel and seq_len % t:
        raise ConfigError(f"{seq_len_field}={seq_len} is not divisible by parallel.tensor_parallel={t} "
                          f"(needed by parallel.sequence_parallel)")
