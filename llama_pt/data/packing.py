"""Packing documents into fixed windows of seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]).

Training (`PackedSource`): for each epoch e of a source, its documents (all its shards, in manifest
order) are permuted by a generator seeded with (seed, source name, e), concatenated, and cut into
windows: window k covers tokens [k * seq_len, k * seq_len + seq_len + 1) of that stream, so
consecutive windows share one token and every token but the first is a target once. The
(T - 1) mod seq_len tokens at the end of each epoch's stream are not used. Windows are then
permuted within the epoch by a second generator from (seed, source name, e). Sample j of the source
is window perm_e[j mod W] of epoch e = j // W, W = (T - 1) // seq_len.

The generators are np.random.default_rng([seed, crc32(name), e, purpose]) with purpose 0 for the
document order and 1 for the window order; each draws one `.permutation`. An epoch's tables
(document order, the token offset of each document in that order [n_docs + 1], window order) live in
memory-mapped files (table_store.py) under `index_dir/<name>-<key>/epoch_NNNNNN/`. The key hashes
everything the tables depend on: seed, source name, seq_len, and the path, size, mtime and inode of
each shard's .idx and .bin, so a changed shard never meets an old table. An epoch is built by the
first process that needs it (or ahead of time by `build_epochs`), once, and every rank and loader
worker of the machine then shares the same pages: a source holds O(number of shards) memory of its
own, and pickling it carries its paths. Building an epoch of n documents holds about 12 n bytes
(plus 24 bytes per document of the largest shard) in the building process while it runs.

Documents carry their own trailing EOS (see indexed.py), so concatenation puts exactly one EOS
between documents.

Evaluation (`SequentialWindows`): the same cut over the shards in file order, no shuffling, with the
leftover tail as one last, shorter window, so every token after the first is scored exactly once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .indexed import PathLike
from .shards import Shards
from .table_store import TableStore

_DOC_ORDER, _WINDOW_ORDER = 0, 1
TABLE_FORMAT = 1  # part of every key: a change to the tables' layout invalidates all caches
OFFSETS_CHUNK = 1 << 22


def _rng(seed: int, name: str, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), epoch, purpose])


def _index_dtype(n: int) -> type:
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def default_index_dir() -> Path:
    """Where a `PackedSource` built without `index_dir` keeps its tables: a per-user folder in the
    system's temporary directory (tempfile.gettempdir()), seen by the processes of one machine only."""
    return Path(tempfile.gettempdir()) / f"llama_pt-data-index-{os.getuid()}"


class PackedSource:
    """One source's training windows; `src[j]` -> int64 array [seq_len + 1], j >= 0 (epochs repeat).

    `index_dir` is where the epoch tables are kept (default: `default_index_dir()`); processes that see
    the same folder share them, and each epoch is built there once. `cache_epochs` epochs stay mapped
    at a time."""

    def __init__(self, name: str, prefixes: Sequence[PathLike], seq_len: int, seed: int,
                 index_dir: Optional[PathLike] = None, cache_epochs: int = 2):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.name, self.prefixes, self.seq_len, self.seed = name, list(prefixes), int(seq_len), int(seed)
        self.cache_epochs = cache_epochs
        self._shards = Shards(self.prefixes, random_access=True)  # documents are read in shuffled order
        self.windows_per_epoch = (self.num_tokens - 1) // self.seq_len if self.num_tokens else 0
        if self.windows_per_epoch == 0:
            raise ValueError(f"source {name!r} has {self.num_tokens} tokens, fewer than seq_len + 1 = "
                             f"{self.seq_len + 1} ({', '.join(map(str, self.prefixes))})")
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
        self.index_key = self._key()
        self._store = TableStore(self.index_dir)
        self._tables: OrderedDict[int, tuple] = OrderedDict()

    @property
    def num_docs(self) -> int:
        return self._shards.num_docs

    @property
    def num_tokens(self) -> int:
        return self._shards.num_tokens

    def _key(self) -> str:
        """`<name>-<hash>`: the folder of this source's tables, keyed by everything they depend on."""
        inputs = {"format": TABLE_FORMAT, "source": self.name, "seed": self.seed, "seq_len": self.seq_len,
                  "shards": self._shards.identity()}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:20]
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)[:48]}-{digest}"

    def _table_set(self, epoch: int) -> str:
        return f"{self.index_key}/epoch_{epoch:06d}"

    def _write_epoch(self, epoch: int, folder: Path) -> None:
        """Compute epoch `epoch`'s three tables into `folder` (doc_order, doc_offsets, window_order .npy)."""
        n = self.num_docs
        doc_order = _rng(self.seed, self.name, epoch, _DOC_ORDER).permutation(n).astype(_index_dtype(n))
        np.save(folder / "doc_order.npy", doc_order, allow_pickle=False)
        lengths = self._shards.doc_lengths()
        offsets = np.lib.format.open_memmap(folder / "doc_offsets.npy", mode="w+", dtype=np.int64, shape=(n + 1,))
        offsets[0] = 0
        for a in range(0, n, OFFSETS_CHUNK):
            part = np.cumsum(lengths[doc_order[a:a + OFFSETS_CHUNK]], dtype=np.int64)
            offsets[a + 1:a + 1 + len(part)] = part + offsets[a]
        offsets.flush()
        del offsets, lengths, doc_order
        w = self.windows_per_epoch
        window_order = _rng(self.seed, self.name, epoch, _WINDOW_ORDER).permutation(w).astype(_index_dtype(w))
        np.save(folder / "window_order.npy", window_order, allow_pickle=False)

    def build_epochs(self, epochs: Iterable[int]) -> int:
        """Make sure the tables of these epochs exist on disk; returns how many this call built."""
        return sum(self._store.build(self._table_set(e), lambda folder, e=e: self._write_epoch(e, folder))
                   for e in epochs)

    def epochs_for(self, num_samples: int) -> range:
        """The epochs that this source's samples [0, num_samples) fall in."""
        return range(-(-int(num_samples) // self.windows_per_epoch))

    def epoch_tables(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, token offsets of that order [n_docs + 1], window order) of one epoch,
        memory-mapped read-only; built first if no process has built them yet."""
        if epoch in self._tables:
            self._tables.move_to_end(epoch)
            return self._tables[epoch]
        t = self._store.load(self._table_set(epoch), lambda folder: self._write_epoch(epoch, folder))
        self._tables[epoch] = (t["doc_order"], t["doc_offsets"], t["window_order"])
        while len(self._tables) > self.cache_epochs:
            self._tables.popitem(last=False)
        return self._tables[epoch]

    def __getitem__(self, j: int) -> np.ndarray:
        if j < 0:
            raise IndexError(f"sample {j} of source {self.name!r} is negative")
        epoch, r = divmod(int(j), self.windows_per_epoch)
        doc_order, offsets, window_order = self.epoch_tables(epoch)
        start = int(window_order[r]) * self.seq_len
        stop = start + self.seq_len + 1
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, stop, side="left"))
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        pos = 0
        for i in range(first, last):
            a = max(start, int(offsets[i])) - int(offsets[i])
            b = min(stop, int(offsets[i + 1])) - int(offsets[i])
            if b > a:
                out[pos:pos + b - a] = self._shards.doc_slice(int(doc_order[i]), a, b)
                pos += b - a
        assert pos == self.seq_len + 1
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tables"] = OrderedDict()  # each loader worker maps the files again
        return state


class SequentialWindows:
    """Held-out windows over the shards in order: `len()` windows, `[k]` -> int64 array.

    Windows 0..n-2 have seq_len + 1 tokens; the last has seq_len + 1 or fewer (the tail).
    """

    def __init__(self, prefixes: Sequence[PathLike], seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive")
        if not prefixes:
            raise ValueError("no held-out shard prefixes given")
        self.seq_len = int(seq_len)
        self._shards = Shards(prefixes)
        if self._shards.num_tokens < 2:
            raise ValueError(f"held-out shards hold {self._shards.num_tokens} tokens, need at least 2 "
                             f"({', '.join(map(str, prefixes))})")
        self.num_targets = self._shards.num_tokens - 1
        self.num_full = self.num_targets // self.seq_len

    def __len__(self) -> int:
        return self.num_full + (1 if self.num_targets % self.seq_len else 0)

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(f"window {k} out of range ({len(self)} windows)")
        start = k * self.seq_len
        return self._shards.token_slice(start, min(start + self.seq_len + 1, self._shards.num_tokens))
