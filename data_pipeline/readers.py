"""Readers: input shards (files, or parts of a saved Hugging Face dataset) -> Documents.

JSONL and WET files are opened with ``compression.open_utf8``: plain, gzip or zstd as the first bytes
say (whatever the name), a leading UTF-8 byte-order mark skipped, CRLF line ends accepted. An empty
file yields nothing. A UTF-16 file raises ``NotUtf8Error`` naming it: its records are good, so it stops
the task rather than being dropped (convert it and rerun; finished tasks are not redone).

Every reader counts what it reads (``read``) and each bad record under ``bad/<reason>``, skips it and
goes on: the run never crashes on a record and never drops a good one. Reasons:

- ``invalid_utf8``    bytes that do not decode as UTF-8 (or a JSON escape of a lone surrogate)
- ``malformed_json``  a JSONL line that is not a JSON object
- ``missing_text``    no text field, or a null one
- ``text_not_string`` a text field that is a list, a number, an object: never coerced
- ``nul_bytes``       a NUL byte in the record or its text
- ``oversize``        a record over ``max_doc_bytes`` (skipped while streaming, never held in memory)
- ``empty_text``      text that is empty or only whitespace
- ``truncated_file``  a gzip/zstd stream cut short: every record before the cut is kept
- ``corrupt_file``    a file that cannot be decoded from some point on (records up to it are kept)
- ``malformed_record``/``truncated_record`` WARC framing errors (bad header, short content)
"""
from __future__ import annotations

import glob
import io
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import zstandard

from .compression import open_utf8
from .document import Document

DEFAULT_MAX_DOC_BYTES = 10_000_000
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")
# EOFError: a compressed stream cut inside a member; the others: bytes that cannot be decoded
# (or a file that cannot be read at all).
_STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)


@dataclass(frozen=True)
class InputShard:
    """One unit of reading: a file, or part ``part`` of ``num_parts`` of a saved dataset."""

    path: str
    part: int = 0
    num_parts: int = 1

    def describe(self) -> str:
        return self.path if self.num_parts == 1 else f"{self.path}[{self.part}/{self.num_parts}]"


class Reader:
    """Base reader: ``read(shard)`` yields Documents and updates ``stats``."""

    format = ""

    def __init__(self, source: str, text_key: str = "text", id_key: str = "id",
                 max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> None:
        self.source = source
        self.text_key = text_key
        self.id_key = id_key
        self.max_doc_bytes = int(max_doc_bytes)
        self.stats: Counter[str] = Counter()

    def bad(self, reason: str) -> None:
        self.stats[f"bad/{reason}"] += 1

    def list_shards(self, patterns: list[str], num_shards: int | None = None) -> list[InputShard]:
        """Every file matching ``patterns`` (sorted), one shard each."""
        return [InputShard(p) for p in expand_paths(patterns)]

    def read(self, shard: InputShard) -> Iterator[Document]:
        raise NotImplementedError

    def _from_record(self, record: Any, default_id: str) -> Document | None:
        """A Document from a decoded record (dict), or None after counting why it is bad."""
        if not isinstance(record, dict):
            self.bad("malformed_json")
            return None
        text = record.get(self.text_key)
        if text is None:
            self.bad("missing_text")
            return None
        if not isinstance(text, str):
            self.bad("text_not_string")
            return None
        if "\x00" in text:
            self.bad("nul_bytes")
            return None
        if len(text) * 4 > self.max_doc_bytes and len(text.encode("utf-8", "surrogatepass")) > self.max_doc_bytes:
            self.bad("oversize")
            return None
        if not text.strip():
            self.bad("empty_text")
            return None
        meta = dict(record["metadata"]) if isinstance(record.get("metadata"), dict) else {}
        for key, value in record.items():
            if key not in (self.text_key, self.id_key, "metadata", "source"):
                meta[key] = value
        doc_id = record.get(self.id_key)
        self.stats["read"] += 1
        return Document(id=default_id if doc_id is None else str(doc_id), text=text, source=self.source,
                        metadata=meta)


def expand_paths(patterns: list[str] | str) -> list[str]:
    """Sorted files matching the glob patterns; FileNotFoundError names a pattern matching nothing."""
    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"no input matches {pattern}")
        found.extend(matches)
    return sorted(dict.fromkeys(found))


def _count_stream_error(exc: Exception, stats: Counter[str]) -> None:
    """Count a stream error from ``_STREAM_ERRORS`` as ``bad/truncated_file`` or ``bad/corrupt_file``."""
    stats["bad/truncated_file" if isinstance(exc, EOFError) else "bad/corrupt_file"] += 1


def _open_counted(path: str, stats: Counter[str]) -> io.BufferedReader | None:
    """``open_utf8(path)``, or None after counting why nothing of it can be decoded."""
    try:
        return open_utf8(path)
    except _STREAM_ERRORS as exc:
        _count_stream_error(exc, stats)
        return None


def bounded_lines(stream, max_bytes: int, stats: Counter[str]) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each line of ``stream``; longer lines are skipped (``bad/oversize``)
    without being held in memory; a cut or corrupt stream ends the iteration after counting it."""
    lineno = 0
    try:
        while True:
            line = stream.readline(max_bytes + 1)
            if not line:
                return
            lineno += 1
            if len(line) > max_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = stream.readline(1 << 20)
                stats["bad/oversize"] += 1
                continue
            yield lineno, line
    except _STREAM_ERRORS as exc:
        _count_stream_error(exc, stats)


class JsonlReader(Reader):
    """One JSON object per line, plain, gzip or zstd; ``id`` defaults to ``<file name>/<line number>``."""

    format = "jsonl"

    def read(self, shard: InputShard) -> Iterator[Document]:
        name = Path(shard.path).name
        stream = _open_counted(shard.path, self.stats)
        if stream is None:
            return
        with stream:
            for lineno, raw in bounded_lines(stream, self.max_doc_bytes, self.stats):
                if not raw.strip():
                    continue
                if b"\x00" in raw:
                    self.bad("nul_bytes")
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.bad("invalid_utf8")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.bad("malformed_json")
                    continue
                if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(record):
                    self.bad("invalid_utf8")
                    continue
                doc = self._from_record(record, f"{name}/{lineno}")
                if doc is not None:
                    yield doc


def _has_lone_surrogate(record: Any) -> bool:
    """True when a decoded JSON value holds a string that is not valid Unicode (a lone surrogate)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ParquetReader(Reader):
    """Rows of a Parquet file, read in record batches; ``id`` defaults to ``<file name>/<row>``."""

    format = "parquet"

    def __init__(self, *args, batch_size: int = 1024, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = int(batch_size)

    def read(self, shard: InputShard) -> Iterator[Document]:
        import pyarrow
        import pyarrow.parquet as pq

        name = Path(shard.path).name
        row = 0
        try:
            batches = pq.ParquetFile(shard.path).iter_batches(batch_size=self.batch_size)
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    doc = self._from_record(record, f"{name}/{row}")
                    if doc is not None:
                        yield doc
        except (pyarrow.ArrowException, OSError):
            self.bad("corrupt_file")


class HFDiskReader(Reader):
    """A dataset saved with ``Dataset.save_to_disk``, split into ``num_shards`` contiguous parts."""

    format = "hf"

    def __init__(self, *args, split: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.split = split

    def list_shards(self, patterns: list[str], num_shards: int | None = None) -> list[InputShard]:
        n = max(1, int(num_shards or 1))
        return [InputShard(p, i, n) for p in expand_paths(patterns) for i in range(n)]

    def read(self, shard: InputShard) -> Iterator[Document]:
        import datasets

        ds = datasets.load_from_disk(shard.path)
        if isinstance(ds, datasets.DatasetDict):
            if self.split is None:
                raise ValueError(f"{shard.path} holds splits {sorted(ds)}; set the source's split")
            ds = ds[self.split]
        part = ds.shard(shard.num_parts, shard.part, contiguous=True)
        start = sum(len(ds) // shard.num_parts + (i < len(ds) % shard.num_parts) for i in range(shard.part))
        name = Path(shard.path).name
        for offset, record in enumerate(part):
            doc = self._from_record(record, f"{name}/{start + offset}")
            if doc is not None:
                yield doc


class WetReader(Reader):
    """Common Crawl WET files (WARC records of ``WARC-Type: conversion``): id is the record id, the
    URL, date and digest go to metadata. Other record types (warcinfo) are counted and skipped."""

    format = "wet"
    MAX_HEADER_LINE = 1 << 16

    def read(self, shard: InputShard) -> Iterator[Document]:
        stream = _open_counted(shard.path, self.stats)
        if stream is None:
            return
        with stream:
            try:
                yield from self._records(stream)
            except _STREAM_ERRORS as exc:
                _count_stream_error(exc, self.stats)

    def _records(self, stream) -> Iterator[Document]:
        while True:
            headers = self._read_headers(stream)
            if headers is None:
                return
            try:
                length = int(headers.get("content-length", ""))
            except ValueError:
                self.bad("malformed_record")
                continue
            if length > self.max_doc_bytes:
                self._skip(stream, length)
                self.bad("oversize")
                continue
            body = stream.read(length)
            if len(body) < length:
                self.bad("truncated_record")
                return
            if headers.get("warc-type") != "conversion":
                self.stats[f"skipped/{headers.get('warc-type', 'unknown')}"] += 1
                continue
            doc = self._to_document(headers, body)
            if doc is not None:
                yield doc

    def _read_headers(self, stream) -> dict[str, str] | None:
        """Headers of the next record (keys lower-cased), skipping anything before ``WARC/``."""
        skipped = False
        while True:
            line = stream.readline(self.MAX_HEADER_LINE)
            if not line:
                if skipped:
                    self.bad("malformed_record")
                return None
            if line.startswith(b"WARC/"):
                break
            if line.strip():
                skipped = True
        if skipped:
            self.bad("malformed_record")
        headers: dict[str, str] = {}
        while True:
            line = stream.readline(self.MAX_HEADER_LINE)
            if not line.strip():
                return headers
            key, sep, value = line.decode("utf-8", "replace").partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()

    @staticmethod
    def _skip(stream, length: int) -> None:
        while length > 0:
            chunk = stream.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _to_document(self, headers: dict[str, str], body: bytes) -> Document | None:
        if b"\x00" in body:
            self.bad("nul_bytes")
            return None
        try:
            text = body.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.bad("invalid_utf8")
            return None
        if not text:
            self.bad("empty_text")
            return None
        record_id = headers.get("warc-record-id", "").strip("<>").removeprefix("urn:uuid:")
        url = headers.get("warc-target-uri", "")
        meta = {"url": url, "date": headers.get("warc-date", ""), "digest": headers.get("warc-block-digest", "")}
        if "warc-identified-content-language" in headers:
            meta["cc_languages"] = headers["warc-identified-content-language"]
        self.stats["read"] += 1
        return Document(id=record_id or url, text=text, source=self.source, metadata=meta)


READERS: dict[str, type[Reader]] = {cls.format: cls for cls in (JsonlReader, ParquetReader, HFDiskReader, WetReader)}


def make_reader(fmt: str, source: str, **kwargs: Any) -> Reader:
    """The reader for ``fmt`` (jsonl, parquet, hf, wet); ValueError names an unknown format."""
    if fmt not in READERS:
        raise ValueError(f"unknown input format {fmt!r} (known: {', '.join(READERS)})")
    return READERS[fmt](source, **kwargs)
