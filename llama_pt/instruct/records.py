"""Instruction data read into conversations: Alpaca records and ShareGPT / Vicuna conversations.

Two record forms, told apart per record, in `.jsonl` files (one record per line) or `.json` files (a JSON array
of records, or JSONL):
- Alpaca (Taori et al. 2023, alpaca_data.json): {"instruction", "input", "output"}, all three strings, the input
  possibly empty or absent (as in Alpaca-format sets that leave it out when there is none): one user turn (the
  instruction, with the input as its context) and one response.
- ShareGPT, as Vicuna trained on it (Chiang et al. 2023; FastChat's data format):
  {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}, "user" and "assistant" accepted
  for human and gpt: an optional system message first, then user and assistant turns alternating, user first
  and assistant last.
Text is stripped of surrounding whitespace (the templates write all whitespace between turns). A record that
breaks these rules, or a line that is not JSON, is skipped with a one-line warning naming the file, the line
and the reason, and counted by reason; `ReadReport.summary()` is the one-line account.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    """User and assistant turns, alternating, user first and assistant last; an optional system message and,
    for an Alpaca record, the input that gives the first instruction its context."""
    turns: tuple[tuple[str, str], ...]  # (role: "user" | "assistant", text)
    system: Optional[str] = None
    input: Optional[str] = None
    where: str = ""  # "file:line", for messages


class Skip(Exception):
    """A record that is not read: `reason` is its count's name, the message says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class ReadReport:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"instruction records: {self.read} read, {self.kept} kept; skipped: {skipped}"


def _text(record: dict, key: str, allow_empty: bool = False) -> str:
    if key not in record:
        raise Skip(f"missing_{key}", f'no "{key}" field')
    value = record[key]
    if not isinstance(value, str):
        raise Skip(f"{key}_not_a_string", f'"{key}" is {type(value).__name__}, not a string')
    if not allow_empty and not value.strip():
        raise Skip(f"empty_{key}", f'"{key}" is empty')
    return value.strip()


def alpaca_conversation(record: dict, where: str) -> Conversation:
    context = _text(record, "input", allow_empty=True) if "input" in record else None
    instruction, output = _text(record, "instruction"), _text(record, "output")
    return Conversation((("user", instruction), ("assistant", output)), input=context or None, where=where)


def sharegpt_conversation(record: dict, where: str) -> Conversation:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise Skip("empty_conversations", '"conversations" is not a non-empty list')
    system, out = None, []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise Skip("malformed_turn", f'turn {i} is not {{"from": str, "value": str}}')
        role = ROLES.get(turn["from"])
        if role is None:
            raise Skip("unknown_role", f'turn {i} is from {turn["from"]!r} (known: {", ".join(ROLES)})')
        text = turn["value"].strip()
        if not text:
            raise Skip("empty_turn", f"turn {i} is empty")
        if role == "system":
            if i:
                raise Skip("misplaced_system", f"turn {i} is a system message after the first turn")
            system = text
            continue
        if role != ("user" if len(out) % 2 == 0 else "assistant"):
            raise Skip("roles_not_alternating", f"turn {i} is a second {role} turn in a row"
                       if out else f"turn {i} is from the {role}, not the user")
        out.append((role, text))
    if not out or out[-1][0] != "assistant":
        raise Skip("no_final_response", "the conversation does not end with an assistant turn")
    return Conversation(tuple(out), system=system, where=where)


def _json_array(text: str) -> Iterator[tuple[int, Any]]:
    """(line, element) of a JSON array, element by element, so that a bad element is found by its line;
    yields (line, Skip) for the first malformed element, after which nothing of the file can be read."""
    decoder = json.JSONDecoder()
    counted, line = 0, 1

    def line_of(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos
    pos = skip_space(0) + 1  # past "["
    while True:
        pos = skip_space(pos)
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line_of(pos), Skip("malformed_json", f"not JSON ({e.msg}); the rest of the file is not read")
            return
        yield line_of(pos), value
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            yield line_of(pos), Skip("malformed_json", "expected ',' or ']'; the rest of the file is not read")
            return


def _json_lines(text: str) -> Iterator[tuple[int, Any]]:
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            try:
                yield n, json.loads(raw)
            except json.JSONDecodeError as e:
                yield n, Skip("malformed_json", f"not JSON ({e.msg})")


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    return _json_array(text) if path.suffix == ".json" and text.lstrip().startswith("[") else _json_lines(text)


def conversation_of(record: Any, where: str) -> Conversation:
    """The conversation of one record (Alpaca or ShareGPT); Skip if it breaks the rules of its form."""
    if isinstance(record, Skip):
        raise record
    if not isinstance(record, dict):
        raise Skip("not_an_object", f"a JSON {type(record).__name__}, not an object")
    if "conversations" in record:
        return sharegpt_conversation(record, where)
    return alpaca_conversation(record, where)


def read_conversations(paths: Sequence[str | Path], warn: Callable[[str], None] = print
                       ) -> tuple[list[Conversation], ReadReport]:
    """Every readable record of the files, in order, and the report; each skipped record is one `warn` line."""
    report, out = ReadReport(), []
    for path in map(Path, paths):
        for line, record in _records(path):
            report.read += 1
            try:
                out.append(conversation_of(record, f"{path}:{line}"))
            except Skip as skip:
                report.skipped[skip.reason] += 1
                warn(f"warning: {path}:{line}: skipped ({skip.reason}): {skip}")
    report.kept = len(out)
    return out, report
