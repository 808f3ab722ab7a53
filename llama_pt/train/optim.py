"""AdamW and the learning-rate schedule of the LLaMA paper (Touvron et al. 2023, Section 2.3).

AdamW with beta1 = 0.9, beta2 = 0.95, weight decay 0.1 and gradient clipping 1.0; a cosine schedule
whose final learning rate is 10% of the peak, after a linear warmup (2000 steps in the paper).
Weight decay applies to weight matrices only: never to norm weights; to the embedding and output
head only when ``decay_embeddings`` is set.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import OptimConfig

EMBEDDING_NAMES = ("tok_embeddings.weight", "output.weight")


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and undecayed norms (and embeddings if so configured)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith(EMBEDDING_NAMES)
        if p.ndim >= 2 and (cfg.decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # foreach=False keeps the update order, and so the float rounding, independent of batching choices.
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             foreach=False)


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based, the run trains steps 0 .. total_steps - 1):
    linear warmup to the peak at step warmup_steps - 1, then a cosine from the peak at step warmup_steps
    down to min_lr_ratio of it at the last trained step, total_steps - 1."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
