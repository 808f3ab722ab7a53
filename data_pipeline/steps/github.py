"""GitHub source rules (LLaMA paper, Sec. 2.1 "Github").

"We only kept projects that are distributed under the Apache, BSD and MIT licenses. Additionally, we
filtered low quality files with heuristics based on the line length or proportion of alphanumeric
characters, and removed boilerplate, such as headers, with regular expressions. Finally, we
deduplicate the resulting dataset at the file level, with exact matches."

The paper gives no thresholds; the defaults are those of RedPajama-v1's reproduction: a file is
dropped when its longest line exceeds 1000 characters, its mean line length exceeds 100, fewer than 25%
of its characters are alphanumeric, or it has fewer than 1.5 alphabetic characters per token (tokens:
runs of word characters and single punctuation marks).

The file-level exact dedup is not part of this step: it has to compare the files of every shard, so
it is the ``exact_dedup`` step with ``normalize: false`` placed after this one in the recipe
(configs/prep/llama1.yaml), which keeps the first copy of a file in the source's global order.
"""
from __future__ import annotations

import re
from typing import Sequence

from ..document import Document
from ..step import Filter

DEFAULT_LICENSES = ("apache-2.0", "bsd-2-clause", "bsd-3-clause", "mit")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|spdx-license-identifier|all rights reserved", re.IGNORECASE)
_LINE_COMMENT = re.compile(r"^\s*(#|//|--|;|%)")


def _leading_comment_block(lines: list[str], start: int) -> int:
    """Index one past the comment block that starts at ``lines[start]`` (``start`` if there is none)."""
    if start >= len(lines):
        return start
    if lines[start].lstrip().startswith("/*"):
        for i in range(start, len(lines)):
            if "*/" in lines[i]:
                return i + 1
        return start  # an unterminated block comment is not a header
    end = start
    while end < len(lines) and _LINE_COMMENT.match(lines[end]) and not lines[end].startswith("#!"):
        end += 1
    return end


def strip_license_header(text: str) -> str:
    """Remove a leading comment block that mentions a copyright or licence (and blank lines after it).

    A shebang line stays. Recognised: ``/* ... */`` blocks and runs of ``#``, ``//``, ``--``, ``;``
    or ``%`` line comments.
    """
    lines = text.split("\n")
    shebang = lines[:1] if lines[0].startswith("#!") else []
    start = len(shebang)
    while start < len(lines) and not lines[start].strip():
        start += 1
    end = _leading_comment_block(lines, start)
    if end == start or not _LICENSE_WORDS.search("\n".join(lines[start:end])):
        return text
    while end < len(lines) and not lines[end].strip():
        end += 1
    return "\n".join(shebang + lines[end:])


def file_stats(text: str) -> dict[str, float]:
    """The quantities the rules test: max and mean line length, alphanumeric fraction, alpha per token."""
    lengths = [len(line) for line in text.split("\n")]
    tokens = _TOKEN.findall(text)
    return {
        "max_line_length": max(lengths),
        "mean_line_length": sum(lengths) / len(lengths),
        "alphanum_fraction": sum(c.isalnum() for c in text) / len(text),
        "alpha_per_token": sum(c.isalpha() for c in text) / len(tokens) if tokens else 0.0,
    }


def license_allowed(value: object, allowed: frozenset[str]) -> bool | None:
    """Whether a license field (one string or a list) is allowed; None when it is missing/empty.
    With several licenses, every one must be allowed."""
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    values = [str(v).strip().lower() for v in values if str(v).strip()]
    if not values:
        return None
    return all(v in allowed for v in values)


class GithubFilter(Filter):
    """GitHub rules, in order: licence, header removal, line length / alphanumeric heuristics.
    Parameters (defaults):

    - ``licenses`` (apache-2.0, bsd-2-clause, bsd-3-clause, mit), read from ``metadata[license_key]``
      (``license``; a string or a list, case-insensitive); ``None`` skips the licence rule.
    - ``max_line_length`` (1000), ``max_mean_line_length`` (100), ``min_alphanum_fraction`` (0.25),
      ``min_alpha_per_token`` (1.5); ``None`` disables a rule.
    - ``strip_headers`` (True): remove a leading licence/copyright comment block.
    Drop reasons: license_missing, license_not_allowed, empty, max_line_length, mean_line_length,
    alphanum_fraction, alpha_per_token.
    """

    name = "github"

    def __init__(self, licenses: Sequence[str] | None = DEFAULT_LICENSES, license_key: str = "license",
                 max_line_length: int | None = 1000, max_mean_line_length: float | None = 100,
                 min_alphanum_fraction: float | None = 0.25, min_alpha_per_token: float | None = 1.5,
                 strip_headers: bool = True) -> None:
        super().__init__()
        self.licenses = frozenset(l.lower() for l in licenses) if licenses is not None else None
        self.license_key = license_key
        self.max_line_length = max_line_length
        self.max_mean_line_length = max_mean_line_length
        self.min_alphanum_fraction = min_alphanum_fraction
        self.min_alpha_per_token = min_alpha_per_token
        self.strip_headers = strip_headers

    def reject_reason(self, doc: Document) -> str | None:
        if self.licenses is not None:
            allowed = license_allowed(doc.metadata.get(self.license_key), self.licenses)
            if allowed is None:
                return "license_missing"
            if not allowed:
                return "license_not_allowed"
        return None

    def rewrite(self, doc: Document) -> Document:
        if self.strip_headers:
            doc.text = strip_license_header(doc.text)
        return doc

    def reject_rewritten(self, doc: Document) -> str | None:
        if not doc.text.strip():
            return "empty"
        stats = file_stats(doc.text)
        if self.max_line_length is not None and stats["max_line_length"] > self.max_line_length:
            return "max_line_length"
        if self.max_mean_line_length is not None and stats["mean_line_length"] > self.max_mean_line_length:
            return "mean_line_length"
        if self.min_alphanum_fraction is not None and stats["alphanum_fraction"] < self.min_alphanum_fraction:
            return "alphanum_fraction"
        if self.min_alpha_per_token is not None and stats["alpha_per_token"] < self.min_alpha_per_token:
            return "alpha_per_token"
        return None

