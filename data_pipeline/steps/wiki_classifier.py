"""The LLaMA paper's CommonCrawl quality classifier (Touvron et al. 2023, Sec. 2.1, "English CommonCrawl").

"We trained a linear model to classify pages used as references in Wikipedia v.s. randomly sampled
pages, and discarded pages not classified as references." The linear model is a fastText supervised
classifier with two labels, ``__label__wiki`` (pages referenced by Wikipedia) and ``__label__cc``
(random CommonCrawl pages), trained by ``llama-data train-wiki-classifier``
(``tools/train_wiki_classifier.py``). The filter keeps documents whose p(wiki) is at least
``threshold``; the paper gives no value, RedPajama-v1's reproduction kept p(wiki) > 0.25, the default here.

Text is prepared the same way for training and prediction (``prepare``): lowercased, whitespace and
newlines collapsed to single spaces, truncated to ``MAX_CHARS`` characters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..document import Document
from ..step import BatchFilter
from .lid import load_fasttext_model

WIKI, CC = "wiki", "cc"
DEFAULT_THRESHOLD = 0.25
MAX_CHARS = 100_000


def prepare(text: str) -> str:
    """The one-line, lowercased form of a document that the classifier reads."""
    return " ".join(text[:MAX_CHARS].lower().split())


def wiki_probabilities(model: Any, texts: Sequence[str]) -> list[float]:
    """p(wiki) for each text, from one batched fastText call."""
    labels, probs = model.predict([prepare(t) for t in texts], k=2)
    out = []
    for labs, ps in zip(labels, probs):
        scores = dict(zip(labs, ps))
        out.append(float(scores.get(f"__label__{WIKI}", 0.0)))
    return out


class WikiReferenceFilter(BatchFilter):
    """Keeps documents with p(wiki) >= ``threshold`` (default 0.25); sets ``metadata["wiki_score"]``.

    ``model_path``: the classifier from ``llama-data train-wiki-classifier``. ``batch_size``: documents
    per call. Drops are counted as ``not_wiki_like``.
    """
    loads_models = True

    name = "wiki_classifier"

    def __init__(self, model_path: str, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 512) -> None:
        super().__init__()
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"wiki_classifier.model_path not found: {model_path}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"wiki_classifier.threshold must be in [0, 1], got {threshold}")
        self.model_path = str(model_path)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self._model: Any = None

    def __getstate__(self) -> dict:  # the fastText model is a C object: reload it where the step runs
        return {**self.__dict__, "_model": None}

    def reject_reasons(self, batch: list[Document]) -> list[str | None]:
        if self._model is None:
            self._model = load_fasttext_model(self.model_path)
        reasons: list[str | None] = []
        for doc, p in zip(batch, wiki_probabilities(self._model, [d.text for d in batch])):
            doc.metadata["wiki_score"] = round(p, 4)
            reasons.append(None if p >= self.threshold else "not_wiki_like")
        return reasons
