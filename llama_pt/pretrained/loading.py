"""A trained model from wherever it lives: one of our checkpoint folders or a Hugging Face folder; and
the export of a checkpoint to a Hugging Face folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from ..adapters.apply import apply_peft
from ..adapters.lora import LoRASettings, merge
from ..adapters.peft_format import AdapterSpec, export_peft
from ..config import ModelConfig, PeftConfig
from ..model import VOCAB_ROWS, Llama
from ..train.checkpoint import CheckpointError, load_verified, verify_checkpoint
from ..train.model_setup import load_initial_weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HF_CONFIG = "config.json"


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def peft_of(state: dict[str, Any]) -> PeftConfig:
    """The peft settings a checkpoint was trained with (none for checkpoints of full training)."""
    record = state.get("peft") or {}
    return PeftConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Llama, dict[str, Any]]:
    """The model stored in a training checkpoint and the checkpoint's trainer state.

    A checkpoint of adapter training (peft) holds only what trained: the base comes from the run's
    train.init_from (grown to train.init_tokenizer's vocabulary if the run did), and the adapters are put on
    it unmerged (`llama_pt.adapters.lora.merge` folds them in). A QLoRA run's adapters go on the original,
    unquantised base, as QLoRA merges them."""
    state = verify_checkpoint(path)  # every file hashed once, before the config is trusted
    model = Llama(ModelConfig.from_stored(state["model_config"]))
    peft = peft_of(state)
    if peft.method == "none":
        load_verified(path, {"model": model.state_dict()})
        return model.to(device).eval(), state
    train = (state.get("config") or {}).get("train") or {}
    if not train.get("init_from"):
        raise CheckpointError(f"checkpoint {path} holds adapters but its config names no train.init_from base")
    load_initial_weights(model, train["init_from"], train.get("init_tokenizer"))
    apply_peft(model, dataclasses.replace(peft, method="lora"))
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    load_verified(path, {"model": trained})
    return model.to(device).eval(), state


def load_hf_model(folder: str | Path, device: str | torch.device = "cpu") -> Llama:
    from ..hf_interop import import_hf
    cfg, weights = import_hf(folder)
    model = Llama(cfg)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Llama:
    """A Llama from a checkpoint folder or a Hugging Face folder, chosen by what the folder holds."""
    return load_hf_model(path, device) if is_hf_folder(path) else load_checkpoint_model(path, device)[0]


def load_model_and_tokenizer(model_path: str | Path, tokenizer: Optional[str | Path] = None,
                             device: str | torch.device = "cpu") -> tuple[Llama, Path]:
    """The model, and its tokenizer: `tokenizer` if given, else the HF folder's, else the training manifest's."""
    if is_hf_folder(model_path):
        model, found = load_hf_model(model_path, device), Path(model_path) / "tokenizer.model"
        found = found if found.is_file() else None
    else:
        model, state = load_checkpoint_model(model_path, device)
        found = tokenizer_of_checkpoint(state)
    path = Path(tokenizer) if tokenizer else found
    if path is None:
        raise FileNotFoundError(f"no tokenizer found for {model_path}: pass --tokenizer")
    return model, path


def tokenizer_of_checkpoint(state: dict[str, Any]) -> Optional[Path]:
    """The tokenizer the checkpoint was trained with, if it still exists: an instruction-tuning run's (task.tokenizer,
    else train.init_from's tokenizer.model), else the one named by the data manifest."""
    from ..data import load_manifest
    config = state.get("config") or {}
    task = config.get("task") or {}
    if task.get("name") == "sft":
        init_from = (config.get("train") or {}).get("init_from")
        found = task.get("tokenizer") or (init_from and Path(init_from) / "tokenizer.model")
        return Path(found) if found and Path(found).is_file() else None
    manifest = config.get("data", {}).get("manifest")
    if not manifest or not Path(manifest).is_file():
        return None
    tokenizer = Path(load_manifest(manifest, check_files=False)["tokenizer"])
    return tokenizer if tokenizer.is_file() else None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                      tokenizer: Optional[str | Path] = None) -> Path:
    """Write a Hugging Face Llama folder (safetensors, config.json, tokenizer) from a training checkpoint;
    adapters are merged into the base."""
    from ..hf_interop import export_hf
    model, state = load_checkpoint_model(checkpoint)
    merge(model)
    tokenizer = tokenizer or tokenizer_of_checkpoint(state)
    return export_hf(model, model.cfg, out_dir, tokenizer_path=tokenizer, dtype=dtype)


def export_peft_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                           base_out: Optional[str | Path] = None) -> Path:
    """Write the adapters (and the modules trained in full) of an adapter-training checkpoint as a peft LoRA
    folder; peft.PeftModel.from_pretrained loads it onto the Hugging Face export of the run's base: its
    train.init_from, or, for a run that grew the vocabulary (train.init_tokenizer), that base grown the same
    way, which `base_out` receives (required then)."""
    model, state = load_checkpoint_model(checkpoint)
    peft = peft_of(state)
    if peft.method == "none":
        raise ValueError(f"checkpoint {checkpoint} is of full training: it has no adapters (use export)")
    train = state["config"]["train"]
    base = train["init_from"]
    if train.get("init_tokenizer"):
        if base_out is None:
            raise ValueError(f"checkpoint {checkpoint} was trained on {base} grown to {train['init_tokenizer']}: "
                             "pass --base-out DIR to write that grown base the adapter loads onto")
        from ..hf_interop import export_hf
        grown = Llama(model.cfg)
        load_initial_weights(grown, base, train["init_tokenizer"])
        base = str(export_hf(grown, grown.cfg, base_out, tokenizer_path=train["init_tokenizer"], dtype=dtype))
    vocab = model.cfg.vocab_size
    tensors = {name: (p[:vocab] if name in VOCAB_ROWS else p) for name, p in model.named_parameters()
               if p.requires_grad}
    spec = AdapterSpec(LoRASettings.of(peft), peft.targets, peft.modules_to_save)
    return export_peft(tensors, spec, out_dir, dtype=_DTYPES[dtype], base_model=base)
