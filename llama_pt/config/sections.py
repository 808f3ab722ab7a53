"""The typed sections of a run's config (Hydra groups train, optim, parallel, data, fault) and their checks.

Every check raises one ConfigError line naming the field, e.g.
``train.micro_batch_size=3 does not divide the per-rank batch of 8 sequences``. `llama_pt.config.run`
calls them once, when it resolves the composed config; nothing downstream validates again. Torch-free.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .compose import REPO_CONFIGS
from .fields import ConfigError, reject_unknown_fields
from .model import ModelConfig

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")  # model.attention (llama_pt.ops.attention)
ACTIVATION_MODES = ("none", "selective", "full")   # model.activation (llama_pt.blocks)
PRECISIONS = ("auto", "fp32", "bf16")               # train.precision (llama_pt.train.precision)
DEVICES = ("auto", "cpu", "cuda")                   # train.device
COMM_BACKENDS = ("auto", "nccl", "gloo")            # parallel.backend
ZERO_STAGES = (0, 1, 2)                             # parallel.zero_stage
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")  # parallel.pipeline_schedule (llama_pt.parallel.pipeline)
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
TASKS = ("pretrain", "sft")                         # task.name (llama_pt.train.data_setup)
TEMPLATES_DIR = REPO_CONFIGS / "templates"          # the prompt templates by name (llama_pt.instruct.templates)


def check_choice(value: Any, known: tuple, field: str) -> Any:
    """`value` if it is one of `known`; else ConfigError naming `field` and the known values."""
    if value not in known:
        raise ConfigError(f"{field}={value!r} is unknown (known: {', '.join(map(str, known))})")
    return value


def typed_section(cls, values: Mapping[str, Any], prefix: str):
    """An instance of the dataclass `cls` from `values`: unknown keys refused, null only where the field
    defaults to None, integers checked, lists made tuples; ConfigError names the field."""
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
    init_tokenizer: Optional[str] = None  # grow init_from's vocabulary to this SentencePiece model (llama_pt.resize)
    sample_prompt: str = ""
    sample_tokens: int = 0
    downstream_every: int = 0  # score downstream_task every N steps and at the last (llama_pt.evaluation.downstream)
    downstream_task: Optional[str] = None  # a multiple-choice lm-eval task file, or a task of data/eval/
    document_mask: bool = False  # attention stays inside each packed document (llama_pt.ops.documents)

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
class OptimConfig:
    """The `optim` group: AdamW and its schedule (llama_pt.train.optim; Touvron et al. 2023, Sec. 2.3)."""
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    grad_clip: float = 1.0
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class ParallelConfig:
    """The `parallel` group: tensor/sequence parallelism, overlap, ZeRO stage, communication backend."""
    tensor_parallel: int = 1       # t: ranks that share one layer (consecutive ranks)
    sequence_parallel: bool = False  # Korthikanti et al. 2022, Sec. 4.2.2 (needs tensor_parallel > 1 to matter)
    overlap: bool = True           # asynchronous TP collectives hidden behind the backward matmuls
    zero_stage: int = 0            # 0: plain all-reduce data parallelism; 1, 2: DeepSpeed ZeRO stage
    backend: str = "auto"          # nccl on cuda, gloo on cpu
    bucket_size: int = 500_000_000  # DeepSpeed ZeRO reduce / all-gather bucket, in elements
    pipeline_parallel: int = 1     # p: pipeline stages (outermost ranks: rank = pp*(DP*TP) + dp*TP + tp)
    virtual_stages: int = 1        # v: model chunks per stage (interleaved_1f1b only)
    pipeline_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b (Narayanan et al. 2021, Sec. 2.2)
    pipeline_embedding_layers: float = 1.0  # layers the embedding counts as when balancing (llama_pt.config.pipeline)
    pipeline_head_layers: float = 1.0       # layers the final norm + head count as when balancing

    def validate(self, prefix: str = "parallel") -> "ParallelConfig":
        if type(self.tensor_parallel) is not int or self.tensor_parallel < 1:
            raise ConfigError(f"{prefix}.tensor_parallel={self.tensor_parallel!r} must be a positive integer")
        for name in ("sequence_parallel", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)!r} must be true or false")
        if type(self.zero_stage) is not int or self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"{prefix}.zero_stage={self.zero_stage!r} must be one of {ZERO_STAGES}")
        if type(self.bucket_size) is not int or self.bucket_size < 2 or self.bucket_size % 2:
            raise ConfigError(f"{prefix}.bucket_size={self.bucket_size!r} must be a positive even integer (elements)")
        check_choice(self.backend, COMM_BACKENDS, f"{prefix}.backend")
        for name in ("pipeline_parallel", "virtual_stages"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{prefix}.{name}={value!r} must be a positive integer")
        check_choice(self.pipeline_schedule, PIPELINE_SCHEDULES, f"{prefix}.pipeline_schedule")
        interleaved = self.pipeline_schedule == "interleaved_1f1b"
        if interleaved and self.virtual_stages < 2:
            raise ConfigError(f"{prefix}.pipeline_schedule=interleaved_1f1b needs {prefix}.virtual_stages >= 2 "
                              f"(got {self.virtual_stages})")
        if self.virtual_stages > 1 and not interleaved:
            raise ConfigError(f"{prefix}.virtual_stages={self.virtual_stages} needs "
                              f"{prefix}.pipeline_schedule=interleaved_1f1b (got {self.pipeline_schedule})")
        for name in ("pipeline_embedding_layers", "pipeline_head_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{prefix}.{name}={value!r} must be a non-negative number of layers")
        return self

    @property
    def model_chunks(self) -> int:
        """Model chunks the layers are cut into: pipeline stages x virtual stages."""
        return self.pipeline_parallel * self.virtual_stages

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], prefix: str = "parallel") -> "ParallelConfig":
        reject_unknown_fields(cls, values, prefix)
        return cls(**values).validate(prefix)


@dataclass(frozen=True)
class DataConfig:
    """The `data` group (configs/data/*.yaml): the mixture manifest written by the data pipeline, an optional
    held-out manifest, per-source weight/epoch overrides (llama_pt.data.mixture.resolve_weights), the
    shuffling seed, loader worker processes, and the folder of the shuffling tables (llama_pt.data.packing;
    the trainer's default is <train.out_dir>/data_index)."""
    manifest: str
    valid_manifest: Optional[str] = None
    weights: Optional[dict[str, float]] = None
    epochs: Optional[dict[str, float]] = None
    seed: int = 1234
    num_workers: int = 0
    index_dir: Optional[str] = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "data") -> "DataConfig":
        """Build from a plain dict or an OmegaConf DictConfig; ConfigError names the bad field."""
        reject_unknown_fields(cls, values, prefix)
        if not values.get("manifest"):
            raise ConfigError(f"{prefix}.manifest must name the mixture manifest (mixture.json)")
        kw: dict[str, Any] = {"manifest": str(values["manifest"])}
        for key in ("valid_manifest", "index_dir"):
            if values.get(key):
                kw[key] = str(values[key])
        for key in ("weights", "epochs"):
            v = values.get(key)
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{prefix}.{key} must be a mapping of source name to number")
            kw[key] = {str(k): x for k, x in v.items()}
        for key in ("seed", "num_workers"):
            v = values.get(key, getattr(cls, key))
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{prefix}.{key}={v!r} must be a non-negative integer")
            kw[key] = v
        return cls(**kw)


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
    if not isinstance(train.document_mask, bool):
        raise ConfigError(f"train.document_mask={train.document_mask!r} must be true or false")
    check_choice(train.precision, PRECISIONS, "train.precision")
    check_choice(train.device, DEVICES, "train.device")
    for name in ("log_every", "eval_every", "ckpt_every", "keep_last", "eval_batches", "sample_tokens", "exit_interval",
                 "downstream_every"):
        if getattr(train, name) < 0:
            raise ConfigError(f"train.{name}={getattr(train, name)} must not be negative")
    if train.downstream_every and not train.downstream_task:
        raise ConfigError(f"train.downstream_every={train.downstream_every} needs train.downstream_task (a "
                          "multiple-choice task file, or the name of a task in data/eval/)")


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


PEFT_METHODS = ("none", "lora", "qlora")                     # peft.method
PEFT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")    # peft.targets: a layer's projections
PEFT_SAVE_MODULES = ("tok_embeddings", "output")             # peft.modules_to_save


@dataclass(frozen=True)
class PeftConfig:
    """The `peft` group (configs/peft/*.yaml): finetuning a frozen base through low-rank adapters.

    `lora`: the base frozen in the training precision, a rank-`rank` adapter B A (scaled by alpha/rank) on
    every projection named in `targets` of every layer (Hu et al. 2021); `qlora`: the same on a base whose
    projections are stored in 4-bit NormalFloat with double quantisation (Dettmers et al. 2023, Sec. 3).
    `modules_to_save` are trained in full beside the adapters. Planned by llama_pt.plan (docs/planner.md)."""
    method: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PEFT_TARGETS
    modules_to_save: tuple[str, ...] = ()


def validate_peft(peft: PeftConfig, parallel: ParallelConfig) -> None:
    check_choice(peft.method, PEFT_METHODS, "peft.method")
    if peft.rank <= 0:
        raise ConfigError(f"peft.rank={peft.rank} must be a positive integer")
    if isinstance(peft.alpha, bool) or not isinstance(peft.alpha, (int, float)) or peft.alpha <= 0:
        raise ConfigError(f"peft.alpha={peft.alpha!r} must be a positive number")
    if isinstance(peft.dropout, bool) or not isinstance(peft.dropout, (int, float)) or not 0 <= peft.dropout < 1:
        raise ConfigError(f"peft.dropout={peft.dropout!r} must be a number in [0, 1)")
    for field, names, known in (("targets", peft.targets, PEFT_TARGETS),
                                ("modules_to_save", peft.modules_to_save, PEFT_SAVE_MODULES)):
        if not isinstance(names, tuple):
            raise ConfigError(f"peft.{field}={names!r} must be a list of names, e.g. [{known[0]}]")
        for name in names:
            if name not in known:
                raise ConfigError(f"peft.{field}: {name!r} is not one of {', '.join(known)}")
    if peft.method != "none" and not peft.targets:
        raise ConfigError(f"peft.targets is empty: peft.method={peft.method} needs at least one projection")
    if peft.method == "qlora" and parallel.tensor_parallel > 1:
        raise ConfigError(f"peft.method=qlora with parallel.tensor_parallel={parallel.tensor_parallel} is "
                          f"unsupported: the NF4 base is not sharded (use parallel.tensor_parallel=1)")


@dataclass(frozen=True)
class TaskConfig:
    """The `task` group (configs/task/*.yaml). `pretrain`: the packed windows of data.manifest. `sft`:
    supervised finetuning on instruction data (llama_pt.instruct): the records of `files` (Alpaca or ShareGPT,
    JSON or JSONL) written with the prompt template `template` (a name in configs/templates/, or a YAML file
    of that form), tokenized with `tokenizer` (default: train.init_from's tokenizer.model), and packed into
    windows of train.seq_len + 1 tokens in an order drawn from `seed` (`packing` false: one example per window,
    padded); the loss counts the response tokens only. `valid_fraction` of the examples, chosen by a hash of
    their tokens, are held out of training and scored every train.eval_every steps (the mean loss over their
    response tokens). The data section is not read under sft."""
    name: str = "pretrain"
    files: tuple[str, ...] = ()
    template: str = "alpaca"
    packing: bool = True
    tokenizer: Optional[str] = None
    seed: int = 1234
    valid_fraction: float = 0.0


def known_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml"))


def template_file(name: str, field: str = "task.template") -> Path:
    """The YAML file of a prompt template: a name in configs/templates/, or the path of a .yaml file."""
    if name in known_templates():
        return TEMPLATES_DIR / f"{name}.yaml"
    if str(name).endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    raise ConfigError(f"{field}={name!r} is unknown (known: {', '.join(known_templates())}; or a .yaml file)")


def sft_tokenizer(task: TaskConfig, train: TrainConfig) -> str:
    """The SentencePiece model an sft run tokenizes with: task.tokenizer, else train.init_from's."""
    if task.tokenizer is not None:
        if not Path(task.tokenizer).is_file():
            raise ConfigError(f"task.tokenizer={task.tokenizer} does not exist")
        return task.tokenizer
    if train.init_from is None or not (Path(train.init_from) / "tokenizer.model").is_file():
        raise ConfigError("task=sft needs a tokenizer: set task.tokenizer, or train.init_from to a Hugging Face "
                          "folder with a tokenizer.model")
    return str(Path(train.init_from) / "tokenizer.model")


def validate_task(task: TaskConfig, train: TrainConfig) -> None:
    check_choice(task.name, TASKS, "task.name")
    if task.name != "sft":
        return
    if not isinstance(task.files, tuple) or not task.files:
        raise ConfigError("task.files must list the instruction data files (Alpaca or ShareGPT JSON/JSONL)")
    for path in task.files:
        if not Path(path).is_file():
            raise ConfigError(f"task.files: {path} does not exist")
    template_file(task.template)
    if not isinstance(task.packing, bool):
        raise ConfigError(f"task.packing={task.packing!r} must be true or false")
    if not 0.0 <= task.valid_fraction < 1.0:
        raise ConfigError(f"task.valid_fraction={task.valid_fraction} must be in [0, 1)")
    sft_tokenizer(task, train)
