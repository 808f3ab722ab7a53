"""The `resize` command: a trained model (a checkpoint folder or a Hugging Face folder) grown to a tokenizer that
extends its vocabulary, written as a Hugging Face folder with that tokenizer (llama_pt.resize: the Chinese-LLaMA
recipe, Cui et al. 2023).

    python -m llama_pt.pretrained resize MODEL NEW.model OUT [--init subtoken_mean|mean|normal]
                                         [--base-tokenizer OLD.model]

The base tokenizer (the model's own) is --base-tokenizer, else the Hugging Face folder's tokenizer.model, else
the one of the checkpoint's training manifest. Refused in one line before a weight is read: an unknown --init,
a model without a base tokenizer, a tokenizer that does not extend the model's vocabulary. The tables keep the
model's dtype (float32 from a checkpoint, the folder's own from a Hugging Face folder), so the old rows are
bit for bit those of MODEL.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import ModelConfig
from ..config.hf_model import model_config_from_hf
from ..hf_interop import export_hf, import_hf
from ..model import Llama
from ..resize import INITS, check_extends, check_init, resize_vocabulary
from ..tokenizer import Tokenizer
from ..train.checkpoint import load_verified, verify_checkpoint
from .loading import HF_CONFIG, is_hf_folder, tokenizer_of_checkpoint


def _hf_source(folder: Path) -> tuple[ModelConfig, Optional[Path], Callable[[], dict[str, torch.Tensor]]]:
    config = folder / HF_CONFIG
    try:
        cfg = model_config_from_hf(json.loads(config.read_text(encoding="utf-8")), where=str(config))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config}: invalid JSON ({exc})") from None
    tokenizer = folder / "tokenizer.model"
    return cfg, tokenizer if tokenizer.is_file() else None, lambda: import_hf(folder)[1]


def _checkpoint_source(path: Path) -> tuple[ModelConfig, Optional[Path], Callable[[], dict[str, torch.Tensor]]]:
    state = verify_checkpoint(path)  # every file hashed once, before the config is trusted
    cfg = ModelConfig.from_stored(state["model_config"])

    def weights() -> dict[str, torch.Tensor]:
        tensors = Llama(cfg).state_dict()
        load_verified(path, {"model": tensors})
        return tensors
    return cfg, tokenizer_of_checkpoint(state), weights


def resize_model(model: str | Path, tokenizer: str | Path, out_dir: str | Path, init: str = "subtoken_mean",
                 base_tokenizer: str | Path | None = None) -> Path:
    """Write `out_dir`, a Hugging Face folder of `model` grown to the vocabulary of `tokenizer`; returns its path."""
    check_init(init)
    model = Path(model)
    cfg, found, weights = _hf_source(model) if is_hf_folder(model) else _checkpoint_source(model)
    base = base_tokenizer or found
    if base is None:
        raise FileNotFoundError(f"no tokenizer found for {model}: pass --base-tokenizer")
    old, new = Tokenizer(base), Tokenizer(tokenizer)
    check_extends(old, new, cfg.vocab_size)
    grown, state = resize_vocabulary(weights(), cfg, old, new, init)
    return export_hf(state, grown, out_dir, tokenizer_path=new.model_path,
                     dtype=state["tok_embeddings.weight"].dtype)


def add_resize_parser(sub) -> None:
    resize = sub.add_parser("resize", help="grow the embedding and the output head to a tokenizer that extends "
                                           "the model's vocabulary (writes a Hugging Face folder)")
    resize.add_argument("model")
    resize.add_argument("tokenizer", help="the new SentencePiece model (NEW.model)")
    resize.add_argument("out_dir")
    resize.add_argument("--init", default="subtoken_mean", help=f"the new rows' rule: {' | '.join(INITS)}")
    resize.add_argument("--base-tokenizer", default=None,
                        help="the model's own tokenizer (default: the folder's, or the training manifest's)")


def resize_command(args) -> Path:
    return resize_model(args.model, args.tokenizer, args.out_dir, args.init, args.base_tokenizer)
