"""Real multilingual text from Debian packages (fortunes, Debian Reference), for the pipeline tests."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from data_pipeline.steps.stackexchange import html_to_text

FORTUNES = Path("/usr/share/games/fortunes")
DEBIAN_REFERENCE = Path("/usr/share/debian-reference")
INSTALL_HINT = "install the test corpora: bash scripts/install_test_corpora.sh (make test runs it)"
_NOT_PROSE = ("ascii-art", "asciiart", "banner")  # pictures drawn with characters
CHINESE = ("chinese", "song100", "tang300")  # fortunes-zh installs its files at the top level
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # fortunes-zh colours titles and authors, some nested
_FRENCH_WORDS = re.compile(r"\b(le|la|les|des|est|une|pour|dans)\b")
MIN_CHARS = 150  # documents shorter than this are too short to test language ID on


def _entries(files: list[Path]) -> list[str]:
    """The fortunes of ``files`` (entries separated by lines holding only "%")."""
    docs: list[str] = []
    for path in files:
        if path.name.endswith((".dat", ".u8")) or path.name in _NOT_PROSE or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        while _ANSI_COLOUR.search(text):
            text = _ANSI_COLOUR.sub("", text)
        docs += [d.strip() for d in re.split(r"^%$", text, flags=re.MULTILINE) if d.strip()]
    return docs


def fortunes(lang: str) -> list[str]:
    """Every fortune of a language; English = the top-level files that fortunes-it did not also put there
    and that are not fortunes-zh's; Chinese (zh) = fortunes-zh's sayings, Tang and Song poems."""
    if lang == "en":
        italian = {p.name for p in (FORTUNES / "it").iterdir()} if (FORTUNES / "it").is_dir() else set()
        files = [p for p in FORTUNES.iterdir() if p.name not in italian and p.name not in CHINESE]
    elif lang == "zh":
        files = [FORTUNES / name for name in CHINESE]
    elif lang == "es":
        files = list((FORTUNES / "es").glob("*.fortunes"))
    else:
        files = list((FORTUNES / lang).iterdir()) if (FORTUNES / lang).is_dir() else []
    docs = _entries(sorted(files))
    if not docs:
        pytest.fail(f"no {lang} fortunes under {FORTUNES}: {INSTALL_HINT}")
    return docs


def debian_reference(lang: str) -> list[str]:
    """Paragraphs of at least 200 characters of the Debian Reference in ``lang``. In French, only the
    paragraphs with at least five common French words: the translation leaves some English in place."""
    pages = sorted(DEBIAN_REFERENCE.glob(f"*.{lang}.html"))
    if not pages:
        pytest.fail(f"no Debian Reference ({lang}) under {DEBIAN_REFERENCE}: {INSTALL_HINT}")
    paragraphs = []
    for page in pages:
        text = html_to_text(page.read_text(encoding="utf-8"))
        paragraphs += [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 200]
    if lang == "fr":
        paragraphs = [p for p in paragraphs if len(_FRENCH_WORDS.findall(p)) >= 5]
    return paragraphs


def sample(docs: list[str], n: int, seed: int = 0, min_chars: int = MIN_CHARS) -> list[str]:
    long = [d for d in docs if len(d) >= min_chars]
    return random.Random(seed).sample(long, min(n, len(long)))
