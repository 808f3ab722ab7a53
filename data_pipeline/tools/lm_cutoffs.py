"""compute a language's head/middle/tail perplexity cutoffs (30th/60th percentiles) from a sample

Scores a sample of the language's documents (JSONL, e.g. the LID stage's output: documents of other
languages are skipped; or text with one document per line) with the model from `llama-data train-lm`
and writes <model_dir>/<lang>.cutoffs.json, which the perplexity step reads.

    llama-data lm-cutoffs de models/lm sample/de_*.jsonl.zst
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from llama_pt.atomic import write_text_atomic

from ..steps.perplexity import LanguageModel, cutoffs_file
from .text_inputs import iter_documents_text

DEFAULT_PERCENTILES = (30, 60)


def percentile_cutoffs(perplexities: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[float]:
    """The given percentiles (linear interpolation) of a perplexity sample."""
    if len(perplexities) == 0:
        raise ValueError("cannot compute perplexity cutoffs from an empty sample")
    return [float(v) for v in np.percentile(np.asarray(perplexities, dtype=np.float64), list(percentiles))]


def compute_perplexity_cutoffs(lang: str, model_dir: str | Path, inputs: Iterable[str | Path], *,
                               out_path: str | Path | None = None, max_docs: int = 100_000,
                               percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Path:
    """Score a sample of ``lang`` documents and store the head/tail cutoffs as JSON (CCNet Sec. 3.3).

    ``inputs``: JSONL document files (e.g. the output of the LID stage; documents whose
    ``metadata.language`` is another language are skipped) or text files (one document per line).
    At most ``max_docs`` documents are scored. Writes ``<model_dir>/<lang>.cutoffs.json`` (or
    ``out_path``) atomically: ``{"language", "percentiles", "cutoffs", "documents"}``; returns its path.
    """
    model = LanguageModel(model_dir, lang)
    scores: list[float] = []
    for text in iter_documents_text(inputs, language=lang):
        if len(scores) >= max_docs:
            break
        pp = model.perplexity(text)
        if pp is not None:
            scores.append(pp)
    cutoffs = percentile_cutoffs(scores, percentiles)
    out = Path(out_path) if out_path else cutoffs_file(model_dir, lang)
    record = {"language": lang, "percentiles": list(percentiles), "cutoffs": cutoffs, "documents": len(scores)}
    return write_text_atomic(out, json.dumps(record, indent=1) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lang", help="language code")
    p.add_argument("model_dir", help="folder with <lang>.sp.model and <lang>.arpa.bin")
    p.add_argument("inputs", nargs="+", help="sample documents")
    p.add_argument("--out", default=None, help="cutoffs file (default <model_dir>/<lang>.cutoffs.json)")
    p.add_argument("--max-docs", type=int, default=100_000)
    p.add_argument("--percentiles", type=float, nargs=2, default=list(DEFAULT_PERCENTILES))


def run(args: argparse.Namespace) -> int:
    try:
        path = compute_perplexity_cutoffs(args.lang, args.model_dir, args.inputs, out_path=args.out,
                                          max_docs=args.max_docs, percentiles=args.percentiles)
        print(f"wrote {path}")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"llama-data: error: {exc}", file=sys.stderr)
        return 2
    return 0
