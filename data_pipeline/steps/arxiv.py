"""ArXiv LaTeX source rules (LLaMA paper, Sec. 2.1 "ArXiv").

"We removed everything before the first section, as well as the bibliography. We also removed the
comments from the .tex files, and inline-expanded definitions and macros written by users to increase
consistency across papers." Order of the rules (``clean_latex``):
1. comments: ``%`` to the end of the line (not ``\\%``; a line holding only a comment goes entirely)
   and ``comment`` environments;
2. user macros without arguments, ``\\newcommand{\\x}{...}`` / ``\\renewcommand`` (also ``\\newcommand\\x``)
   and ``\\def\\x{...}``, are collected from the whole file and their definitions removed; macros with
   arguments are left as written;
3. everything before the first sectioning command (``\\part``, ``\\chapter``, ``\\section``,
   ``\\subsection``, ... starred or not) is removed; a file with none is dropped;
4. the bibliography: ``thebibliography`` environments, ``\\bibliography{..}``,
   ``\\bibliographystyle{..}``, ``\\printbibliography``; and ``\\end{document}`` with what follows;
5. the macros are expanded in what remains (nested uses too, up to ``MAX_EXPANSION_ROUNDS`` passes);
6. runs of blank lines become one blank line; the text is stripped.
"""
from __future__ import annotations

import re

from ..document import Document
from ..step import Filter

MAX_EXPANSION_ROUNDS = 10
_COMMENT_ENV = re.compile(r"\\begin\{comment\}.*?\\end\{comment\}", re.DOTALL)
_INLINE_COMMENT = re.compile(r"(?<!\\)((?:\\\\)*)%.*$")
_SECTION = re.compile(r"\\(?:part|chapter|section|subsection|subsubsection|paragraph|subparagraph)\*?\s*[\[{]")
_BIB_ENV = re.compile(r"\\begin\{thebibliography\}.*?(?:\\end\{thebibliography\}|\Z)", re.DOTALL)
_BIB_COMMANDS = re.compile(r"\\(?:bibliography|bibliographystyle)\s*\{[^}]*\}|\\printbibliography\b(?:\[[^\]]*\])?")
_END_DOCUMENT = re.compile(r"\\end\{document\}.*\Z", re.DOTALL)
_NEWCOMMAND = re.compile(r"\\(?:re)?newcommand\*?\s*(?:\{\s*(\\[A-Za-z@]+)\s*\}|(\\[A-Za-z@]+))\s*")
_DEF = re.compile(r"\\def\s*(\\[A-Za-z@]+)\s*")
_BLANK_LINES = re.compile(r"\n\s*\n(?:\s*\n)+")


def remove_comments(text: str) -> str:
    text = _COMMENT_ENV.sub("", text)
    out = []
    for line in text.split("\n"):
        if line.lstrip().startswith("%"):
            continue
        stripped = _INLINE_COMMENT.sub(r"\1", line)
        out.append(stripped.rstrip() if stripped != line else line)
    return "\n".join(out)


def _braced(text: str, start: int) -> int | None:
    """Index one past the ``}`` closing the group that opens at ``text[start] == '{'``, or None."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_macros(text: str) -> tuple[str, dict[str, str]]:
    """(text without the argument-free macro definitions, {"\\name": body}); later definitions win."""
    macros: dict[str, str] = {}
    out, pos = [], 0
    for m in sorted([*_NEWCOMMAND.finditer(text), *_DEF.finditer(text)], key=lambda m: m.start()):
        if m.start() < pos:
            continue  # inside a definition already removed
        end = _braced(text, m.end())  # None when arguments ([n] or #1) come before the body
        if end is None:
            continue
        macros[m.group(m.lastindex)] = text[m.end() + 1: end - 1]
        out.append(text[pos:m.start()])
        pos = end
    out.append(text[pos:])
    return "".join(out), macros


def expand_macros(text: str, macros: dict[str, str]) -> str:
    """Replace every use of each macro (the name not followed by a letter) by its body."""
    if not macros:
        return text
    names = sorted(macros, key=len, reverse=True)
    pattern = re.compile("(?:" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z@])")
    for _ in range(MAX_EXPANSION_ROUNDS):
        expanded = pattern.sub(lambda m: macros[m.group(0)], text)
        if expanded == text:
            break
        text = expanded
    return text


def clean_latex(text: str) -> str | None:
    """The cleaned body of a LaTeX file, or None when it has no sectioning command."""
    text, macros = extract_macros(remove_comments(text))
    first = _SECTION.search(text)
    if first is None:
        return None
    text = text[first.start():]
    text = _END_DOCUMENT.sub("", _BIB_COMMANDS.sub("", _BIB_ENV.sub("", text)))
    text = expand_macros(text, macros)
    return _BLANK_LINES.sub("\n\n", text).strip()


class ArxivCleaner(Filter):
    """Rewrites each LaTeX document with ``clean_latex``; drops ``no_section`` and ``empty`` ones."""

    name = "arxiv"
    unrewritable = "no_section"

    def rewrite(self, doc: Document) -> Document | None:
        cleaned = clean_latex(doc.text)
        if cleaned is None:
            return None
        doc.text = cleaned
        return doc

    def reject_rewritten(self, doc: Document) -> str | None:
        return None if doc.text else "empty"
