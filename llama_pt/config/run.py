"""The composed Hydra config of a run resolved into one typed, validated RunConfig — the only place it is.

`resolve(cfg, world_size)` checks every field once, in order: each section's fields, the model (from
model.preset, or the config.json of the Hugging Face folder train.init_from with the vocabulary of
train.init_tokenizer when given, plus field overrides), the parallel layout for `world_size` processes,
the split of the global batch over the data-parallel ranks,
the optimizer, fault, peft and task settings. The trainer, the planner and the launcher's check all take its
result; none of them validates again. Torch-free.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .fields import ConfigError
from .hf_model import model_config_from_hf
from .layout import validate_layout, validate_pipeline_run
from .model import ModelConfig, get_preset
from .sections import (ACTIVATION_MODES, ATTENTION_BACKENDS, DataConfig, FaultConfig, OptimConfig, ParallelConfig,
                       PeftConfig, TaskConfig, TrainConfig, check_choice, typed_section, validate_fault,
                       validate_optim, validate_peft, validate_task, validate_train)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    attention: str           # model.attention: an attention backend name (ATTENTION_BACKENDS)
    activation: str          # model.activation: an activation mode name (ACTIVATION_MODES)
    train: TrainConfig
    optim: OptimConfig
    data: DataConfig
    parallel: ParallelConfig
    logging: dict[str, Any]
    fault: FaultConfig = FaultConfig()
    peft: PeftConfig = PeftConfig()   # adapters on a frozen base (none: full training)
    task: TaskConfig = TaskConfig()   # pretraining, or supervised finetuning on instruction data
    world_size: int = 1      # processes the config was validated for (pipeline x data x tensor parallel)

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.parallel.tensor_parallel * self.parallel.pipeline_parallel)

    def grad_accumulation_steps(self, dp_size: Optional[int] = None) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        dp = self.dp_size if dp_size is None else dp_size
        return self.train.global_batch_sequences // (self.train.micro_batch_size * dp)


def resolve_model(values: Mapping[str, Any], init_from: Optional[str] = None,
                  init_tokenizer: Optional[str] = None) -> tuple[ModelConfig, str, str]:
    """Base fields (model.preset, or the config of the Hugging Face folder train.init_from, whose vocab_size
    becomes the piece count of train.init_tokenizer when given) plus the non-null field overrides ->
    ModelConfig; and the attention backend and activation mode names."""
    values = dict(values)
    preset = values.pop("preset", None)
    attention = check_choice(values.pop("attention", "auto"), ATTENTION_BACKENDS, "model.attention")
    activation = check_choice(values.pop("activation", "none"), ACTIVATION_MODES, "model.activation")
    overrides = {k: v for k, v in values.items() if v is not None}
    if init_tokenizer is not None:
        if init_from is None:
            raise ConfigError(f"train.init_tokenizer={init_tokenizer} needs train.init_from (the model to grow)")
        if "vocab_size" in overrides:
            raise ConfigError(f"model.vocab_size={overrides['vocab_size']} cannot be set with train.init_tokenizer, "
                              f"whose pieces are the vocabulary")
    if init_from is not None:
        base = _hf_model_config(init_from).to_dict()
        if init_tokenizer is not None:
            base["vocab_size"] = _piece_count(init_tokenizer)
    else:
        base = get_preset(preset).to_dict() if preset is not None else {}
    base.update(overrides)
    missing = [f.name for f in fields(ModelConfig) if f.default is MISSING and f.name not in base]
    if missing:
        raise ConfigError(f"model.{missing[0]} must be set (or choose model.preset)")
    return ModelConfig.from_dict(base), attention, activation


def _hf_model_config(folder: str) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"train.init_from={folder}: no Hugging Face config.json there")
    return model_config_from_hf(json.loads(path.read_text()), where=str(path))


def _piece_count(tokenizer: str) -> int:
    import sentencepiece as spm  # torch-free, like this layer
    if not Path(tokenizer).is_file():
        raise ConfigError(f"train.init_tokenizer={tokenizer} does not exist")
    try:
        return spm.SentencePieceProcessor(model_file=tokenizer).get_piece_size()
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"train.init_tokenizer={tokenizer} is not a SentencePiece model ({exc})") from None


def _check_peft_run(peft: PeftConfig, train: TrainConfig, activation: str) -> None:
    """What adapters need from the rest of the run's layout (the base weights a training run needs are
    checked where it starts: llama_pt.train.model_setup.check_base_weights)."""
    if peft.method == "qlora" and activation == "selective":
        raise ConfigError("peft.method=qlora needs model.activation=full or none: the hand-written selective "
                          "layer reads dense weights, and an NF4 base has none (QLoRA recomputes: use full)")


def resolve(cfg: Mapping[str, Any], world_size: int = 1) -> RunConfig:
    """Validate the composed config (a plain dict, e.g. OmegaConf.to_container(cfg, resolve=True)) for
    `world_size` processes: fields first, then the parallel layout (before any process group exists),
    then the split of the global batch over the world_size / (tensor_parallel x pipeline_parallel)
    data-parallel ranks and what a pipeline needs of it."""
    for section in ("model", "train", "optim", "data"):
        if section not in cfg:
            raise ConfigError(f"config section {section!r} is missing")
    train = typed_section(TrainConfig, cfg["train"], "train")
    model, attention, activation = resolve_model(cfg["model"], train.init_from, train.init_tokenizer)
    optim = typed_section(OptimConfig, cfg["optim"], "optim")
    parallel = ParallelConfig.from_dict(dict(cfg.get("parallel") or {}))
    validate_layout(world_size, parallel, model, train.seq_len, "train.seq_len")
    dp_size = world_size // (parallel.tensor_parallel * parallel.pipeline_parallel)
    validate_train(train, model, dp_size)
    validate_pipeline_run(parallel, train, train.global_batch_sequences // (train.micro_batch_size * dp_size))
    validate_optim(optim)
    fault = typed_section(FaultConfig, cfg.get("fault") or {}, "fault")
    validate_fault(fault)
    peft = typed_section(PeftConfig, cfg.get("peft") or {}, "peft")
    validate_peft(peft, parallel)
    _check_peft_run(peft, train, activation)
    task = typed_section(TaskConfig, cfg.get("task") or {}, "task")
    validate_task(task, train)
    return RunConfig(model=model, attention=attention, activation=activation, train=train, optim=optim,
                     data=DataConfig.from_dict(cfg["data"]), parallel=parallel,
                     logging=dict(cfg.get("logging") or {}), fault=fault, peft=peft, task=task,
                     world_size=world_size)
