"""train the fastText classifier of pages referenced by Wikipedia vs random CommonCrawl (LLaMA Sec. 2.1)

Positive inputs: the text of pages cited as references by Wikipedia; negative inputs: randomly
sampled CommonCrawl pages (JSONL documents, or text with one document per line). The model feeds the
`wiki_classifier` step.

    llama-data train-wiki-classifier --positive refs.jsonl.zst --negative cc_sample.jsonl.zst --out models/wiki.bin
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from llama_pt.atomic import atomic_path

from ..steps.wiki_classifier import CC, WIKI, prepare
from .text_inputs import iter_documents_text


def train_wiki_classifier(positive_files: Iterable[str | Path], negative_files: Iterable[str | Path],
                          out_path: str | Path, *, max_docs_per_class: int | None = None,
                          epoch: int = 5, lr: float = 0.1, word_ngrams: int = 2, dim: int = 100,
                          min_count: int = 1, bucket: int = 2_000_000, threads: int = 1, seed: int = 0) -> Path:
    """Train the wiki-reference fastText classifier and save it to ``out_path`` (atomically).

    ``positive_files``: the text of pages referenced by Wikipedia; ``negative_files``: random
    CommonCrawl pages. Files are JSONL documents or text with one document per line (.gz/.zst allowed).
    Both classes are cut to the same size (the smaller one's, or ``max_docs_per_class``) so that the
    prior is even, and shuffled together with ``seed``. fastText's defaults for supervised training
    otherwise (lr 0.1, dim 100, 5 epochs, 2M hash buckets for the n-grams: the model file holds
    ``bucket x dim`` floats, 800 MB by default) with word bigrams. Training runs in a fresh process
    (``_fit_in_fresh_process``); with ``threads=1`` it is then reproducible.
    """
    inputs = {WIKI: [Path(p) for p in positive_files], CC: [Path(p) for p in negative_files]}
    docs = {}
    for label, files in inputs.items():
        docs[label] = [t for t in map(prepare, iter_documents_text(files)) if t]
        if not docs[label]:
            raise ValueError(f"no {label} training documents in {[str(p) for p in files]}")
    n = min(len(docs[WIKI]), len(docs[CC]), max_docs_per_class or float("inf"))
    rng = random.Random(seed)
    examples = [f"__label__{label} {text}" for label, texts in docs.items() for text in rng.sample(texts, n)]
    rng.shuffle(examples)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim, minCount=min_count, bucket=bucket,
                  thread=threads, seed=seed, verbose=0)
    with tempfile.TemporaryDirectory(prefix=".wiki-classifier-", dir=out_path.parent) as scratch:
        train_file = Path(scratch) / "train.txt"
        train_file.write_text("\n".join(examples) + "\n", encoding="utf-8")
        with atomic_path(out_path) as tmp:
            _fit_in_fresh_process(train_file, tmp, params)
    return out_path


_FIT = ("import json, sys, fasttext; "
        "fasttext.train_supervised(input=sys.argv[1], **json.loads(sys.argv[3])).save_model(sys.argv[2])")


def _fit_in_fresh_process(train_file: Path, model_file: Path, params: dict) -> None:
    """fastText supervised training in a new interpreter. The second training in one process
    (fasttext-numpy2-wheel 0.9.2) gave different weights and, now and then, "Encountered NaN" on the
    same data and seed; the first training in a process never did."""
    proc = subprocess.run([sys.executable, "-c", _FIT, str(train_file), str(model_file), json.dumps(params)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"fastText training on {train_file} failed (exit {proc.returncode}): {tail}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positive", nargs="+", required=True, help="Wikipedia-referenced pages")
    p.add_argument("--negative", nargs="+", required=True, help="random CommonCrawl pages")
    p.add_argument("--out", required=True, help="model file to write (.bin)")
    p.add_argument("--max-docs-per-class", type=int, default=None)
    p.add_argument("--epoch", type=int, default=5)
    p.add_argument("--word-ngrams", type=int, default=2)
    p.add_argument("--dim", type=int, default=100, help="embedding size")
    p.add_argument("--bucket", type=int, default=2_000_000, help="hash buckets for word n-grams")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        path = train_wiki_classifier(args.positive, args.negative, args.out, max_docs_per_class=args.max_docs_per_class,
                                     epoch=args.epoch, word_ngrams=args.word_ngrams,
                                     dim=args.dim, bucket=args.bucket, threads=args.threads, seed=args.seed)
        print(f"wrote {path}")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"llama-data: error: {exc}", file=sys.stderr)
        return 2
    return 0
