"""Several indexed shards read as one numbered list of documents and one stream of tokens.

Document d of the list is document d - first_doc[s] of shard s, where first_doc holds the running
document counts of the shards in the given order; tokens are numbered the same way. Every shard is
memory-mapped (indexed.IndexedDataset), so a `Shards` holds O(number of shards) memory, and pickling
it (for a loader worker) carries the shard prefixes only. `random_access` is passed to every shard.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .indexed import IndexedDataset, PathLike, bin_path, idx_path


class Shards:
    """The documents of several shards as one numbered list."""

    def __init__(self, prefixes: Sequence[PathLike], random_access: bool = False):
        self.datasets = [IndexedDataset(p, random_access) for p in prefixes]
        self.first_doc = np.cumsum([0] + [len(ds) for ds in self.datasets])
        self.first_token = np.cumsum([0] + [ds.num_tokens for ds in self.datasets])

    @property
    def num_docs(self) -> int:
        return int(self.first_doc[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.first_token[-1])

    def doc_lengths(self) -> np.ndarray:
        """The token count of every document (int64, O(num_docs) memory: computed on each call)."""
        out = np.empty(self.num_docs, dtype=np.int64)
        for ds, first in zip(self.datasets, self.first_doc):
            out[first:first + len(ds)] = ds.doc_lengths
        return out

    def identity(self) -> list[list]:
        """Per shard: the absolute path, size, mtime_ns and inode of its .idx and of its .bin.

        A shard rewritten in place or replaced by a rename changes at least one of these."""
        out = []
        for ds in self.datasets:
            for path in (idx_path(ds.prefix), bin_path(ds.prefix)):
                st = os.stat(path)
                out.append([os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino])
        return out

    def doc_slice(self, d: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of document d."""
        s = int(np.searchsorted(self.first_doc, d, side="right")) - 1
        ds = self.datasets[s]
        start = ds.doc_start(d - int(self.first_doc[s]))
        return ds.tokens[start + a:start + b]

    def token_slice(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the shards' concatenation, as int64."""
        out = np.empty(b - a, dtype=np.int64)
        s = int(np.searchsorted(self.first_token, a, side="right")) - 1
        pos = 0
        while pos < b - a:
            ds, base = self.datasets[s], int(self.first_token[s])
            lo = a + pos - base
            hi = min(b - base, ds.num_tokens)
            out[pos:pos + hi - lo] = ds.tokens[lo:hi]
            pos += hi - lo
            s += 1
        return out
