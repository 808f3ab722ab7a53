"""One process of the real Trainer with the bookkeeping of tests/support/workers/train_worker.py: per step the
loss and a hash of the global batch (the reference the multi-process runs are compared with)."""
from __future__ import annotations

import hashlib

import torch

from llama_pt.config import resolve
from llama_pt.train.trainer import Trainer


def single_run(cfg: dict) -> dict:
    """One process with the same bookkeeping as the worker: per-step loss and global-batch hash."""
    run = resolve(cfg)
    trainer = Trainer(run, cfg)
    if trainer.resume_from is not None:
        trainer.restore(trainer.resume_from)
    steps, original = {}, trainer.train_step

    def recorded(micro_batches):
        digest = hashlib.sha256(torch.cat(micro_batches).numpy().tobytes()).hexdigest()
        metrics = original(micro_batches)
        steps[str(trainer.step)] = {"loss": metrics["loss"], "batch": digest}
        return metrics
    trainer.train_step = recorded
    trainer.fit(resumed_from=trainer.resume_from)
    return {"steps": steps}
