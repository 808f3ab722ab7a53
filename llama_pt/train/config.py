"""From the composed Hydra config to validated, typed settings — every check before any work starts.

Each failure is one ConfigError line naming the field, e.g.
``train.micro_batch_size=3 does not divide the per-rank batch of 8 sequences``.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from ..model import ConfigError, ModelConfig, get_preset
from ..model.config import reject_unknown_fields
from ..ops.activation_modes import validate_activation_mode
from ..ops.attention import BACKENDS
from ..parallel import ParallelConfig, validate_layout
from .optim import OptimConfig

PRECISIONS = ("auto", "fp32", "bf16")
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int
    global_batch_tokens: int
    micro_batch_size: int
    steps: int
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    ckpt_every: int = 0
    keep_last: int = 3
    resume: str = "auto"
    exit_interval: int = 0
    out_dir: str = "runs/default"
    init_from: Optional[str] = None
    sample_prompt: str = ""
    sample_tokens: int = 0

    @property
    def global_batch_sequences(self) -> int:
        return self.global_batch_tokens // self.seq_len


@dataclass(frozen=True)
class FaultConfig:
    """The `fault:` section: what the trainer does about preemption, hangs and numerical faults."""
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # checkpoint and exit after the step
    collective_timeout_s: float = 600.0  # a rank waiting longer in one collective ends the run (watchdog.py)
    heartbeat_every_s: float = 10.0      # each rank's heartbeat file in <out_dir>/heartbeats
    spike_zscore: float = 6.0            # skip a step whose loss is this many std above the window (0: off)
    spike_window: int = 100              # accepted losses the z-score is computed over
    max_bad_steps: int = 5               # skipped steps in a row before rolling back to a checkpoint (0: never)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    attention: str
    activation: str
    train: TrainConfig
    optim: OptimConfig
    data: dict[str, Any]
    parallel: ParallelConfig
    logging: dict[str, Any]
    fault: FaultConfig = FaultConfig()
    world_size: int = 1  # processes the config was validated for (tensor x data parallel)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.parallel.tensor_parallel

    def grad_accumulation_steps(self, dp_size: Optional[int] = None) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        dp = self.dp_size if dp_size is None else dp_size
        return self.train.global_batch_sequences // (self.train.micro_batch_size * dp)


def _typed(cls, values: Mapping[str, Any], prefix: str):
    reject_unknown_fields(cls, values, prefix)
    known = {f.name: f for f in fields(cls)}
    out = {}
    for name, value in values.items():
        if value is None:
            if known[name].default is None:
                continue
            raise ConfigError(f"{prefix}.{name} must be set")
        if known[name].type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{prefix}.{name}={value!r} must be an integer")
        out[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**out)


def resolve_model(values: Mapping[str, Any], init_from: Optional[str] = None) -> tuple[ModelConfig, str, str]:
    """Base fields (model.preset, or the config of the Hugging Face folder train.init_from) plus the
    non-null field overrides -> ModelConfig; and the attention backend and activation mode names."""
    values = dict(values)
    preset = values.pop("preset", None)
    attention = values.pop("attention", "auto")
    if attention not in BACKENDS:
        raise ConfigError(f"model.attention={attention!r} is unknown (known: {', '.join(BACKENDS)})")
    activation = validate_activation_mode(values.pop("activation", "none"))
    overrides = {k: v for k, v in values.items() if v is not None}
    if init_from is not None:
        base = _hf_model_config(init_from).to_dict()
    else:
        base = get_preset(preset).to_dict() if preset is not None else {}
    base.update(overrides)
    missing = [f.name for f in fields(ModelConfig) if f.default is MISSING and f.name not in base]
    if missing:
        raise ConfigError(f"model.{missing[0]} must be set (or choose model.preset)")
    return ModelConfig.from_dict(base), attention, activation


def _hf_model_config(folder: str) -> ModelConfig:
    from ..hf_interop import model_config_from_hf
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"train.init_from={folder}: no Hugging Face config.json there")
    return model_config_from_hf(json.loads(path.read_text()), where=str(path))


def validate_train(train: TrainConfig, model: ModelConfig, dp_size: int) -> None:
    for name in ("seq_len", "global_batch_tokens", "micro_batch_size", "steps"):
        if getattr(train, name) <= 0:
            raise ConfigError(f"train.{name}={getattr(train, name)} must be positive")
    if train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len={train.seq_len} exceeds the RoPE table of "
                          f"model.max_seq_len={model.max_seq_len}")
    if train.global_batch_tokens % train.seq_len:
        raise ConfigError(f"train.global_batch_tokens={train.global_batch_tokens} is not a multiple of "
                          f"train.seq_len={train.seq_len}")
    per_rank, rem = divmod(train.global_batch_sequences, dp_size)
    if rem:
        raise ConfigError(f"train.global_batch_tokens={train.global_batch_tokens} gives "
                          f"{train.global_batch_sequences} sequences, not divisible by {dp_size} data-parallel ranks")
    if per_rank % train.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={train.micro_batch_size} does not divide the per-rank "
                          f"batch of {per_rank} sequences")
    if train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={train.precision!r} is unknown (known: {', '.join(PRECISIONS)})")
    if train.device not in DEVICES:
        raise ConfigError(f"train.device={train.device!r} is unknown (known: {', '.join(DEVICES)})")
    for name in ("log_every", "eval_every", "ckpt_every", "keep_last", "eval_batches", "sample_tokens", "exit_interval"):
        if getattr(train, name) < 0:
            raise ConfigError(f"train.{name}={getattr(train, name)} must not be negative")


def validate_optim(optim: OptimConfig) -> None:
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr={optim.lr} must be positive")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"optim.betas={list(optim.betas)} must be two numbers in [0, 1)")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1]")
    if optim.warmup_steps < 0 or optim.grad_clip < 0 or optim.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must not be negative")


def validate_fault(fault: FaultConfig) -> None:
    import signal
    if not isinstance(fault.stop_signals, tuple):
        raise ConfigError(f"fault.stop_signals={fault.stop_signals!r} must be a list of signal names, e.g. [SIGTERM]")
    for name in fault.stop_signals:
        if not isinstance(name, str) or not isinstance(getattr(signal, name, None), signal.Signals) \
                or name in UNCATCHABLE_SIGNALS:
            raise ConfigError(f"fault.stop_signals: {name!r} is not a signal the trainer can catch "
                              f"(e.g. SIGTERM, SIGUSR1, SIGUSR2)")
    for name in ("collective_timeout_s", "heartbeat_every_s", "spike_zscore"):
        value = getattr(fault, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or (value == 0 and name != "spike_zscore"):
            raise ConfigError(f"fault.{name}={value!r} must be a positive number"
                              f"{' (0 turns it off)' if name == 'spike_zscore' else ''}")
    if fault.spike_window < 2:
        raise ConfigError(f"fault.spike_window={fault.spike_window} must be at least 2")
    if fault.max_bad_steps < 0:
        raise ConfigError(f"fault.max_bad_steps={fault.max_bad_steps} must not be negative")


def resolve(cfg: Mapping[str, Any], world_size: int = 1) -> RunConfig:
    """Validate the composed config (a plain dict, e.g. OmegaConf.to_container(cfg, resolve=True)) for
    `world_size` processes: fields first, then the parallel layout (before any process group exists),
    then the split of the global batch over the world_size / tensor_parallel data-parallel ranks."""
    for section in ("model", "train", "optim", "data"):
        if section not in cfg:
            raise ConfigError(f"config section {section!r} is missing")
    train = _typed(TrainConfig, cfg["train"], "train")
    model, attention, activation = resolve_model(cfg["model"], train.init_from)
    optim = _typed(OptimConfig, cfg["optim"], "optim")
    parallel = ParallelConfig.from_dict(dict(cfg.get("parallel") or {}))
    validate_layout(world_size, parallel, model, train.seq_len, "train.seq_len")
    validate_train(train, model, world_size // parallel.tensor_parallel)
    validate_optim(optim)
    fault = _typed(FaultConfig, cfg.get("fault") or {}, "fault")
    validate_fault(fault)
    return RunConfig(model=model, attention=attention, activation=activation, train=train, optim=optim, data=dict(cfg["data"]),
                     parallel=parallel, logging=dict(cfg.get("logging") or {}), fault=fault, world_size=world_size)
