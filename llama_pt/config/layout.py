"""Whether a parallel layout can shard a model over a world of processes: pure arithmetic, torch-free,
checked once when the run's config is resolved (before any process group or model exists)."""
from __future__ import annotations

from .fields import ConfigError
from .model import ModelConfig
from .sections import COMM_BACKENDS, ParallelConfig, TrainConfig, check_choice


def validate_layout(world_size: int, cfg: ParallelConfig, model: ModelConfig, seq_len: int,
                    seq_len_field: str = "seq_len") -> None:
    """Raise ConfigError (one line naming the field) unless `cfg` can shard `model` over `world_size` ranks.

    Pure arithmetic: call it before creating process groups or building the model.
    """
    t, p = cfg.tensor_parallel, cfg.pipeline_parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be positive")
    if world_size % t:
        raise ConfigError(f"parallel.tensor_parallel={t} does not divide the world size {world_size}")
    if world_size % (t * p):
        raise ConfigError(f"parallel.pipeline_parallel={p} x parallel.tensor_parallel={t} does not divide the "
                          f"world size {world_size}")
    if model.n_layers < cfg.model_chunks:
        raise ConfigError(f"model.n_layers={model.n_layers} is fewer than the {cfg.model_chunks} pipeline chunks "
                          f"(parallel.pipeline_parallel={p} x parallel.virtual_stages={cfg.virtual_stages})")
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


def validate_pipeline_run(cfg: ParallelConfig, train: TrainConfig, micro_batches: int) -> None:
    """What a pipeline (parallel.pipeline_parallel > 1) needs from the batch and the run: at least as many
    micro-batches per data-parallel rank as stages under 1F1B (else its warm-up never reaches the steady
    state; Narayanan et al. 2021, Sec. 2.2.1), a multiple of the stages under the interleaved schedule (its
    forward order takes the micro-batches in groups of p, Sec. 2.2.2); and no sampling during training (it runs
    the whole model in one process; evaluation and downstream accuracy run through the stages)."""
    p, schedule = cfg.pipeline_parallel, cfg.pipeline_schedule
    if p == 1:
        return
    if schedule != "gpipe" and micro_batches < p:
        raise ConfigError(f"parallel.pipeline_schedule={schedule} needs at least parallel.pipeline_parallel={p} "
                          f"micro-batches per data-parallel rank, got {micro_batches} (raise "
                          f"train.global_batch_tokens or lower train.micro_batch_size)")
    if schedule == "interleaved_1f1b" and micro_batches % p:
        raise ConfigError(f"parallel.pipeline_schedule=interleaved_1f1b needs micro-batches per data-parallel "
                          f"rank ({micro_batches}) to be a multiple of parallel.pipeline_parallel={p}")
    if cfg.zero_stage > 1 or (cfg.zero_stage and cfg.virtual_stages > 1):
        raise ConfigError(f"parallel.zero_stage={cfg.zero_stage} with parallel.pipeline_parallel={p} and "
                          f"parallel.virtual_stages={cfg.virtual_stages} is not supported (ZeRO-1 with one chunk "
                          f"per stage is; DeepSpeed counts one backward per micro-batch)")
    if train.sample_tokens:
        raise ConfigError(f"train.sample_tokens={train.sample_tokens} is not supported with "
                          f"parallel.pipeline_parallel={p} yet (set it to 0; sample from the exported model)")


def comm_backend(name: str, device_type: str) -> str:
    """parallel.backend on a device of `device_type`: `auto` -> nccl on cuda, gloo elsewhere; nccl needs cuda."""
    check_choice(name, COMM_BACKENDS, "parallel.backend")
    if name == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if name == "nccl" and device_type != "cuda":
        raise ConfigError(f"parallel.backend=nccl needs CUDA, but the device is {device_type}")
    return name


def validate_pipeline_transfers(cfg: ParallelConfig, backend: str) -> None:
    """Refuse the one pipeline layout whose transfers rely on tags NCCL ignores: interleaved 1F1B on two stages,
    where one direction between the two ranks carries both activations and gradients (docs/parallelism.md)."""
    if backend == "nccl" and cfg.pipeline_parallel == 2 and cfg.pipeline_schedule == "interleaved_1f1b":
        raise ConfigError("parallel.pipeline_schedule=interleaved_1f1b with parallel.pipeline_parallel=2 is "
                          "unsupported on nccl (its transfers are matched by tag, which NCCL ignores): use 1f1b, "
                          "or at least 3 stages")
