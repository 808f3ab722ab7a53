"""LoRA adapters in peft's on-disk format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

A folder written here loads with `peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base))`
on our Hugging Face export of the base, and an adapter trained with peft imports into our model. Names:
our `layers.3.attention.wq.adapter.lora_A` is peft's `base_model.model.model.layers.3.self_attn.q_proj
.lora_A.weight` (the module's Hugging Face name from llama_pt.hf_interop's table, peft's prefix, the
parameter as a `.weight` of a Linear); whole modules trained alongside (`modules_to_save`, e.g. the
embedding and the head as Chinese-LLaMA trains them) are saved under their Hugging Face names with the
same prefix. Tensors are full (unsharded) and in the dtype given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..hf_interop import from_hf_name, to_hf_name
from .lora import PROJECTIONS, LoRASettings

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SAVED_MODULES = {"tok_embeddings": "tok_embeddings.weight", "output": "output.weight"}


def _hf_module(ours_param: str) -> str:
    """`model.layers.3.self_attn.q_proj` for `layers.3.attention.wq.weight`."""
    return to_hf_name(ours_param).removesuffix(".weight")


def _leaf(ours_param: str) -> str:
    return _hf_module(ours_param).rsplit(".", 1)[-1]


@dataclass(frozen=True)
class AdapterSpec:
    """What a LoRA adapter adapts and how: the settings, our projection names, our saved module names."""
    settings: LoRASettings
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()

    def peft_config(self, base_model: Optional[str]) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.settings.rank,
                "lora_alpha": self.settings.alpha, "lora_dropout": self.settings.dropout, "bias": "none",
                "target_modules": sorted(_leaf(f"layers.0.{PROJECTIONS[t]}.{t}.weight") for t in self.targets),
                "modules_to_save": sorted(_hf_module(SAVED_MODULES[m]).rsplit(".", 1)[-1]
                                          for m in self.modules_to_save) or None,
                "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "use_rslora": False, "use_dora": False, "base_model_name_or_path": base_model}


def _peft_key(ours: str) -> str:
    """Our adapter or saved-module parameter name -> peft's key."""
    if ".adapter.lora_" in ours:
        module, _, which = ours.rpartition(".adapter.")
        return f"{PREFIX}{_hf_module(module + '.weight')}.{which}.weight"
    return PREFIX + to_hf_name(ours)


def _our_key(peft_key: str) -> str:
    if not peft_key.startswith(PREFIX):
        raise ValueError(f"adapter tensor {peft_key!r} does not start with {PREFIX!r}")
    name = peft_key[len(PREFIX):]
    for which in ("lora_A", "lora_B"):
        if name.endswith(f".{which}.weight"):
            module = from_hf_name(name.removesuffix(f".{which}.weight") + ".weight").removesuffix(".weight")
            return f"{module}.adapter.{which}"
    return from_hf_name(name)


def export_peft(tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, out_dir: str | Path,
                dtype: torch.dtype = torch.float32, base_model: Optional[str] = None) -> Path:
    """Write `tensors` (our names: every `...adapter.lora_A/B` and the saved modules' weights, unsharded)
    as a peft LoRA folder, atomically."""
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file({_peft_key(k): v.detach().to(dtype).contiguous() for k, v in tensors.items()},
                  str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(spec.peft_config(base_model), indent=2, sort_keys=True) + "\n")
    return out


def import_peft(folder: str | Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """A peft LoRA folder -> (its spec, its tensors under our names). Only plain LoRA is accepted (no DoRA,
    rsLoRA, biases, per-module ranks); the error names the field."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    where = folder / CONFIG
    for key, allowed in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("use_rslora", False),
                         ("fan_in_fan_out", False)):
        if config.get(key, allowed) != allowed:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (only plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{where}: {key} is not supported (one rank and alpha for every module)")
    by_leaf = {_leaf(f"layers.0.{PROJECTIONS[t]}.{t}.weight"): t for t in PROJECTIONS}
    saved_by_leaf = {_hf_module(w).rsplit(".", 1)[-1]: m for m, w in SAVED_MODULES.items()}
    targets = config.get("target_modules") or []
    if isinstance(targets, str) or any(t not in by_leaf for t in targets):
        raise ValueError(f"{where}: target_modules={targets!r}: only {sorted(by_leaf)} can be adapted")
    saved = config.get("modules_to_save") or []
    if any(m not in saved_by_leaf for m in saved):
        raise ValueError(f"{where}: modules_to_save={saved!r}: only {sorted(saved_by_leaf)} are supported")
    spec = AdapterSpec(LoRASettings(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0))),
                       tuple(sorted(by_leaf[t] for t in targets)), tuple(sorted(saved_by_leaf[m] for m in saved)))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (only safetensors adapters are read)")
    return spec, {_our_key(k): v for k, v in load_file(str(weights)).items()}
