"""Tokenization: train the SentencePiece tokenizer on a sample of the clean text, then encode every
clean shard into Megatron indexed token shards (one task per shard), one EOS after each document.

A document goes to the validation split when the first 8 bytes of SHA-1("<source>/<id>"), read as a
fraction of 2**64, fall below ``tokenize.valid_fraction``: a pure function of the document.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llama_pt.atomic import leftovers, remove

from .compression import open_binary
from .step import batched
from .writers import SUFFIX

TOKENIZER_NAME = "tokenizer"


def clean_files(clean_dir: Path, source: str) -> list[Path]:
    """The clean jsonl.zst shards of ``source`` (all groups), sorted."""
    return sorted((Path(clean_dir) / source).rglob("*" + SUFFIX))


def iter_clean_records(path: Path) -> Iterator[dict[str, Any]]:
    """The documents (JSON records) of one clean shard written by the pipeline."""
    with open_binary(path) as f:
        for line in f:
            yield json.loads(line)


def sample_texts(files: list[Path], sample_bytes: int) -> Iterator[str]:
    """About ``sample_bytes`` of text: from each file, its first documents, in proportion to its size."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes) or 1
    for path, size in zip(files, sizes):
        quota = sample_bytes * size / total
        taken = 0
        for record in iter_clean_records(path):
            if taken >= quota:
                break
            taken += len(record["text"].encode("utf-8"))
            yield record["text"]


def train_tokenizer(clean_dir: Path, sources: list[str], out_dir: Path, cfg: dict[str, Any], seed: int) -> Path:
    """``<out_dir>/tokenizer.model`` trained on a sample of the clean shards (skipped when it exists)."""
    from llama_pt.tokenizer import train_sentencepiece

    model = Path(out_dir) / f"{TOKENIZER_NAME}.model"
    if model.is_file():
        return model
    files = [f for s in sources for f in clean_files(clean_dir, s)]
    if not files:
        raise FileNotFoundError(f"{clean_dir}: no clean shards to train the tokenizer on; run the clean stage")
    return train_sentencepiece(sample_texts(files, cfg["sample_bytes"]), Path(out_dir) / TOKENIZER_NAME,
                               cfg["vocab_size"], input_sentence_size=cfg["input_sentence_size"],
                               num_threads=cfg["num_threads"], seed=seed,
                               character_coverage=cfg["character_coverage"])


def in_valid_split(source: str, doc_id: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(f"{source}/{doc_id}".encode("utf-8")).digest()[:8], "little")
    return h < fraction * 2.0 ** 64


def remove_writer_leftovers(prefix: Path) -> None:
    """Delete the temporary files (``llama_pt.atomic`` names) that a killed ``IndexedDatasetWriter`` of
    ``prefix`` left beside its ``.bin`` and ``.idx``."""
    from llama_pt.data.indexed import bin_path, idx_path

    for final in (bin_path(prefix), idx_path(prefix)):
        for tmp in leftovers(final):
            remove(tmp)


@dataclass
class EncodeTask:
    """Encode one clean shard into ``<tokens_dir>/<rel>`` (train) and ``<tokens_dir>/valid/<rel>``."""

    source: str
    clean_file: Path
    rel_prefix: str
    tokens_dir: Path
    tokenizer_model: Path
    batch_size: int = 256
    valid_fraction: float = 0.0

    @property
    def name(self) -> str:
        return f"tokenize/{self.rel_prefix}"

    @property
    def marker(self) -> Path:
        return Path(self.tokens_dir) / ".markers" / f"{self.rel_prefix}.json"

    def run(self) -> dict[str, Any]:
        from llama_pt.data.indexed import IndexedDatasetWriter
        from llama_pt.tokenizer import Tokenizer

        tok = Tokenizer(self.tokenizer_model)
        prefixes = {"train": self.rel_prefix, "valid": f"valid/{self.rel_prefix}"}
        for p in prefixes.values():
            remove_writer_leftovers(Path(self.tokens_dir) / p)
        writers = {k: IndexedDatasetWriter(Path(self.tokens_dir) / p, tok.vocab_size) for k, p in prefixes.items()}
        counts = {k: {"prefix": p, "documents": 0, "tokens": 0} for k, p in prefixes.items()}
        try:
            for batch in batched(iter_clean_records(self.clean_file), self.batch_size):
                ids = tok.encode_batch([r["text"] for r in batch], eos=True, num_threads=1)
                for record, tokens in zip(batch, ids):
                    split = "valid" if in_valid_split(self.source, record["id"], self.valid_fraction) else "train"
                    writers[split].add_document(np.asarray(tokens, dtype=np.int64))
                    counts[split]["documents"] += 1
                    counts[split]["tokens"] += len(tokens)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        for split, writer in writers.items():
            writer.finalize() if counts[split]["documents"] else writer.abort()
        return {"source": self.source, "file": str(self.clean_file), **counts}


def encode_tasks(clean_dir: Path, sources: list[str], tokens_dir: Path, model: Path,
                 cfg: dict[str, Any]) -> list[EncodeTask]:
    tasks = []
    for source in sources:
        for path in clean_files(clean_dir, source):
            rel = path.relative_to(clean_dir).as_posix()[: -len(SUFFIX)]
            tasks.append(EncodeTask(source, path, rel, tokens_dir, model, cfg["batch_size"], cfg["valid_fraction"]))
    return tasks
