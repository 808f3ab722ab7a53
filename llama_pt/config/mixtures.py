"""Published data mixtures, by name: each source's sampling proportion and the epochs it made.

The numbers live in the trainer's data config group, which users select with `data=<file>`; this module
reads them from there for the data pipeline (`mixture.preset=<name>` in a recipe writes them into the
mixture manifest), so each mixture is written down once:

- ``llama1``: configs/data/llama1_table1.yaml, Touvron et al. 2023 (LLaMA), Table 1 — sampling proportion
  (percent of the 1.4T training tokens drawn from the source) and the epochs that gave over the run.

Torch-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import yaml

from .compose import REPO_CONFIGS

MIXTURE_FILES = {"llama1": REPO_CONFIGS / "data" / "llama1_table1.yaml"}


class SourceShare(NamedTuple):
    percent: float  # sampling proportion, percent
    epochs: float


def _read(path: Path) -> dict[str, SourceShare]:
    group = yaml.safe_load(path.read_text())
    return {name: SourceShare(float(percent), float(group["epochs"][name]))
            for name, percent in group["weights"].items()}


MIXTURES: dict[str, dict[str, SourceShare]] = {name: _read(path) for name, path in MIXTURE_FILES.items()}

