"""The document clean-up step: Unicode normal form, line ends, control characters, blank-line runs."""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Iterator

from ..ccnet_normalization import NON_PRINTING
from ..document import Document
from ..step import Step

_CONTROL = str.maketrans("", "", "".join(c for c in NON_PRINTING if c not in "\n\t"))
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")


class Normalize(Step):
    """Unicode NFC, ``\\r\\n``/``\\r`` to ``\\n``, control characters (but tab and newline) removed,
    trailing spaces cut, runs of blank lines collapsed to one; documents left empty are dropped."""

    name = "normalize"

    def __init__(self, form: str = "NFC", max_blank_lines: int = 1) -> None:
        super().__init__()
        if form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalize.form={form!r} must be one of NFC, NFKC, NFD, NFKD")
        self.form = form
        self.blank_runs = re.compile(r"\n{%d,}" % (max_blank_lines + 2))
        self.blank_repl = "\n" * (max_blank_lines + 1)

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize(self.form, text.replace("\r\n", "\n").replace("\r", "\n"))
        text = _TRAILING_SPACE.sub("\n", text.translate(_CONTROL))
        return self.blank_runs.sub(self.blank_repl, text).strip()

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            text = self.normalize(doc.text)
            if not text:
                self.drop("empty")
                continue
            if text != doc.text:
                self.count("changed")
                doc.text = text
            yield doc
