"""What a run reports: a progress bar, metrics.jsonl, wandb (offline unless told otherwise), a loss-curve PNG.

Only the coordinating rank (global rank 0) writes anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ..atomic import atomic_path


class RunLogger:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, config: dict[str, Any],
                 wandb_cfg: dict[str, Any], enabled: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.bar: Optional[tqdm] = None
        self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None)
        if wandb_cfg.get("enabled", True):
            self.wandb = _start_wandb(out_dir, config, wandb_cfg)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(n)

    def close(self) -> Optional[Path]:
        """Finish wandb, draw the loss curve; returns the PNG path."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_loss_curve(self.metrics_path, self.out_dir / "loss_curve.png")


def _start_wandb(out_dir: Path, config: dict[str, Any], cfg: dict[str, Any]):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    return wandb.init(project=cfg.get("project", "llama_pt"), name=cfg.get("name"), dir=str(out_dir),
                      mode=cfg.get("mode", "offline"), config=config, resume="allow", id=cfg.get("id"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """The training (and held-out) loss by step; below it, when the run scored a downstream task
    (train.downstream_every), its accuracies (acc, acc_norm) by step in a second panel."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    downstream = {name: [(r["step"], r[key]) for r in records if key in r]
                  for name, key in (("acc", "downstream_acc"), ("acc_norm", "downstream_acc_norm"))}
    downstream = {name: points for name, points in downstream.items() if points}
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if downstream:
        fig, (ax, acc_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="held-out loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if downstream:
        for name, points in downstream.items():
            acc_ax.plot(*zip(*points), "s-", label=f"downstream {name}")
        acc_ax.set_ylabel("accuracy")
        acc_ax.grid(alpha=0.3)
        acc_ax.legend()
    (acc_ax if downstream else ax).set_xlabel("optimizer step")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return png_path
