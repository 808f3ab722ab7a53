"""The pipeline steps, one module each, and their registry: the names recipes use, mapped to classes.

Entries are ``"module:Class"`` strings, imported only when a recipe uses the step, so that the CLI
starts without loading fastText, KenLM or SentencePiece. A recipe may also name its own step class
as ``step: "package.module:Class"`` (importable where the workers run).

A step class subclasses ``data_pipeline.step.Step`` (or one of its bases there: ``Filter`` decides
document by document, ``BatchFilter`` a batch at a time) and is built as
``Class(**kwargs)`` from its recipe entry. When it needs to know where it runs, it may define
``setup(ctx)`` and receives a ``data_pipeline.pipeline.ShardContext`` (source name, shard index,
number of shards, the source's work directory, the run's seed, its own work folder ``step_dir``)
before its first document. A step that must compare the documents of every shard subclasses
``data_pipeline.global_step.GlobalStep`` (hash, merge and filter passes; see that module).
Metadata keys the writer and the report read: ``language``, ``language_score``, ``perplexity``,
``bucket`` — outputs are split into ``<language>_<bucket>`` folders when a step sets them.
"""
from __future__ import annotations

import importlib

from ..step import Step

STEPS: dict[str, str] = {
    "normalize": "data_pipeline.steps.normalize:Normalize",
    "paragraph_dedup": "data_pipeline.steps.paragraph_dedup:ParagraphDedup",
    "lid": "data_pipeline.steps.lid:LanguageID",
    "perplexity": "data_pipeline.steps.perplexity:Perplexity",
    "wiki_classifier": "data_pipeline.steps.wiki_classifier:WikiReferenceFilter",
    "github": "data_pipeline.steps.github:GithubFilter",
    "arxiv": "data_pipeline.steps.arxiv:ArxivCleaner",
    "books_near_dedup": "data_pipeline.steps.books:BooksNearDedup",
    "wikipedia": "data_pipeline.steps.wikipedia:WikipediaCleaner",
    "stackexchange": "data_pipeline.steps.stackexchange:StackExchangeFormatter",
    "c4_quality": "data_pipeline.steps.quality:C4QualityFilter",
    "gopher_quality": "data_pipeline.steps.quality:GopherQualityFilter",
    "gopher_repetition": "data_pipeline.steps.quality:GopherRepetitionFilter",
    "exact_dedup": "data_pipeline.steps.exact_dedup:ExactDedup",
}


def get_step_class(name: str) -> type[Step]:
    """The step class registered under ``name``, or a user's step given as ``"package.module:Class"``;
    KeyError names what was not found."""
    target = STEPS.get(name, name if ":" in name else None)
    if target is None:
        raise KeyError(f"unknown step {name!r} (known: {', '.join(sorted(STEPS))}, or module:Class)")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise KeyError(f"step {name!r}: cannot import {target} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise KeyError(f"step {name!r}: {target} is not a data_pipeline.step.Step subclass")
    return cls
