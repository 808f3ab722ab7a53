"""Per-language perplexity under a SentencePiece + KenLM 5-gram model, and CCNet's quality buckets.

CCNet (Wenzek et al. 2020, Sec. 3.3): a 5-gram KenLM model trained on Wikipedia of the document's
language scores each paragraph (line) tokenized by that language's SentencePiece model; the document's
perplexity is ``10 ** (-sum(log10 p) / n)`` where the sum runs over all lines and ``n`` counts every
token plus one ``</s>`` per line. Documents are then split into ``head`` / ``middle`` / ``tail`` by
per-language cutoffs: the 30th and 60th percentiles of the perplexity distribution of that language.

Files for language ``xx`` in a model folder (``llama-data train-lm`` writes the first two,
``llama-data lm-cutoffs`` the third; ``tools/``): ``xx.sp.model``, ``xx.arpa.bin``, ``xx.cutoffs.json``.
Lines are normalised as CCNet does before tokenization (``ccnet_normalization.normalize_for_lm``), for
training and scoring.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Sequence

from ..ccnet_normalization import normalize_for_lm
from ..document import Document
from ..step import BatchFilter

NO_BUCKET = "all"  # CCNet's bucket for documents of a language without a model or cutoffs


def model_files(model_dir: str | Path, lang: str) -> tuple[Path, Path]:
    """(SentencePiece model, KenLM binary) paths of ``lang`` in ``model_dir``."""
    model_dir = Path(model_dir)
    return model_dir / f"{lang}.sp.model", model_dir / f"{lang}.arpa.bin"


def cutoffs_file(model_dir: str | Path, lang: str) -> Path:
    return Path(model_dir) / f"{lang}.cutoffs.json"


def available_languages(model_dir: str | Path) -> list[str]:
    """Languages with both model files in ``model_dir``."""
    langs = [p.name[: -len(".sp.model")] for p in Path(model_dir).glob("*.sp.model")]
    return sorted(lang for lang in langs if model_files(model_dir, lang)[1].is_file())


class LanguageModel:
    """One language's SentencePiece tokenizer and KenLM model."""

    def __init__(self, model_dir: str | Path, lang: str) -> None:
        import kenlm
        import sentencepiece

        sp_path, lm_path = model_files(model_dir, lang)
        for path in (sp_path, lm_path):
            if not path.is_file():
                raise FileNotFoundError(f"{lang}: language model file not found: {path} "
                                        "(train it with `llama-data train-lm`)")
        self.lang = lang
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
        self.lm = kenlm.Model(str(lm_path))

    def log10_probs_and_lengths(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """For each text: the sum of log10 probabilities over its lines that are not blank once
        normalised, and their token count, one ``</s>`` per line included. The lines of all texts
        are tokenized in one SentencePiece call on this thread (a list given to ``encode`` otherwise
        starts a thread pool at each call, which cost more than the tokenization)."""
        doc_lines = [[line for line in map(normalize_for_lm, text.split("\n")) if line] for text in texts]
        pieces = iter(self.sp.encode([line for lines in doc_lines for line in lines], out_type=str, num_threads=1))
        scores = []
        for lines in doc_lines:
            total, length = 0.0, 0
            for line_pieces in itertools.islice(pieces, len(lines)):
                total += self.lm.score(" ".join(line_pieces), bos=True, eos=True)
                length += len(line_pieces) + 1
            scores.append((total, length))
        return scores

    def perplexities(self, texts: Sequence[str]) -> list[float | None]:
        """Each document's perplexity, or None when it has no scorable line."""
        return [None if length == 0 else 10.0 ** (-total / length)
                for total, length in self.log10_probs_and_lengths(texts)]

    def perplexity(self, text: str) -> float | None:
        return self.perplexities([text])[0]


def bucket_of(perplexity: float, cutoffs: Sequence[float]) -> str:
    """CCNet's rule: below the first cutoff ``head``, below the second ``middle``, else ``tail``."""
    head, tail = cutoffs
    if perplexity < head:
        return "head"
    return "middle" if perplexity < tail else "tail"


def read_cutoffs(path: str | Path) -> list[float]:
    """The two cutoffs stored in a ``<lang>.cutoffs.json`` file (clear errors naming the file)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"perplexity cutoffs file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    cutoffs = record.get("cutoffs") if isinstance(record, dict) else None
    if (not isinstance(cutoffs, list) or len(cutoffs) != 2 or not all(isinstance(c, (int, float)) for c in cutoffs)
            or cutoffs[0] > cutoffs[1]):
        raise ValueError(f"{path}: field 'cutoffs' must be two increasing numbers, got {cutoffs!r}")
    return [float(c) for c in cutoffs]


class Perplexity(BatchFilter):
    """Adds ``metadata["perplexity"]`` (rounded to 0.1 as CCNet) and ``metadata["bucket"]``.

    - ``model_dir``: folder with ``<lang>.sp.model``, ``<lang>.arpa.bin`` and ``<lang>.cutoffs.json``.
    - ``languages``: the languages to score (default: every language with both model files there).
    - ``cutoffs_dir``: where the cutoff files are (default ``model_dir``).
    - ``max_perplexity``: drop documents above it (``perplexity_too_high``); default None keeps all,
      as CCNet does (the tail bucket is kept and split out, not removed).
    - ``batch_size`` (64): documents scored together (one SentencePiece call per language and batch).
    Documents without a language, a model or cutoffs keep going with bucket ``all`` (counted
    ``no_model/<lang>`` / ``no_cutoffs/<lang>``), as in CCNet. A configured language whose cutoff file
    is missing is an error at the first document, naming the file, unless ``require_cutoffs=False``.
    """
    loads_models = True

    name = "perplexity"

    def __init__(self, model_dir: str, languages: Sequence[str] | None = None, cutoffs_dir: str | None = None,
                 max_perplexity: float | None = None, require_cutoffs: bool = True, batch_size: int = 64) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"perplexity.batch_size={batch_size!r} must be an integer >= 1")
        self.batch_size = batch_size
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"perplexity.model_dir not found: {self.model_dir}")
        self.languages = list(languages) if languages else available_languages(self.model_dir)
        if not self.languages:
            raise FileNotFoundError(f"no <lang>.sp.model + <lang>.arpa.bin pair in {self.model_dir}")
        for lang in self.languages:
            for path in model_files(self.model_dir, lang):
                if not path.is_file():
                    raise FileNotFoundError(f"perplexity: model file for {lang!r} not found: {path}")
        self.cutoffs_dir = Path(cutoffs_dir) if cutoffs_dir else self.model_dir
        self.max_perplexity = max_perplexity
        self.require_cutoffs = require_cutoffs
        self._models: dict[str, LanguageModel] = {}
        self._cutoffs: dict[str, list[float] | None] = {}

    def __getstate__(self) -> dict:  # KenLM / SentencePiece objects are reloaded where the step runs
        return {**self.__dict__, "_models": {}, "_cutoffs": {}}

    def _model(self, lang: str) -> LanguageModel:
        if lang not in self._models:
            self._models[lang] = LanguageModel(self.model_dir, lang)
        return self._models[lang]

    def _cutoffs_for(self, lang: str) -> list[float] | None:
        if lang not in self._cutoffs:
            path = cutoffs_file(self.cutoffs_dir, lang)
            self._cutoffs[lang] = read_cutoffs(path) if (self.require_cutoffs or path.is_file()) else None
        return self._cutoffs[lang]

    def _perplexities(self, docs: list[Document]) -> dict[int, float | None]:
        """Perplexity of each document (by index in ``docs``) whose language has a model."""
        by_lang: dict[str, list[int]] = {}
        for i, doc in enumerate(docs):
            if doc.metadata.get("language") in self.languages:
                by_lang.setdefault(doc.metadata["language"], []).append(i)
        scores: dict[int, float | None] = {}
        for lang, indices in by_lang.items():
            scores.update(zip(indices, self._model(lang).perplexities([docs[i].text for i in indices])))
        return scores

    def reject_reasons(self, batch: list[Document]) -> list[str | None]:
        scores = self._perplexities(batch)
        reasons: list[str | None] = []
        for i, doc in enumerate(batch):
            if i in scores:
                reasons.append(self._bucket(doc, scores[i]))
            else:  # no model for its language: kept, in bucket ``all``
                self.count(f"no_model/{doc.metadata.get('language')}")
                doc.metadata["bucket"] = NO_BUCKET
                reasons.append(None)
        return reasons

    def _bucket(self, doc: Document, pp: float | None) -> str | None:
        """Drop reason of a scored document, or None after setting its perplexity and bucket."""
        if pp is None:
            return "no_scorable_line"
        if self.max_perplexity is not None and pp > self.max_perplexity:
            return "perplexity_too_high"
        lang = doc.metadata["language"]
        cutoffs = self._cutoffs_for(lang)
        if cutoffs is None:
            self.count(f"no_cutoffs/{lang}")
            bucket = NO_BUCKET
        else:
            bucket = bucket_of(pp, cutoffs)
        doc.metadata["perplexity"] = round(pp, 1)
        doc.metadata["bucket"] = bucket
        self.count(f"bucket/{lang}_{bucket}")
        return None
