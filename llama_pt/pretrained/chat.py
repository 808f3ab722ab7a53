"""`python -m llama_pt.pretrained chat MODEL --template vicuna_v1.1`: an interactive chat in the terminal.

Each user line becomes a turn of the conversation; the whole conversation is rendered in the template
(llama_pt.instruct.templates: the same rendering instruction tuning trains on), followed by the template's
text before a response, and the model continues it with the KV cache (llama_pt.generate.stream_tokens),
printing the response as it is produced. A response ends at the EOS id or at the template's end marker
(Llama 3's "<|eot_id|>" text), which is not printed, or after --max-new-tokens. When the conversation no
longer fits the model's context, the oldest exchanges are dropped (a note says so).

Commands: `/reset` forgets the conversation, `/exit` (or end of input) leaves.
"""
from __future__ import annotations

import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import torch

from ..generate import stream_tokens
from ..instruct.records import Conversation
from ..instruct.templates import ChatTemplate, encode, load_template
from ..tokenizer import Tokenizer

PROMPT = "user> "
REPLY = "assistant> "


@dataclass(frozen=True)
class ResponseFrame:
    """The assistant template around a response: the text before it, and the text marker that ends it (empty
    when only the EOS id does; a response always ends at EOS too)."""
    prefix: str
    end_text: str

    @classmethod
    def of(cls, template: ChatTemplate) -> "ResponseFrame":
        prefix, after, seen_content = "", "", False
        for literal, name, _, _ in string.Formatter().parse(template.assistant):
            if seen_content:
                after += literal
            else:
                prefix += literal
            seen_content = seen_content or name == "content"
        return cls(prefix, after.strip())

    def printable(self, text: str) -> str:
        """`text` without a tail that may still turn into the end marker."""
        for keep in range(min(len(self.end_text) - 1, len(text)), 0, -1):
            if self.end_text.startswith(text[-keep:]):
                return text[:-keep]
        return text


class ChatSession:
    """The conversation so far and how to continue it; `reply(text)` yields the response's text as it grows."""

    def __init__(self, model, tokenizer: Tokenizer, template: ChatTemplate, system: Optional[str] = None,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 256,
                 seed: Optional[int] = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.frame = ResponseFrame.of(template)
        self.system, self.temperature, self.top_p, self.max_new_tokens = system, temperature, top_p, max_new_tokens
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.turns: list[tuple[str, str]] = []
        self.dropped = 0  # exchanges dropped from the start to fit the context

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def _prompt(self, turns: list[tuple[str, str]]) -> list[int]:
        ids, _ = encode(Conversation(tuple(turns), system=self.system), self.template, self.tokenizer)
        tail = self.tokenizer.encode_continuation(self.frame.prefix) if self.frame.prefix else []
        return ids.tolist() + tail

    def _fitting_prompt(self, user_text: str) -> tuple[list[int], int]:
        """The prompt for this turn and how many tokens may follow it, dropping the oldest exchanges while the
        conversation does not fit the context with room for at least a short answer."""
        context = self.model.cfg.max_seq_len
        while True:
            prompt = self._prompt(self.turns + [("user", user_text)])
            room = context - len(prompt)
            if room >= min(self.max_new_tokens, 16) or not self.turns:
                break
            self.turns = self.turns[2:]
            self.dropped += 1
        if room < 1:
            raise ValueError(f"the message is too long for the model's context ({context} tokens)")
        return prompt, min(self.max_new_tokens, room)

    def reply(self, user_text: str):
        """Yield the growing response text; the exchange joins the conversation when it is complete."""
        prompt, budget = self._fitting_prompt(user_text)
        ids: list[int] = []
        text = decoded = ""
        for token in stream_tokens(self.model, prompt, budget, self.temperature, self.top_p,
                                   self.tokenizer.eos_id, self.generator):
            ids.append(token)
            decoded = self.tokenizer.decode(ids)
            if self.frame.end_text and self.frame.end_text in decoded:
                text = decoded[:decoded.index(self.frame.end_text)]
                break
            if not decoded.endswith("\ufffd"):  # a character split over byte pieces is printed when complete
                text = decoded
                yield self.frame.printable(text)
        else:  # the whole reply, as decode gives it: a character left incomplete at the end is not dropped
            text = decoded
        self.turns += [("user", user_text), ("assistant", text.strip())]
        yield text


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The read-reply loop on a terminal (or any text streams)."""
    stdout.write(f"chat with template {session.template.name}: /reset forgets the conversation, /exit leaves\n")
    while True:
        stdout.write(PROMPT)
        stdout.flush()
        line = stdin.readline()
        if line and not stdin.isatty():  # input from a pipe or file: echo it, so that the output is a transcript
            stdout.write(line if line.endswith("\n") else line + "\n")
        if not line:
            stdout.write("\n")
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        dropped = session.dropped
        stdout.write(REPLY)
        printed = ""
        for partial in session.reply(text):
            stdout.write(partial[len(printed):])
            stdout.flush()
            printed = partial
        stdout.write("\n")
        if session.dropped > dropped:
            stdout.write(f"(history trimmed to the context: {session.dropped} earliest exchange(s) dropped)\n")


def chat_command(args) -> int:
    from .loading import load_model_and_tokenizer
    template = load_template(args.template)  # before the model is loaded: a bad name fails at once
    model, tokenizer_path = load_model_and_tokenizer(args.model, args.tokenizer)
    session = ChatSession(model.eval(), Tokenizer(Path(tokenizer_path)), template, system=args.system,
                          temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          seed=args.seed)
    return run_chat(session)


def add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="an interactive chat in the terminal (streaming; /reset, /exit)")
    chat.add_argument("model")
    chat.add_argument("--template", default="vicuna_v1.1", help="a name in configs/templates or a YAML file")
    chat.add_argument("--system", default=None, help="the system message (default: the template's)")
    chat.add_argument("--temperature", type=float, default=0.8)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--tokenizer", default=None)
