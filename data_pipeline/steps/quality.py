"""Heuristic quality filters with their published defaults: C4 (Raffel et al. 2020, Sec. 2.2) and
Gopher (Rae et al. 2021, Appendix A.1.1 "Quality filtering" and Table A1 "repetition").

Words are whitespace-separated tokens throughout; ``None`` disables a rule. Drop reasons name the rule.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..document import Document
from ..step import Filter

C4_END_MARKS = (".", "!", "?", '"', "”")
C4_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                        "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+[\"”’')\]]*(?=\s|$)")


class C4QualityFilter(Filter):
    """C4's cleaning of a web page. Line rules (the line is removed): it does not end in terminal
    punctuation (``end_marks``: . ! ? " ”) or ends in an ellipsis; it has fewer than
    ``min_words_per_line`` (5) words; it contains "javascript"; it contains a cookie/terms ``policy``
    phrase (as the reference TFDS implementation); a word is longer than ``max_word_length`` (1000).
    Page rules (the document is dropped): "lorem ipsum" appears (``lorem_ipsum``); a curly bracket
    appears (``curly_bracket``); a word of ``bad_words`` (a list, or ``bad_words_file`` with one entry
    per line; off by default) appears (``bad_word``); fewer than ``min_sentences`` (3) sentences remain
    (``too_few_sentences``; sentences end in . ! or ?). Page rules see the page as it arrives; the
    sentence count, the page left by the line rules.
    """

    name = "c4_quality"

    def __init__(self, min_words_per_line: int | None = 5, min_sentences: int | None = 3,
                 max_word_length: int | None = 1000, end_marks: Sequence[str] | None = C4_END_MARKS,
                 remove_javascript_lines: bool = True, remove_policy_lines: bool = True,
                 drop_lorem_ipsum: bool = True, drop_curly_bracket: bool = True,
                 bad_words: Sequence[str] | None = None, bad_words_file: str | None = None) -> None:
        super().__init__()
        self.min_words_per_line = min_words_per_line
        self.min_sentences = min_sentences
        self.max_word_length = max_word_length
        self.end_marks = tuple(end_marks) if end_marks else None
        self.remove_javascript_lines = remove_javascript_lines
        self.remove_policy_lines = remove_policy_lines
        self.drop_lorem_ipsum = drop_lorem_ipsum
        self.drop_curly_bracket = drop_curly_bracket
        words = list(bad_words or [])
        if bad_words_file:
            path = Path(bad_words_file)
            if not path.is_file():
                raise FileNotFoundError(f"c4_quality.bad_words_file not found: {path}")
            words += [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
        self.bad_words = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, sorted({w.lower() for w in words})))
                                     + r")(?!\w)") if words else None)

    def keep_line(self, line: str) -> bool:
        words = line.split()
        lower = line.lower()
        if self.max_word_length is not None and any(len(w) > self.max_word_length for w in words):
            return False
        if self.end_marks is not None and (not line.endswith(self.end_marks) or line.endswith(("...", "…"))):
            return False
        if self.min_words_per_line is not None and len(words) < self.min_words_per_line:
            return False
        if self.remove_javascript_lines and "javascript" in lower:
            return False
        return not (self.remove_policy_lines and any(p in lower for p in C4_POLICY_SUBSTRINGS))

    def reject_reason(self, doc: Document) -> str | None:
        """The page rules, on the page as it arrives."""
        lower = doc.text.lower()
        if self.drop_lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum"
        if self.drop_curly_bracket and "{" in doc.text:
            return "curly_bracket"
        if self.bad_words is not None and self.bad_words.search(lower):
            return "bad_word"
        return None

    def rewrite(self, doc: Document) -> Document:
        """The line rules: the lines kept, stripped."""
        lines = [line.strip() for line in doc.text.split("\n")]
        doc.text = "\n".join(line for line in lines if line and self.keep_line(line))
        return doc

    def reject_rewritten(self, doc: Document) -> str | None:
        if self.min_sentences is not None and len(_SENTENCE_END.findall(doc.text)) < self.min_sentences:
            return "too_few_sentences"
        return None if doc.text else "empty"


GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
GOPHER_BULLETS = ("-", "*", "•", "‣", "◦", "●", "▪", "–")
GOPHER_ELLIPSES = ("...", "…")


class GopherQualityFilter(Filter):
    """Gopher's quality rules (defaults from the paper): word count within [``min_words`` 50,
    ``max_words`` 100000]; mean word length within [``min_mean_word_length`` 3,
    ``max_mean_word_length`` 10]; ratio of "#" symbols and of ellipses to words each at most
    ``max_symbol_word_ratio`` 0.1; at most ``max_bullet_lines`` 90% of lines starting with a bullet;
    at most ``max_ellipsis_lines`` 30% of lines ending with an ellipsis; at least
    ``min_alpha_words`` 80% of words containing a letter; at least ``min_stop_words`` 2 of the words
    the, be, to, of, and, that, have, with.
    """

    name = "gopher_quality"

    def __init__(self, min_words: int | None = 50, max_words: int | None = 100_000,
                 min_mean_word_length: float | None = 3, max_mean_word_length: float | None = 10,
                 max_symbol_word_ratio: float | None = 0.1, max_bullet_lines: float | None = 0.9,
                 max_ellipsis_lines: float | None = 0.3, min_alpha_words: float | None = 0.8,
                 min_stop_words: int | None = 2, stop_words: Sequence[str] = GOPHER_STOP_WORDS) -> None:
        super().__init__()
        self.min_words, self.max_words = min_words, max_words
        self.min_mean_word_length, self.max_mean_word_length = min_mean_word_length, max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines, self.max_ellipsis_lines = max_bullet_lines, max_ellipsis_lines
        self.min_alpha_words = min_alpha_words
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(stop_words)

    def reject_reason(self, doc: Document) -> str | None:
        text = doc.text
        words = text.split()
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return "too_many_words"
        if n == 0:
            return "empty"
        mean_len = sum(map(len, words)) / n
        if self.min_mean_word_length is not None and mean_len < self.min_mean_word_length:
            return "mean_word_length_low"
        if self.max_mean_word_length is not None and mean_len > self.max_mean_word_length:
            return "mean_word_length_high"
        if self.max_symbol_word_ratio is not None:
            if text.count("#") / n > self.max_symbol_word_ratio:
                return "hash_ratio"
            if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
                return "ellipsis_ratio"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if self.max_bullet_lines is not None and (
                sum(line.startswith(GOPHER_BULLETS) for line in lines) / len(lines) > self.max_bullet_lines):
            return "bullet_lines"
        if self.max_ellipsis_lines is not None and (
                sum(line.endswith(GOPHER_ELLIPSES) for line in lines) / len(lines) > self.max_ellipsis_lines):
            return "ellipsis_lines"
        if self.min_alpha_words is not None and (
                sum(any(c.isalpha() for c in w) for w in words) / n < self.min_alpha_words):
            return "alpha_words"
        if self.min_stop_words is not None and (
                sum(w.lower() in self.stop_words for w in words) < self.min_stop_words):
            return "stop_words"
        return None


GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def duplicate_fraction(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup, dup_chars = 0, 0
    for part in parts:
        if part in seen:
            dup += 1
            dup_chars += len(part)
        seen.add(part)
    total_chars = sum(map(len, parts))
    return (dup / len(parts) if parts else 0.0), (dup_chars / total_chars if total_chars else 0.0)


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters in all occurrences of the most frequent n-gram (if it occurs twice or more) over
    the characters of all words."""
    ngrams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not ngrams:
        return 0.0
    gram, count = ngrams.most_common(1)[0]
    total = sum(map(len, words))
    return count * sum(map(len, gram)) / total if count > 1 and total else 0.0


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by any n-gram occurring more than once (each word counted once)
    over the characters of all words."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


class GopherRepetitionFilter(Filter):
    """Gopher's repetition rules (Table A1): drop when duplicate lines exceed ``max_dup_lines`` (0.30)
    of lines or ``max_dup_line_chars`` (0.20) of their characters; the same for paragraphs (blank-line
    separated; 0.30 / 0.20); the most frequent 2/3/4-gram covers more than ``top_ngram`` (0.20, 0.18,
    0.16) of the word characters; duplicated 5..10-grams cover more than ``dup_ngram`` (0.15 .. 0.10).
    """

    name = "gopher_repetition"

    def __init__(self, max_dup_lines: float | None = 0.30, max_dup_line_chars: float | None = 0.20,
                 max_dup_paragraphs: float | None = 0.30, max_dup_paragraph_chars: float | None = 0.20,
                 top_ngram: dict[int, float] | None = None, dup_ngram: dict[int, float] | None = None) -> None:
        super().__init__()
        self.max_dup_lines, self.max_dup_line_chars = max_dup_lines, max_dup_line_chars
        self.max_dup_paragraphs, self.max_dup_paragraph_chars = max_dup_paragraphs, max_dup_paragraph_chars
        self.top_ngram = {int(k): float(v) for k, v in (GOPHER_TOP_NGRAM if top_ngram is None else top_ngram).items()}
        self.dup_ngram = {int(k): float(v) for k, v in (GOPHER_DUP_NGRAM if dup_ngram is None else dup_ngram).items()}

    def reject_reason(self, doc: Document) -> str | None:
        text = doc.text
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        frac, chars = duplicate_fraction(paragraphs)
        if self.max_dup_paragraphs is not None and frac > self.max_dup_paragraphs:
            return "dup_paragraphs"
        if self.max_dup_paragraph_chars is not None and chars > self.max_dup_paragraph_chars:
            return "dup_paragraph_chars"
        frac, chars = duplicate_fraction([line.strip() for line in text.split("\n") if line.strip()])
        if self.max_dup_lines is not None and frac > self.max_dup_lines:
            return "dup_lines"
        if self.max_dup_line_chars is not None and chars > self.max_dup_line_chars:
            return "dup_line_chars"
        words = text.split()
        for n, limit in sorted(self.top_ngram.items()):
            if top_ngram_char_fraction(words, n) > limit:
                return f"top_{n}gram"
        for n, limit in sorted(self.dup_ngram.items()):
            if duplicate_ngram_char_fraction(words, n) > limit:
                return f"dup_{n}gram"
        return None
