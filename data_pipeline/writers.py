"""Writing one shard's documents: jsonl.zst files, one per output group, atomically.

A document goes to ``<root>/<source>/<group>/<shard>.jsonl.zst`` where the group comes from its
metadata (``<language>_<bucket>`` after the perplexity step, ``<language>`` after LID alone, none
before), as CCNet splits its outputs. Each file is written under a temporary name (``task.output_file``)
and renamed only when the whole shard is done; the bytes depend only on the documents (fixed zstd
level, no timestamps).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from llama_pt.atomic import remove

from .compression import zstd_writer
from .document import Document
from .task import output_file, remove_leftovers

SUFFIX = ".jsonl.zst"


def group_of(doc: Document) -> str:
    """The output sub-folder of ``doc`` ('' when it has no language)."""
    lang = doc.metadata.get("language")
    if lang is None:
        return ""
    bucket = doc.metadata.get("bucket")
    return f"{lang}_{bucket}" if bucket is not None else str(lang)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars from model-based steps
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serialisable")


def dumps(doc: Document) -> str:
    return json.dumps(doc.to_json(), ensure_ascii=False, default=_json_default)


class ShardWriter:
    """Writes the documents of one shard, split by group; ``close()`` renames the finished files
    into place. Used as a context manager, an exception removes the unfinished files instead."""

    def __init__(self, root: str | Path, source: str, shard_name: str) -> None:
        self.dir = Path(root) / source
        self.file_name = shard_name + SUFFIX
        self._files = contextlib.ExitStack()
        self._streams: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def path_for(self, group: str) -> Path:
        return (self.dir / group if group else self.dir) / self.file_name

    def write(self, doc: Document) -> None:
        group = group_of(doc)
        stream = self._streams.get(group)
        if stream is None:
            stream = self._streams[group] = zstd_writer(self._files.enter_context(output_file(self.path_for(group))))
            self.counts[group] = 0
        stream.write((dumps(doc) + "\n").encode("utf-8"))
        self.counts[group] += 1

    def close(self) -> dict[str, int]:
        """Finish every file and rename it into place; returns documents per group."""
        for stream in self._streams.values():
            stream.close()
        self._files.close()
        self._streams = {}
        return dict(sorted(self.counts.items()))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._files.__exit__(exc_type, exc, tb)

    def remove_stale(self) -> None:
        """Delete this shard's files, finished or not, that an interrupted earlier attempt left."""
        for folder, _, _ in os.walk(self.dir):
            remove(Path(folder) / self.file_name)
            remove_leftovers(Path(folder) / self.file_name)
