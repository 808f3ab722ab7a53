"""The model a run trains, built the same way on every rank: plain Llama on the meta device (no storage) ->
attention backend -> this rank's pipeline stage (llama_pt.parallel.pipeline) when parallel.pipeline_parallel
> 1, the other stages' modules dropped before they have any storage -> each kept part (embedding, every
layer, final norm, head) materialized with its initial values and at once sharded by the tensor parallel plan
(llama_pt.parallel), one part at a time -> optional initial weights of the kept parameters, grown to a new
tokenizer's vocabulary when one is given (llama_pt.resize) -> adapters (llama_pt.adapters, peft) ->
activation mode (llama_pt.blocks).

A rank thus never holds more than its own stage's shards plus one full part (the largest: a layer, or the
embedding / head), and the initial values are those of one process's `Llama(cfg)` whatever the layout: every
parameter is drawn from its own generator, seeded from the model seed and its name
(llama_pt.model.llama.initial_value)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..adapters.apply import apply_peft
from ..blocks import apply_activation_mode
from ..config import ConfigError, RunConfig
from ..model import Llama
from ..model.llama import draw_seed, materialize, set_rope_tables
from ..ops.attention import resolve_attention_backend
from ..parallel import ParallelState, load_full_state_dict, parallelize
from ..parallel.pipeline import PipelineStage, build_stage


def check_base_weights(run: RunConfig) -> None:
    """Adapter training (peft) needs its base from train.init_from: its checkpoints hold only what trains."""
    if run.peft.method != "none" and run.train.init_from is None:
        raise ConfigError(f"peft.method={run.peft.method} needs train.init_from (the base model's Hugging Face "
                          "folder): its checkpoints hold only what trains")


def load_initial_weights(model: Llama | PipelineStage, init_from: str, init_tokenizer: Optional[str] = None) -> None:
    """The weights of the Hugging Face folder `init_from` into this rank's shards, grown first to the
    vocabulary of `init_tokenizer` (train.init_tokenizer) by the default rule when that is set (the base
    tokenizer: the folder's tokenizer.model). Only the tensors of the parameters `model` holds are read (a
    pipeline stage's); each is converted to the parameter's dtype as it is copied into the shard."""
    from ..hf_interop import import_hf
    cfg, weights = import_hf(init_from, names=list(model.state_dict()))
    if init_tokenizer is not None:
        from ..resize import resize_vocabulary
        from ..tokenizer import Tokenizer
        base = Path(init_from) / "tokenizer.model"
        if not base.is_file():
            raise FileNotFoundError(f"train.init_tokenizer: train.init_from has no tokenizer to extend ({base})")
        _, weights = resize_vocabulary(weights, cfg, Tokenizer(base), Tokenizer(init_tokenizer))
    load_full_state_dict(model, weights)


def kept_parts(model: nn.Module) -> list[str]:
    """The paths of the parts of `model` (a Llama or a pipeline stage) in order: "tok_embeddings",
    "layers.<i>" for each of its layers, "norm", "output" (those it has)."""
    parts = []
    for name, child in model.named_children():
        if name == "layers":
            parts.extend(f"layers.{key}" for key, _ in child.named_children())
        else:
            parts.append(name)
    return parts


def build_model(run: RunConfig, pstate: ParallelState, device: torch.device,
                resuming: bool = False) -> Llama | PipelineStage:
    """This rank's model: plain Llama on meta -> attention backend -> the pipeline stage of this rank (its
    parts only; the rest of the model is dropped before it has storage) -> each part materialized on `device`
    and sharded by the tensor-parallel plan, one at a time -> initial weights from train.init_from (continued
    pretraining; skipped when resuming a full-training checkpoint, which holds every weight; always loaded under
    peft, whose checkpoints hold only what trains) -> adapters (peft) -> activation mode.

    The initial values are those of `torch.manual_seed(train.seed); Llama(run.model)` in one process (the
    same model seed, the same rule per parameter name), whatever this rank keeps."""
    torch.manual_seed(run.train.seed)  # the same model seed, adapter seed and random state on every rank
    seed = draw_seed()  # the draw Llama(run.model) makes after the same torch.manual_seed
    with torch.device("meta"):
        model = Llama(run.model, seed=seed)
    model.set_attention_backend(resolve_attention_backend(run.attention, device))
    set_rope_tables(model, run.model, device)
    if pstate.pp_size > 1:
        model = build_stage(model, pstate)
    for part in kept_parts(model):
        materialize(model.get_submodule(part), run.model, seed, device, prefix=part)
        parallelize(model, pstate, within=part)
    lacking = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if lacking:
        raise RuntimeError(f"build_model: {lacking[0]!r} was never materialized")
    if run.train.init_from is not None and (not resuming or run.peft.method != "none"):
        load_initial_weights(model, run.train.init_from, run.train.init_tokenizer)
    model = apply_peft(model, run.peft, pstate)
    return apply_activation_mode(model, run.activation, pstate)
