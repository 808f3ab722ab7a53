"""Published data mixtures, by name: each source's sampling proportion and the epochs it made.

``llama1``: Touvron et al. 2023 (LLaMA), Table 1 — sampling proportion (percent of the 1.4T training
tokens drawn from the source) and the epochs that gave over the run. The data pipeline writes these into
the mixture manifest (``mixture.preset=llama1``); the trainer takes them with ``data.preset=llama1``.
Torch-free.
"""
from __future__ import annotations

from typing import NamedTuple

from .fields import ConfigError


class SourceShare(NamedTuple):
    percent: float  # sampling proportion, percent
    epochs: float


MIXTURES: dict[str, dict[str, SourceShare]] = {
    "llama1": {
        "commoncrawl": SourceShare(67.0, 1.10),
        "c4": SourceShare(15.0, 1.06),
        "github": SourceShare(4.5, 0.64),
        "wikipedia": SourceShare(4.5, 2.45),
        "books": SourceShare(4.5, 2.23),
        "arxiv": SourceShare(2.5, 1.06),
        "stackexchange": SourceShare(2.0, 1.03),
    },
}


def get_mixture(name: str, field: str) -> dict[str, SourceShare]:
    """The mixture called `name`; ConfigError naming `field` when there is none."""
    if name not in MIXTURES:
        raise ConfigError(f"{field}={name!r} is unknown (known: {', '.join(MIXTURES)})")
    return MIXTURES[name]
