"""The model a run trains, built the same way on every rank: plain Llama -> attention backend -> tensor
parallel plan (llama_pt.parallel) -> optional initial weights, grown to a new tokenizer's vocabulary when one
is given (llama_pt.resize) -> adapters (llama_pt.adapters, peft) -> activation mode (llama_pt.blocks) -> this
rank's pipeline stage (llama_pt.parallel.pipeline) when parallel.pipeline_parallel > 1."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..adapters.apply import apply_peft
from ..blocks import apply_activation_mode
from ..config import ConfigError, RunConfig
from ..model import Llama
from ..ops.attention import resolve_attention_backend
from ..parallel import ParallelState, load_full_state_dict, parallelize
from ..parallel.pipeline import PipelineStage, build_stage


def check_base_weights(run: RunConfig) -> None:
    """Adapter training (peft) needs its base from train.init_from: its checkpoints hold only what trains."""
    if run.peft.method != "none" and run.train.init_from is None:
        raise ConfigError(f"peft.method={run.peft.method} needs train.init_from (the base model's Hugging Face "
                          "folder): its checkpoints hold only what trains")


def load_initial_weights(model: Llama, init_from: str, init_tokenizer: Optional[str] = None) -> None:
    """The weights of the Hugging Face folder `init_from` into this rank's shards, grown first to the
    vocabulary of `init_tokenizer` (train.init_tokenizer) by the default rule when that is set (the base
    tokenizer: the folder's tokenizer.model)."""
    from ..hf_interop import import_hf
    cfg, weights = import_hf(init_from)
    if init_tokenizer is not None:
        from ..resize import resize_vocabulary
        from ..tokenizer import Tokenizer
        base = Path(init_from) / "tokenizer.model"
        if not base.is_file():
            raise FileNotFoundError(f"train.init_tokenizer: train.init_from has no tokenizer to extend ({base})")
        _, weights = resize_vocabulary(weights, cfg, Tokenizer(base), Tokenizer(init_tokenizer))
    load_full_state_dict(model, {k: v.float() for k, v in weights.items()})


def build_model(run: RunConfig, pstate: ParallelState, device: torch.device,
                resuming: bool = False) -> Llama | PipelineStage:
    """This rank's model: plain Llama -> attention backend -> tensor-parallel plan -> initial weights from
    train.init_from (continued pretraining; skipped when resuming a full-training checkpoint, which holds
    every weight; always loaded under peft, whose checkpoints hold only what trains) -> adapters (peft) ->
    activation mode -> the pipeline stage of this rank (its parts only; the rest of the model is dropped)."""
    torch.manual_seed(run.train.seed)  # the same initial model on every rank
    model = Llama(run.model).to(device)
    model.set_attention_backend(resolve_attention_backend(run.attention, device))
    model = parallelize(model, pstate)
    if run.train.init_from is not None and (not resuming or run.peft.method != "none"):
        load_initial_weights(model, run.train.init_from, run.train.init_tokenizer)
    model = apply_peft(model, run.peft, pstate)
    model = apply_activation_mode(model, run.activation, pstate)
    return build_stage(model, pstate) if pstate.pp_size > 1 else model
