"""CCNet's normalisations of one line of text (Wenzek et al. 2020; ``text_normalizer.py`` of
facebookresearch/cc_net): one for paragraph dedup, one for the perplexity language model.

Both lower-case, map every digit to ``0`` and remove the non-printing characters (code points 0-31 and
127-159). Dedup then removes CCNet's list of Unicode punctuation and collapses whitespace runs to one
space (ASCII punctuation is kept); the LM normalisation instead maps that punctuation to its ASCII
equivalent and removes accents.
"""
from __future__ import annotations

import re
import unicodedata

#: CCNet's Unicode punctuation and the ASCII it stands for (``UNICODE_PUNCT`` in cc_net).
CCNET_UNICODE_PUNCT = {
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"',
    "」": '"', "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!",
    "（": "(", "）": ")", "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'", "…": "...",
    "━": "-", "〈": "<", "〉": ">", "【": "[", "】": "]", "％": "%", "►": "-",
}
#: The non-printing characters CCNet removes: code points 0-31 and 127-159.
NON_PRINTING = "".join(map(chr, [*range(0, 32), *range(127, 160)]))

_DIGIT = re.compile(r"\d")
_SPACES = re.compile(r"\s+")
_DEDUP_REMOVED = str.maketrans("", "", "".join(CCNET_UNICODE_PUNCT) + NON_PRINTING)
_PUNCT_TO_ASCII = str.maketrans(CCNET_UNICODE_PUNCT)
_NON_PRINTING_RE = re.compile("[" + NON_PRINTING + "]")


def normalize_for_dedup(line: str) -> str:
    """CCNet's dedup normalisation: strip, lower-case, digits -> 0, Unicode punctuation and
    non-printing characters removed, whitespace runs -> one space; '' for blank lines."""
    line = line.strip()
    if not line:
        return line
    line = _DIGIT.sub("0", line.lower())
    line = line.translate(_DEDUP_REMOVED)
    return _SPACES.sub(" ", line).strip()


def normalize_for_lm(line: str) -> str:
    """CCNet's LM normalisation: strip, lower-case, accents removed, digits -> 0, Unicode
    punctuation -> ASCII equivalents, non-printing characters removed."""
    line = line.strip()
    if not line:
        return line
    line = line.lower()
    if not line.isascii():  # ASCII text has no accents to remove (NFD leaves it unchanged)
        line = unicodedata.normalize("NFD", line)
        line = "".join(c for c in line if unicodedata.category(c) != "Mn")
    line = _DIGIT.sub("0", line)
    return _NON_PRINTING_RE.sub("", line.translate(_PUNCT_TO_ASCII))
