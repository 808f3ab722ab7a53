"""What the planner plans for: a run's resolved config (llama_pt.config.RunConfig) plus the machine.

`layout_from_config(run, world_size, gpus_per_node, device_type)` takes the RunConfig the trainer itself
resolved, or a composed config dict, which it resolves with the same function (llama_pt.config.resolve:
fields, the parallel layout, the batch split) so that a config the planner accepts is one train.py
accepts, and a bad field fails here with the same one-line ConfigError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

from ..config import ConfigError, ModelConfig, PeftConfig, RunConfig, resolve


@dataclass(frozen=True)
class Layout:
    model: ModelConfig
    seq_len: int             # s
    micro_batch: int         # b, sequences per forward/backward
    global_batch_tokens: int
    world_size: int          # W
    gpus_per_node: int
    tp: int                  # t
    sp: bool                 # sequence parallelism (only with t > 1)
    overlap: bool
    zero_stage: int
    activation: str          # none | selective | full
    precision: str           # bf16 (mixed, fp32 master) | fp32
    bucket_size: int         # elements per ZeRO reduce / all-gather bucket
    peft: PeftConfig = PeftConfig()  # adapters on a frozen base (method none: full training)

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

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
    t = pcfg.tensor_parallel
    return Layout(model=run.model, seq_len=run.train.seq_len, micro_batch=run.train.micro_batch_size,
                  global_batch_tokens=run.train.global_batch_tokens, world_size=world_size,
                  gpus_per_node=gpus_per_node, tp=t, sp=pcfg.sequence_parallel and t > 1,
                  overlap=pcfg.overlap, zero_stage=pcfg.zero_stage, activation=run.activation,
                  precision=precision_for(run.train.precision, device_type), bucket_size=pcfg.bucket_size,
                  peft=run.peft)
