"""StackExchange rules (LLaMA paper, Sec. 2.1 "Stack Exchange": "We kept the data from the 28 largest
websites, removed the HTML tags from text and sorted the answers by score (from highest to lowest).")

Input: one document per question. The question's HTML body is the document text (or
``metadata["question"]``), its title ``metadata["title"]``, its answers ``metadata["answers"]``: a list
of ``{"body": <html>, "score": <int>}``. Output text:

    Q: <title>
    <question as text>

    A: <best answer as text>

    A: <next answer>

Answers are sorted by score, highest first (stable: equal scores keep their order). The ``answers``
and ``question`` metadata are replaced by ``num_answers``. ``html_to_text`` keeps the text of the HTML:
block elements start new lines, ``<li>`` items get "- ", ``<pre>`` keeps its layout, ``<script>`` and
``<style>`` are dropped, entities are decoded.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

from ..document import Document
from ..step import Filter

_PARAGRAPH = {"p", "pre", "blockquote", "table", "h1", "h2", "h3", "h4", "h5", "h6"}
_LINE = {"div", "br", "hr", "ul", "ol", "dl", "dt", "dd", "tr", "section", "article", "header", "footer", "title"}
_SKIP = {"script", "style", "head", "noscript"}
_SPACES = re.compile(r"\s+")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0  # inside <script>/<style>/...
        self.pre = 0  # inside <pre>: text kept as written

    def _break(self, newlines: str) -> None:
        self.parts.append(newlines)

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif tag == "li":
            self._break("\n- ")
        elif tag in _PARAGRAPH or tag in _LINE:
            self._break("\n\n" if tag in _PARAGRAPH else "\n")
            self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _PARAGRAPH or tag in _LINE:
            self.pre = max(0, self.pre - (tag == "pre"))
            self._break("\n\n" if tag in _PARAGRAPH else "\n")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self._break("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if not self.pre:
            data = _SPACES.sub(" ", data)
            if not self.parts or self.parts[-1].endswith(("\n", "- ")):
                data = data.lstrip(" ")
        self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The visible text of an HTML fragment, with paragraph and line structure kept."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = _TRAILING_SPACE.sub("", "".join(parser.parts))
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def format_question(title: str, question_html: str, answers: list[dict]) -> str:
    """The Q/A text of a question and its answers, answers by score descending."""
    ranked = sorted(answers, key=lambda a: -float(a.get("score") or 0))
    parts = [f"Q: {title.strip()}\n{html_to_text(question_html)}".strip()]
    parts += [f"A: {html_to_text(a.get('body') or '')}" for a in ranked]
    return "\n\n".join(parts)


class StackExchangeFormatter(Filter):
    """Formats each question with its answers (``format_question``). ``min_answers`` (0): drop
    questions with fewer answers (``too_few_answers``). Malformed ``answers`` are ``bad_answers``."""

    name = "stackexchange"

    def __init__(self, min_answers: int = 0) -> None:
        super().__init__()
        self.min_answers = int(min_answers)

    def reject_reason(self, doc: Document) -> str | None:
        answers = doc.metadata.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
            return "bad_answers"
        if len(answers) < self.min_answers:
            return "too_few_answers"
        return None

    def rewrite(self, doc: Document) -> Document:
        answers = doc.metadata.pop("answers", [])
        question = doc.metadata.pop("question", None)
        doc.text = format_question(str(doc.metadata.get("title") or ""),
                                   question if isinstance(question, str) else doc.text, answers)
        doc.metadata["num_answers"] = len(answers)
        return doc
