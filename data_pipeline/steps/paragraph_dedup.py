"""Paragraph (line) dedup across every shard of a source, as CCNet (Wenzek et al. 2020, Section 3.2).

Each line is normalised (``ccnet_normalization.normalize_for_dedup``) and hashed to 64 bits: the first 8 bytes of its
SHA-1, read as a little-endian uint64. A line whose hash occurs more than once in the whole run —
in any document of any shard, including twice in one document — is removed everywhere, all
occurrences. Blank lines are hashed like any other line (to the hash of ''), as in CCNet, so they go
too as soon as the corpus has more than one. Documents left without lines are dropped.

The hashes of every shard are compared by the three passes of ``hash_dedup.py`` (hash per shard,
merge per partition of the hash space, then this step's filter), which keep memory bounded:
pass 1 holds ~32 bytes per line of one shard; pass 2 ~16 bytes x (distinct lines per shard, summed
over shards) / P; pass 3 ~33 bytes per line of one shard plus 8 bytes x duplicated hashes / P.
Disk: ~8 bytes per line for ``seq`` plus ~8 per distinct line per shard (docs/data_pipeline.md).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import numpy as np

from ..ccnet_normalization import normalize_for_dedup
from ..document import Document
from ..hash_dedup import HASH_DTYPE, HashDedupStep


def line_hashes(text: str) -> np.ndarray:
    """The 64-bit hash of each ``\\n``-separated line of ``text`` (CCNet's ``compute_hashes``)."""
    lines = text.split("\n")
    digests = b"".join(hashlib.sha1(normalize_for_dedup(l).encode("utf-8")).digest()[:8] for l in lines)
    return np.frombuffer(digests, dtype=HASH_DTYPE)


class ParagraphDedup(HashDedupStep):
    """Removes the lines that occur more than once in the source (all occurrences); documents left
    without lines are dropped (``all_lines_duplicated``). ``partitions`` (16): hash partitions."""

    name = "paragraph_dedup"

    def hashes(self, doc: Document) -> np.ndarray:
        return line_hashes(doc.text)

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        mask = self.require_setup()
        pos = 0
        for doc in docs:
            lines = doc.text.split("\n")
            dup = mask[pos:pos + len(lines)]
            pos += len(lines)
            if dup.size != len(lines):
                break
            self.count("lines", len(lines))
            n_dup = int(dup.sum())
            if n_dup == 0:
                yield doc
                continue
            self.count("lines_removed", n_dup)
            self.count("chars_removed", sum(len(l) + 1 for l, d in zip(lines, dup) if d))
            if n_dup == len(lines):
                self.drop("all_lines_duplicated")
                continue
            doc.text = "\n".join(l for l, d in zip(lines, dup) if not d)
            yield doc
        self.check_consumed(pos, "lines")
