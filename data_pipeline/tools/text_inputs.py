"""Reading the plain inputs of the model-training commands (reference text, labelled corpora, samples).

An input is a file or a folder, which stands for every file under it that is not hidden (sorted by
path, subfolders included). Two kinds of file are accepted, plain, gzip or zstd (told by the first
bytes), in UTF-8 (a UTF-16 file raises ``NotUtf8Error`` naming it):
- JSON lines (``.jsonl``, ``.json``): one Document record per line; its ``text`` field is one example
  (bad records are skipped by the pipeline's own JSONL reader, which counts them).
- anything else is text: every non-blank line is one example (CCNet's LM training text has one
  paragraph per line).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator

from ..compression import open_utf8
from ..readers import InputShard, make_reader

_JSON_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: str | Path) -> bool:
    name = Path(path).name
    for compressed in (".gz", ".zst"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    return name.endswith(_JSON_SUFFIXES)


def input_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The files that ``paths`` name, in order: a file as it is, a folder as its files (see above)."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file()
                              and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"input file not found: {path}")


def iter_documents_text(paths: Iterable[str | Path], language: str | None = None) -> Iterator[str]:
    """The text of every document (JSONL) or non-blank line (text file) in ``paths``, in order.

    With ``language``, JSONL documents whose ``metadata.language`` is set to another language are
    skipped (a sample taken after language ID); text files are taken as they are.
    """
    for path in input_files(paths):
        if is_jsonl(path):
            reader = make_reader("jsonl", source=path.stem)
            for doc in reader.read(InputShard(str(path))):
                lang = doc.metadata.get("language")
                if language is None or lang is None or lang == language:
                    yield doc.text
        else:
            with open_utf8(path) as raw:
                for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                    line = line.strip()
                    if line:
                        yield line
