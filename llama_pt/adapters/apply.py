"""A run's `peft` settings applied to its model, from outside (llama_pt.config.PeftConfig):

  lora    every projection named in peft.targets gets a LoRA update (.lora); the base is frozen
  qlora   the same projections are first stored in NF4 with double quantisation (.nf4), then adapted

Everything is frozen except the adapters and the modules named in peft.modules_to_save (e.g. the embedding
and the head, which Chinese-LLaMA trains in full after growing the vocabulary): those are the parameters
the optimizer updates and the checkpoints hold. Call after tensor parallelism and after loading the base
weights, before choosing the activation mode.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..config import PeftConfig
from ..model.module_plan import apply_module_plan
from ..parallel import ParallelState
from .lora import PROJECTIONS, LoRASettings, lora_plan
from .nf4 import NF4Linear

SAVED_MODULE_PARAMETERS = {"tok_embeddings": "tok_embeddings.weight", "output": "output.weight"}


def _quantize(path: str, linear: nn.Module) -> NF4Linear:
    return NF4Linear.from_linear(linear)


def apply_peft(model: nn.Module, peft: PeftConfig, pstate: Optional[ParallelState] = None) -> nn.Module:
    """`model` with its adapters (unchanged when peft.method is none); returns it."""
    if peft.method == "none":
        return model
    if peft.method == "qlora":
        apply_module_plan(model, [(f"layers.*.{PROJECTIONS[name]}.{name}", _quantize) for name in peft.targets])
    apply_module_plan(model, lora_plan(list(peft.targets), LoRASettings.of(peft), pstate))
    trained = {SAVED_MODULE_PARAMETERS[m] for m in peft.modules_to_save}
    for name, param in model.named_parameters():
        param.requires_grad_(".adapter." in name or name in trained)
    return model
