"""What the planner plans for: a run's resolved config (llama_pt.config.RunConfig) plus the machine.

`layout_from_config(run, world_size, gpus_per_node, device_type)` takes the RunConfig the trainer itself
resolved, or a composed config dict, which it resolves with the same function (llama_pt.config.resolve:
fields, the parallel layout, the batch split, what a pipeline needs of the batch) so that a config the
planner accepts is one train.py accepts, and a bad field fails here with the same one-line ConfigError.

The layout's parallel settings are the run's `parallel` section (llama_pt.config.ParallelConfig), pipeline
parallelism included (parallel.pipeline_parallel, virtual_stages, pipeline_schedule,
pipeline_embedding_layers, pipeline_head_layers; docs/planner.md "Pipeline parallelism"): the planner has no
settings, defaults or checks of its own for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Union

from ..config import ConfigError, ModelConfig, ParallelConfig, PeftConfig, RunConfig, resolve
from ..config.layout import comm_backend, validate_pipeline_transfers
from .pipeline import Stage, bubble_fraction, pipeline_stages


@dataclass(frozen=True)
class Layout:
    model: ModelConfig
    seq_len: int             # s
    micro_batch: int         # b, sequences per forward/backward
    global_batch_tokens: int
    world_size: int          # W
    gpus_per_node: int
    parallel: ParallelConfig  # the run's parallel section, as resolved (TP, SP, overlap, ZeRO, pipeline)
    activation: str          # none | selective | full
    precision: str           # bf16 (mixed, fp32 master) | fp32
    peft: PeftConfig = PeftConfig()  # adapters on a frozen base (method none: full training)

    @property
    def tp(self) -> int:
        """t: tensor-parallel ranks."""
        return self.parallel.tensor_parallel

    @property
    def sp(self) -> bool:
        """Sequence parallelism (only with t > 1)."""
        return self.parallel.sequence_parallel and self.tp > 1

    @property
    def overlap(self) -> bool:
        return self.parallel.overlap

    @property
    def zero_stage(self) -> int:
        return self.parallel.zero_stage

    @property
    def bucket_size(self) -> int:
        """Elements per ZeRO reduce / all-gather bucket."""
        return self.parallel.bucket_size

    @property
    def pp(self) -> int:
        """p: pipeline stages."""
        return self.parallel.pipeline_parallel

    @property
    def vp(self) -> int:
        """V: model chunks per stage (interleaved_1f1b)."""
        return self.parallel.virtual_stages

    @property
    def schedule(self) -> str:
        """gpipe | 1f1b | interleaved_1f1b."""
        return self.parallel.pipeline_schedule

    @property
    def embedding_layers(self) -> float:
        """What the embedding weighs in the stage split, in layers."""
        return self.parallel.pipeline_embedding_layers

    @property
    def head_layers(self) -> float:
        """What the final norm, head and loss weigh in the stage split, in layers."""
        return self.parallel.pipeline_head_layers

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @cached_property
    def stages(self) -> tuple[Stage, ...]:
        """Every pipeline rank's layers and in-flight micro-batches (one Stage without pipeline parallelism):
        the trainer's split (llama_pt.config.pipeline.stage_layers), chunk k on rank k % p."""
        return pipeline_stages(self.model.n_layers, self.pp, self.vp, self.schedule, self.grad_accum,
                               self.embedding_layers, self.head_layers)

    @property
    def bubble(self) -> float:
        """The schedule's idle share of a step (0 without pipeline parallelism)."""
        return bubble_fraction(self.schedule, self.pp, self.grad_accum, self.vp)

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)

    @property
    def micro_tokens(self) -> int:
        """T = b s: tokens in one micro-batch."""
        return self.micro_batch * self.seq_len

    @property
    def grad_accum(self) -> int:
        """k: micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch_tokens // (self.micro_tokens * self.dp)


def precision_for(train_precision: str, device_type: str) -> str:
    """train.precision (auto | fp32 | bf16, already validated) on a device type -> the planner's bf16 / fp32.
    `auto` is bf16 on any GPU the planner models (all have native bf16)."""
    if train_precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return train_precision


def as_run_config(cfg: Union[RunConfig, Mapping[str, Any]], world_size: int) -> RunConfig:
    """`cfg` itself when already resolved (for `world_size` processes), else the composed config resolved."""
    if isinstance(cfg, RunConfig):
        if cfg.world_size != world_size:
            raise ValueError(f"the run was resolved for {cfg.world_size} processes, not {world_size}")
        return cfg
    return resolve(cfg, world_size)


def layout_from_config(cfg: Union[RunConfig, Mapping[str, Any]], world_size: int, gpus_per_node: int,
                       device_type: str = "cuda") -> Layout:
    """The run (resolved, or a composed config dict as OmegaConf.to_container gives it) on world_size ranks."""
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(f"world size {world_size} and gpus per node {gpus_per_node} must be positive")
    run = as_run_config(cfg, world_size)
    pcfg = run.parallel
    if pcfg.pipeline_parallel > 1 and run.peft.method != "none":
        raise ConfigError(f"peft.method={run.peft.method} with parallel.pipeline_parallel > 1 is not planned "
                          f"(the pipeline model is full training's)")
    validate_pipeline_transfers(pcfg, comm_backend(pcfg.backend, device_type))
    return Layout(model=run.model, seq_len=run.train.seq_len, micro_batch=run.train.micro_batch_size,
                  global_batch_tokens=run.train.global_batch_tokens, world_size=world_size,
                  gpus_per_node=gpus_per_node, parallel=pcfg, activation=run.activation,
                  precision=precision_for(run.train.precision, device_type), peft=run.peft)
