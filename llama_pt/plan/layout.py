"""What the planner plans for: a run's resolved config (llama_pt.config.RunConfig) plus the machine.

`layout_from_config(run, world_size, gpus_per_node, device_type)` takes the RunConfig the trainer itself
resolved, or a composed config dict, which it resolves with the same function (llama_pt.config.resolve:
fields, the parallel layout, the batch split) so that a config the planner accepts is one train.py
accepts, and a bad field fails here with the same one-line ConfigError.

Pipeline parallelism (`pipeline`, docs/planner.md "Pipeline parallelism") takes the names the parallel config
will carry: pipeline_parallel (p), virtual_stages (V), pipeline_schedule, pipeline_embedding_layers and
pipeline_head_layers. Until llama_pt.config.ParallelConfig has them they come as planner arguments, and the
config is resolved for the W/p ranks of one pipeline stage: the same TP-layout and batch-split checks, over the
d = W/(t p) data-parallel ranks a pipelined run has.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Optional, Union

from ..config import ConfigError, ModelConfig, PeftConfig, RunConfig, resolve
from .pipeline import Stage, bubble_fraction, pipeline_stages, validate_pipeline

# parallel.<name> -> default (docs/planner.md, "Pipeline parallelism")
PIPELINE_DEFAULTS = {"pipeline_parallel": 1, "virtual_stages": 1, "pipeline_schedule": "1f1b",
                     "pipeline_embedding_layers": 1.0, "pipeline_head_layers": 1.0}


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
    pp: int = 1              # p: pipeline stages
    vp: int = 1              # V: model chunks per stage (interleaved_1f1b)
    schedule: str = "1f1b"   # gpipe | 1f1b | interleaved_1f1b
    embedding_layers: float = 1.0  # what the embedding weighs in the stage split, in layers
    head_layers: float = 1.0       # what the final norm, head and loss weigh

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @cached_property
    def stages(self) -> tuple[Stage, ...]:
        """Every pipeline rank's layers and in-flight micro-batches (one Stage without pipeline parallelism)."""
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


def pipeline_settings(run: RunConfig, pipeline: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """parallel.pipeline_* of the run where its config has them, replaced by the planner's `pipeline` arguments."""
    given = dict(pipeline or {})
    unknown = set(given) - set(PIPELINE_DEFAULTS)
    if unknown:
        raise ConfigError(f"parallel.{sorted(unknown)[0]} is not a pipeline setting (known: {', '.join(PIPELINE_DEFAULTS)})")
    return {name: given.get(name, getattr(run.parallel, name, default)) for name, default in PIPELINE_DEFAULTS.items()}


def layout_from_config(cfg: Union[RunConfig, Mapping[str, Any]], world_size: int, gpus_per_node: int,
                       device_type: str = "cuda", pipeline: Optional[Mapping[str, Any]] = None) -> Layout:
    """The run (resolved, or a composed config dict as OmegaConf.to_container gives it) on world_size ranks;
    `pipeline`: parallel.pipeline_* settings by name (PIPELINE_DEFAULTS)."""
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(f"world size {world_size} and gpus per node {gpus_per_node} must be positive")
    pp = int((pipeline or {}).get("pipeline_parallel", 1))
    if pp < 1 or world_size % pp:
        raise ConfigError(f"parallel.pipeline_parallel={pp} does not divide the world size {world_size}")
    run = as_run_config(cfg, world_size // pp)
    pipe = pipeline_settings(run, pipeline)
    if pipe["pipeline_parallel"] > 1 and run.peft.method != "none":
        raise ConfigError(f"peft.method={run.peft.method} with parallel.pipeline_parallel > 1 is not planned "
                          f"(the pipeline model is full training's)")
    pcfg = run.parallel
    t = pcfg.tensor_parallel
    layout = Layout(model=run.model, seq_len=run.train.seq_len, micro_batch=run.train.micro_batch_size,
                  global_batch_tokens=run.train.global_batch_tokens, world_size=world_size,
                  gpus_per_node=gpus_per_node, tp=t, sp=pcfg.sequence_parallel and t > 1,
                  overlap=pcfg.overlap, zero_stage=pcfg.zero_stage, activation=run.activation,
                  precision=precision_for(run.train.precision, device_type), bucket_size=pcfg.bucket_size,
                  peft=run.peft, pp=pipe["pipeline_parallel"], vp=pipe["virtual_stages"],
                  schedule=pipe["pipeline_schedule"], embedding_layers=pipe["pipeline_embedding_layers"],
                  head_layers=pipe["pipeline_head_layers"])
    validate_pipeline(layout.pp, layout.vp, layout.schedule, layout.grad_accum, layout.model.n_layers)
    return layout
