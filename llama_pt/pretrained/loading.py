"""A trained model from wherever it lives: one of our checkpoint folders or a Hugging Face folder; and
the export of a checkpoint to a Hugging Face folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..model import Llama
from ..train.checkpoint import load_verified, verify_checkpoint

HF_CONFIG = "config.json"


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Llama, dict[str, Any]]:
    """The model stored in a training checkpoint (weights only) and the checkpoint's trainer state."""
    state = verify_checkpoint(path)  # every file hashed once, before the config is trusted
    model = Llama(ModelConfig.from_dict(state["model_config"]))
    load_verified(path, {"model": model.state_dict()})
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


def tokenizer_of_checkpoint(state: dict[str, Any]) -> Optional[Path]:
    """The tokenizer named by the data manifest the checkpoint was trained on, if it still exists."""
    from ..data import load_manifest
    manifest = (state.get("config") or {}).get("data", {}).get("manifest")
    if not manifest or not Path(manifest).is_file():
        return None
    tokenizer = Path(load_manifest(manifest, check_files=False)["tokenizer"])
    return tokenizer if tokenizer.is_file() else None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                      tokenizer: Optional[str | Path] = None) -> Path:
    """Write a Hugging Face Llama folder (safetensors, config.json, tokenizer) from a training checkpoint."""
    from ..hf_interop import export_hf
    model, state = load_checkpoint_model(checkpoint)
    tokenizer = tokenizer or tokenizer_of_checkpoint(state)
    return export_hf(model, model.cfg, out_dir, tokenizer_path=tokenizer, dtype=dtype)
