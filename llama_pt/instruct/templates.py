"""Prompt templates as data, and a conversation tokenized into (ids, loss mask).

A template is a YAML file (configs/templates/: alpaca, vicuna_v1.1, llama2, llama3; Taori et al. 2023, Chiang
et al. 2023, Touvron et al. 2023b Sec. 3.1, Dubey et al. 2024) of text with fields in braces:
  begin             once, at the start
  system            how the system message ({system}) is written; it goes where the FIRST user turn has
                    {system}, and later turns get nothing there
  default_system    the system message of a conversation that has none (absent: none)
  default_system_with_input   the same for an Alpaca record with an input (absent: default_system)
  user              every user turn: {content}, {system}
  user_with_input   the first user turn of an Alpaca record with an input: also {input} (absent: `user`, with
                    the input appended to the instruction after a blank line)
  assistant         every response: {content}; the only text the loss counts
{bos} and {eos} anywhere stand for the tokenizer's BOS and EOS ids; nothing else is special (Llama 3's header
tokens are text, configs/templates/llama3.yaml). Turn texts are inserted as they are, braces included.

Tokenization. The rendered conversation is a sequence of chunks, each prompt (masked) or response (counted):
BOS/EOS ids, and runs of text. Each run of text is encoded on its own: after BOS, or at the very start, as
SentencePiece encodes a text (with its dummy-prefix space, as Meta's Llama 2 chat code encodes each turn after
its BOS), elsewhere as a continuation (Tokenizer.encode_continuation, no added space). So a response's tokens
are exactly those of its own text, never merged with the prompt's, and the loss mask is exact: 1 on the
tokens of every response (its end marker included: EOS, or Llama 3's <|eot_id|> text), 0 elsewhere.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional

import numpy as np
import yaml

from ..config import ConfigError, template_file
from ..tokenizer import Tokenizer
from .records import Conversation

SPECIAL = {"bos", "eos"}
KEYS = {"begin": SPECIAL, "system": {"system"}, "default_system": set(), "default_system_with_input": set(),
        "user": {"content", "system"} | SPECIAL, "user_with_input": {"content", "system", "input"} | SPECIAL,
        "assistant": {"content"} | SPECIAL}  # the fields each key may hold


class Special:
    """A chunk that is one of the tokenizer's ids, not text."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


BOS, EOS = Special("bos"), Special("eos")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str
    assistant: str
    begin: str = ""
    system: str = "{system}"
    default_system: Optional[str] = None
    default_system_with_input: Optional[str] = None
    user_with_input: Optional[str] = None


def _check_fields(value: str, allowed: set[str], where: str) -> None:
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (a literal brace is written {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in allowed or spec or conversion):
            known = ", ".join("{%s}" % f for f in sorted(allowed)) or "none"
            raise ConfigError(f"{where}: field {{{name}}} is not allowed here (allowed: {known})")


def load_template(name: str) -> ChatTemplate:
    """The template named `name` (configs/templates/<name>.yaml) or in the YAML file `name`; ConfigError (one
    line) for an unknown name or a malformed file."""
    path = template_file(name)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"template {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"template {path}: not a mapping of {', '.join(KEYS)}")
    for key, value in values.items():
        if key not in KEYS:
            raise ConfigError(f"template {path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if not isinstance(value, str) and not (value is None and key.startswith("default_system")):
            raise ConfigError(f"template {path}: {key} must be a string")
        if value is not None:
            _check_fields(value, KEYS[key], f"template {path}: {key}")
    for key in ("user", "assistant"):
        if key not in values:
            raise ConfigError(f"template {path}: {key} is missing")
    return ChatTemplate(name=path.stem, **values)


def _fill(template: str, values: dict[str, str], scored: bool) -> list[tuple[object, bool]]:
    """The chunks of one filled template string: text, BOS, EOS; each marked scored or not."""
    chunks: list[tuple[object, bool]] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            chunks.append((literal, scored))
        if name is not None:
            value = BOS if name == "bos" else EOS if name == "eos" else values[name]
            if value != "":
                chunks.append((value, scored))
    return chunks


def render(conversation: Conversation, template: ChatTemplate) -> list[tuple[object, bool]]:
    """The conversation in the template: chunks (text, BOS or EOS; scored) in order, adjacent texts of the same
    kind joined."""
    with_input = conversation.input is not None
    system = conversation.system
    if system is None:
        system = template.default_system_with_input if with_input and template.default_system_with_input \
            else template.default_system
    chunks = _fill(template.begin, {}, False)
    for i, (role, text) in enumerate(conversation.turns):
        if role == "assistant":
            chunks += _fill(template.assistant, {"content": text}, True)
            continue
        values = {"content": text, "system": ""}
        if i == 0 and system is not None:
            values["system"] = template.system.format(system=system)
        user = template.user
        if i == 0 and with_input:
            if template.user_with_input is not None:
                user, values["input"] = template.user_with_input, conversation.input
            else:
                values["content"] = f"{text}\n\n{conversation.input}"
        chunks += _fill(user, values, False)
    joined: list[tuple[object, bool]] = []
    for chunk, scored in chunks:
        if joined and isinstance(chunk, str) and isinstance(joined[-1][0], str) and joined[-1][1] == scored:
            joined[-1] = (joined[-1][0] + chunk, scored)
        else:
            joined.append((chunk, scored))
    return joined


def encode(conversation: Conversation, template: ChatTemplate, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, scored bool) of the conversation in the template: scored marks the response tokens."""
    ids: list[int] = []
    scored: list[bool] = []
    starts_text = True  # at the start or after BOS: a text is encoded as a sentence start
    for chunk, counts in render(conversation, template):
        if chunk is BOS or chunk is EOS:
            piece = [tokenizer.bos_id if chunk is BOS else tokenizer.eos_id]
        else:
            piece = tokenizer.encode(chunk) if starts_text else tokenizer.encode_continuation(chunk)
        starts_text = chunk is BOS
        ids += piece
        scored += [counts] * len(piece)
    return np.asarray(ids, dtype=np.int32), np.asarray(scored, dtype=bool)
