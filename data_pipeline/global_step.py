"""Steps that decide with knowledge of every shard of their source: dedup across a whole run.

A ``GlobalStep`` runs in three passes, each a set of independent tasks that the executors run like
any other (completion markers, reruns of unfinished tasks only):

1. **hash** (``scan``), one task per shard: the documents as they reach the step (the reader and the
   steps placed before it in the recipe) are summarised into files under the step's work folder
   ``work/<source>/<step key>/`` — line or document hashes, MinHash signatures;
2. **merge** (``merge``), ``merge_units()`` tasks (one per hash partition, or a single one): the
   shards' files are combined into what the filter needs — which hashes are duplicated, which
   documents to drop;
3. **filter**: the step itself in the clean stage; ``setup(ctx)`` loads the merge's result for its
   shard and ``run`` removes what it says while the documents stream past.

The global order of a source's documents is (shard index, position in the shard's stream at the
step); "the first occurrence" means the first in that order. Several global steps in one source run
one after another (``pipeline.dedup_rounds``): the hash pass of each sees the documents after the
filters of the earlier ones. Every file is a numpy array (``.npy``, or ``.npz`` of several) saved
without pickle by ``save_npy``/``save_npz``: under a temporary name, renamed when complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .document import Document
from .step import Step
from .task import output_file


def save_npy(path: Path, array: np.ndarray) -> None:
    with output_file(path) as f:
        np.save(f, array, allow_pickle=False)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with output_file(path) as f:
        np.savez(f, **arrays)


def mismatch_error(step: str, path: Path, detail: str) -> RuntimeError:
    """The error of a filter pass that does not see the documents its hash pass saw."""
    return RuntimeError(f"{step}: the documents differ from the hash pass of {path} ({detail}); delete it and rerun")


class GlobalStep(Step):
    """Base class of the steps run in the three passes above (subclasses define all four methods)."""

    def scan(self, docs: Iterable[Document], step_dir: Path, shard_index: int) -> dict[str, int]:
        """Pass 1 for one shard: consume ``docs``, write this shard's files under ``step_dir``."""
        raise NotImplementedError

    def merge_units(self) -> int:
        """How many independent merge tasks pass 2 has."""
        return 1

    def merge(self, step_dir: Path, unit: int, num_shards: int) -> dict[str, int]:
        """Pass 2, task ``unit``: combine the files of the ``num_shards`` shards."""
        raise NotImplementedError

    def setup(self, ctx) -> None:
        """Pass 3: load what the filter of shard ``ctx.shard_index`` needs from ``ctx.step_dir``."""
        raise NotImplementedError
