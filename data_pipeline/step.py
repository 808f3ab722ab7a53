"""The shape of every pipeline step, and the two bases most steps build on.

A ``Step`` takes an iterator of Documents and yields Documents. It counts every document it drops
under a reason (``self.drop(reason)``, counter ``dropped/<reason>``) and may count anything else it
reports (``self.count(name)``); ``kept`` counts what it yields. Executors collect ``stats`` per shard
and merge them into the stage report.

- ``Filter``: decides document by document, with separate hooks for dropping and for rewriting text.
- ``BatchFilter``: decides ``batch_size`` documents at a time (one model call per batch).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, TypeVar

from .document import Document

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in consecutive lists of ``size`` (the last one shorter, none empty)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Step:
    name: str = "step"
    # Constructing the step loads large models: recipe checking then validates only the argument names
    # instead of building the step (which checks the values too).
    loads_models: bool = False

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    def drop(self, reason: str) -> None:
        self.stats[f"dropped/{reason}"] += 1

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in self.run(docs):
            self.stats["kept"] += 1
            yield doc


class Filter(Step):
    """A step that takes each document on its own: it may drop it, rewrite its text, or both.

    For each document ``run`` calls, in order, stopping at the first drop:

    1. ``reject_reason(doc)``: why the document as it arrives is dropped, or None;
    2. ``rewrite(doc)``: the document with its text rewritten (by default unchanged), or None when no
       text can be made of it, dropped as ``unrewritable``;
    3. ``reject_rewritten(doc)``: why the rewritten document is dropped, or None.

    Only ``rewrite`` changes a document; the two reject hooks only read it. Every document counts as
    ``seen``.
    """

    #: The drop reason of a document that ``rewrite`` returns None for.
    unrewritable: str = "unrewritable"

    def reject_reason(self, doc: Document) -> str | None:
        return None

    def rewrite(self, doc: Document) -> Document | None:
        return doc

    def reject_rewritten(self, doc: Document) -> str | None:
        return None

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.count("seen")
            reason = self.reject_reason(doc)
            if reason is None:
                doc = self.rewrite(doc)
                reason = self.unrewritable if doc is None else self.reject_rewritten(doc)
            if reason is None:
                yield doc
            else:
                self.drop(reason)


class BatchFilter(Step):
    """A step that decides ``batch_size`` documents at a time (one model call for a whole batch).

    ``run`` collects ``batch_size`` documents, calls ``reject_reasons(batch)`` — for each document of
    the batch, in order, why it is dropped or None to keep it; it may add metadata to the documents —
    and yields the kept documents in their order. Every document counts as ``seen``.
    """

    batch_size: int = 1

    def reject_reasons(self, batch: list[Document]) -> list[str | None]:
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for batch in batched(docs, self.batch_size):
            self.count("seen", len(batch))
            for doc, reason in zip(batch, self.reject_reasons(batch), strict=True):
                if reason is None:
                    yield doc
                else:
                    self.drop(reason)
