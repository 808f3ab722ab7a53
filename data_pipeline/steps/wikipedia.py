"""Wikipedia markup removal (LLaMA paper, Sec. 2.1 "Wikipedia": "we process the data to remove
hyperlinks, comments and other formatting boilerplate").

``strip_wikitext`` turns wikitext into plain text, in this order: HTML comments; ``<ref>`` footnotes;
``{{templates}}`` (nested); ``{| tables |}`` (nested); internal links ``[[target|anchor]]`` -> anchor,
``[[target]]`` -> target, and ``[[File:..]]``, ``[[Image:..]]``, ``[[Media:..]]``, ``[[Category:..]]``
removed with their captions; external links ``[url anchor]`` -> anchor (bare ``[url]`` removed);
``'''bold'''``/``''italic''`` quotes; headings ``== T ==`` -> T; list markers; behaviour switches
(``__NOTOC__``); remaining HTML tags (their content kept); HTML entities decoded. Blank-line runs become
one blank line, trailing spaces go. Text that is already plain passes through unchanged.
"""
from __future__ import annotations

import html
import re

from ..document import Document
from ..step import Filter

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.DOTALL)
_TABLE = re.compile(r"^\s*\{\|(?:(?!^\s*\{\|).)*?^\s*\|\}[ \t]*$\n?", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROPPED_NAMESPACES = ("file:", "image:", "media:", "category:")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[*#:;]+[ \t]*", re.MULTILINE)
_SWITCH = re.compile(r"__[A-Z]+__")
_TAG = re.compile(r"</?[A-Za-z][^<>]*?/?>")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def _until_stable(pattern: re.Pattern, repl, text: str) -> str:
    """Apply ``pattern.sub`` until nothing changes (nested constructs are removed innermost first)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    if inner.lstrip(": ").lower().startswith(_DROPPED_NAMESPACES):
        return ""
    return inner.rsplit("|", 1)[-1] if "|" in inner else inner


def strip_wikitext(text: str) -> str:
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _until_stable(_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _LIST_MARKER.sub("", text)
    text = _SWITCH.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


class WikipediaCleaner(Filter):
    """Rewrites each document with ``strip_wikitext``; drops those left ``empty``."""

    name = "wikipedia"

    def rewrite(self, doc: Document) -> Document:
        doc.text = strip_wikitext(doc.text)
        return doc

    def reject_rewritten(self, doc: Document) -> str | None:
        return None if doc.text else "empty"
