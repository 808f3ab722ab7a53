"""The trainer's checkpoints: what goes in (the engine's tensors through the checkpoint layout, the
trainer state, the RNG), where (`<out_dir>/checkpoints`), and which one a run resumes from.

The folder format, atomic writing and verification are .checkpoint's; how a rank's tensors enter DCP
(TP shards, ZeRO partition fragments) is llama_pt.parallel.checkpoint_layout's.
"""
from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import ModelConfig, PeftConfig
from ..parallel import CheckpointLayout
from . import checkpoint as ckpt


def rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str]) -> None:
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def checkpoint_to_resume(folder: Path, resume: str) -> Optional[Path]:
    """train.resume: `none`, `auto` (the newest checkpoint in `folder` that verifies) or a checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return ckpt.latest_valid_checkpoint(folder)
    return Path(resume)


def peft_record(peft: PeftConfig) -> dict[str, Any]:
    """The peft settings as the trainer state stores them (plain JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(peft).items()}


class CheckpointManager:
    """Saves and restores one engine's tensors with the trainer state; every rank calls save/restore."""

    def __init__(self, folder: Path, engine, params: Callable[[], dict[str, torch.nn.Parameter]],
                 layout: CheckpointLayout, model_config: ModelConfig, peft: PeftConfig, keep_last: Optional[int]):
        self.folder, self.engine, self.params, self.layout = folder, engine, params, layout
        self.model_config, self.peft, self.keep_last = model_config, peft, keep_last
        self.saved_at: Optional[int] = None  # the step of the newest checkpoint this run wrote or loaded

    def latest_valid(self, log: Callable[[str], None]) -> Optional[Path]:
        return ckpt.latest_valid_checkpoint(self.folder, log=log)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step` with the trainer `state` (RNG states added here)."""
        target = self.layout.engine_checkpoint(self.engine, self.params())
        path = ckpt.save_checkpoint(self.folder, step, target.tree, {**state, "rng": rng_state()},
                                    keep_last=self.keep_last)
        self.saved_at = step
        return path

    def restore(self, path: Path, verified: bool = False) -> dict[str, Any]:
        """Load `path` into the engine and set the RNG; returns the trainer state. ``verified``: its checksums
        were just checked (by latest_valid_checkpoint), so they are not computed a second time."""
        state = ckpt.read_trainer_state(path) if verified else ckpt.verified_state(path)
        if ModelConfig.from_stored(state["model_config"]) != self.model_config:
            raise ckpt.CheckpointError(f"checkpoint {path} was written for a different model config")
        if state.get("peft", peft_record(PeftConfig())) != peft_record(self.peft):
            raise ckpt.CheckpointError(f"checkpoint {path} was written with other peft settings "
                                       f"({state.get('peft', 'none')}, this run: {peft_record(self.peft)})")
        target = self.layout.engine_checkpoint(self.engine, self.params())
        ckpt.load_verified(path, target.tree)
        target.loaded()
        set_rng_state(state["rng"])
        self.saved_at = state["step"]
        return state
