"""The model a run trains, built the same way on every rank: plain Llama -> attention backend -> tensor
parallel plan (llama_pt.parallel) -> activation mode (llama_pt.blocks) -> optional initial weights."""
from __future__ import annotations

from typing import Optional

import torch

from ..blocks import apply_activation_mode
from ..config import RunConfig
from ..model import Llama
from ..ops.attention import resolve_attention_backend
from ..parallel import ParallelState, load_full_state_dict, parallelize


def build_model(run: RunConfig, pstate: ParallelState, device: torch.device,
                init_from: Optional[str] = None) -> Llama:
    """This rank's model. `init_from`: a Hugging Face Llama folder whose weights replace the initial ones
    (continued pretraining, train.init_from); loaded into this rank's shards."""
    torch.manual_seed(run.train.seed)  # the same initial model on every rank
    model = Llama(run.model).to(device)
    model.set_attention_backend(resolve_attention_backend(run.attention, device))
    model = parallelize(model, pstate)
    model = apply_activation_mode(model, run.activation, pstate)
    if init_from is not None:
        from ..hf_interop import import_hf
        _, weights = import_hf(init_from)
        load_full_state_dict(model, {k: v.float() for k, v in weights.items()})
    return model
