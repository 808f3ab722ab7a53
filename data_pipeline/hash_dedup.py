"""Deduplicating 64-bit hashes across every shard of a source with bounded memory: the machinery
that paragraph dedup (one hash per line, CCNet) and exact document dedup (one hash per document) share.

A ``HashDedupStep`` gives each document an array of hashes (``hashes(doc)``). The passes
(``global_step.py``), with P = ``partitions`` (a partition is a range of the hash's top 32 bits):

1. hash, one task per shard: the shard's hashes in stream order (``seq``) and, for each partition,
   its sorted distinct hashes and the hashes repeated inside the shard -> ``hashes/shard_XXXXX.npz``;
2. merge, one task per partition: the partition's distinct hashes of every shard, concatenated and
   sorted; values seen in two shards, plus those repeated inside one, are the duplicates ->
   ``dups/part_XXXX.npy`` (sorted uint64). With ``keep_first`` the merge also writes, for each
   duplicate, the lowest shard that has it -> ``first/part_XXXX.npy`` (int32, aligned with dups);
3. filter: the shard's ``seq`` looked up one partition at a time (binary search). Without
   ``keep_first`` (CCNet's rule) every occurrence of a duplicated hash is a duplicate; with it, all
   but the first in global order: the first position in ``seq`` of a hash whose first shard is this one.

Memory of one task (``L``: hashes in the source, ``S`` shards, ``U``: distinct hashes of each shard
summed over shards, ``D``: duplicated hashes): hash ~32 bytes x L/S; merge ~16 bytes x U/P
(~28 with ``keep_first``: the sort order and shard of each entry); filter ~33 bytes x L/S
(~37 with ``keep_first``) plus 8 bytes (12) x D/P. Only the merge grows with the corpus, divided by P.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .document import Document
from .global_step import GlobalStep, mismatch_error, save_npy, save_npz

HASH_DTYPE = np.dtype("<u8")


def partition_of(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """Partition index of each hash from its top 32 bits: floor(top32 * P / 2**32)."""
    return ((hashes >> np.uint64(32)) * np.uint64(partitions) >> np.uint64(32)).astype(np.int64)


def split_by_partition(hashes: np.ndarray, partitions: int) -> list[np.ndarray]:
    """Indices into ``hashes`` grouped by partition (each group in increasing order)."""
    parts = partition_of(hashes, partitions)
    order = np.argsort(parts, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(parts, minlength=partitions))])
    return [order[bounds[p]:bounds[p + 1]] for p in range(partitions)]


def hashes_path(step_dir: Path, shard_index: int) -> Path:
    return Path(step_dir) / "hashes" / f"shard_{shard_index:05d}.npz"


def dups_path(step_dir: Path, partition: int) -> Path:
    return Path(step_dir) / "dups" / f"part_{partition:04d}.npy"


def first_path(step_dir: Path, partition: int) -> Path:
    return Path(step_dir) / "first" / f"part_{partition:04d}.npy"


def write_shard_hashes(seq: np.ndarray, path: Path, partitions: int) -> None:
    """Pass 1 for one shard: ``seq`` and, per partition, its distinct and its repeated hashes."""
    arrays = {"seq": seq}
    for p, idx in enumerate(split_by_partition(seq, partitions)):
        values = np.sort(seq[idx])
        repeated = values[1:] == values[:-1]
        arrays[f"u{p}"] = np.unique(values)
        arrays[f"d{p}"] = np.unique(values[1:][repeated])
    save_npz(path, arrays)


def merge_partition(shard_files: list[Path], partition: int, step_dir: Path, keep_first: bool) -> dict[str, int]:
    """Pass 2 for one partition: the hashes seen in two shards or twice in one (and, with
    ``keep_first``, the lowest shard holding each) saved under ``step_dir``."""
    distinct, repeated = [], []
    for path in shard_files:
        with np.load(path, allow_pickle=False) as z:
            distinct.append(z[f"u{partition}"])
            repeated.append(z[f"d{partition}"])
    values = np.concatenate(distinct) if distinct else np.zeros(0, HASH_DTYPE)
    if keep_first:  # a stable sort keeps each value's entries in shard order
        order = np.argsort(values, kind="stable")
        shard_of = np.repeat(np.arange(len(distinct), dtype=np.int32), [d.size for d in distinct])[order]
        merged = values[order]
        del order
    else:
        merged = np.sort(values)
    del values
    new_run = np.ones(merged.size, dtype=bool)
    new_run[1:] = merged[1:] != merged[:-1]
    across = merged[1:][~new_run[1:]]
    dups = np.union1d(across, np.concatenate(repeated) if repeated else across).astype(HASH_DTYPE)
    if keep_first:  # the first entry of each value's run is its lowest shard
        starts = np.flatnonzero(new_run)
        save_npy(first_path(step_dir, partition), shard_of[starts[np.searchsorted(merged[starts], dups)]])
    save_npy(dups_path(step_dir, partition), dups)
    return {"distinct_hashes": int(np.count_nonzero(new_run)), "duplicate_hashes": int(dups.size)}


def duplicate_lookup(seq: np.ndarray, step_dir: Path, partitions: int,
                     keep_first: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(True for each entry of ``seq`` whose hash is duplicated, the lowest shard holding it or -1
    when ``keep_first``), one partition's arrays loaded at a time."""
    dup = np.zeros(seq.size, dtype=bool)
    first = np.full(seq.size, -1, dtype=np.int32) if keep_first else None
    for p, idx in enumerate(split_by_partition(seq, partitions)):
        dups = np.load(dups_path(step_dir, p), allow_pickle=False)
        if dups.size == 0 or idx.size == 0:
            continue
        values = seq[idx]
        pos = np.minimum(np.searchsorted(dups, values), dups.size - 1)
        hit = dups[pos] == values
        dup[idx] = hit
        if keep_first:
            first[idx[hit]] = np.load(first_path(step_dir, p), allow_pickle=False)[pos[hit]]
    return dup, first


def duplicate_mask(seq: np.ndarray, step_dir: Path, partitions: int, keep_first: bool, shard_index: int) -> np.ndarray:
    """True for each entry of this shard's ``seq`` that the filter removes (see the module docstring)."""
    dup, first = duplicate_lookup(seq, step_dir, partitions, keep_first)
    if keep_first:
        owned = np.flatnonzero(first == shard_index)
        _, first_pos = np.unique(seq[owned], return_index=True)  # first position of each value
        dup[owned[first_pos]] = False
    return dup


class HashDedupStep(GlobalStep):
    """A step deduplicating per-document arrays of 64-bit hashes across every shard of its source.

    Subclasses define ``hashes(doc)`` and ``run`` (which walks ``self.mask``, one entry per hash of
    each document in stream order, and calls ``self.check_consumed`` at the end), and set
    ``keep_first``. ``partitions`` (16): the number of hash partitions = merge tasks."""

    keep_first = False

    def __init__(self, partitions: int = 16) -> None:
        super().__init__()
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"{self.name}.partitions={partitions!r} must be an integer >= 1")
        self.partitions = partitions
        self.mask: np.ndarray | None = None
        self.seq: np.ndarray | None = None
        self.hash_file = Path()

    def hashes(self, doc: Document) -> np.ndarray:
        raise NotImplementedError

    def scan(self, docs: Iterable[Document], step_dir: Path, shard_index: int) -> dict[str, int]:
        chunks = [self.hashes(doc) for doc in docs]
        seq = np.concatenate(chunks) if chunks else np.zeros(0, HASH_DTYPE)
        write_shard_hashes(seq, hashes_path(step_dir, shard_index), self.partitions)
        return {"documents": len(chunks), "hashes": int(seq.size)}

    def merge_units(self) -> int:
        return self.partitions

    def merge(self, step_dir: Path, unit: int, num_shards: int) -> dict[str, int]:
        files = [hashes_path(step_dir, i) for i in range(num_shards)]
        return merge_partition(files, unit, step_dir, self.keep_first)

    def setup(self, ctx) -> None:
        self.hash_file = hashes_path(ctx.step_dir, ctx.shard_index)
        with np.load(self.hash_file, allow_pickle=False) as z:
            self.seq = z["seq"]
        self.mask = duplicate_mask(self.seq, ctx.step_dir, self.partitions, self.keep_first, ctx.shard_index)

    def require_setup(self) -> np.ndarray:
        if self.mask is None:
            raise RuntimeError(f"{self.name} needs setup(ctx) before it runs (after its hash and merge passes)")
        return self.mask

    def check_consumed(self, used: int, what: str) -> None:
        """Error unless the documents used exactly the hashes of the hash pass."""
        if used != self.mask.size:
            raise mismatch_error(self.name, self.hash_file, f"{used} {what} now, {self.mask.size} then")
