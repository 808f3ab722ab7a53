"""The terminal chat (python -m llama_pt.pretrained chat): driven through a pseudo-terminal as a user would,
and its session checked against the template rendering and greedy generation it stands on."""
import os
import select
import subprocess
import sys
import time

import pytest
import torch

from support import REPO
from llama_pt.generate import generate
from llama_pt.hf_interop import export_hf
from llama_pt.instruct.records import Conversation
from llama_pt.instruct.templates import encode, load_template
from llama_pt.model import Llama, ModelConfig
from llama_pt.pretrained.chat import ChatSession, ResponseFrame
from llama_pt.tokenizer import Tokenizer

CFG = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=512, multiple_of=32, max_seq_len=256)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer_512):
    torch.manual_seed(0)
    model = Llama(CFG)
    with torch.no_grad():  # a random model that does not stop at once: EOS made unlikely
        model.output.weight[Tokenizer(tokenizer_512).eos_id].fill_(0.0)
    return export_hf(model, CFG, tmp_path_factory.mktemp("chat") / "hf", tokenizer_path=tokenizer_512,
                     dtype="float32")


class Terminal:
    """A process on a pseudo-terminal: type lines, read what the screen shows."""

    def __init__(self, *args):
        self.master, slave = os.openpty()
        env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb"}
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_pt.pretrained", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, env=env, close_fds=True)
        os.close(slave)
        self.screen, self.seen = "", 0

    def read_until(self, text: str, timeout: float = 60) -> str:
        """What appeared since the last call, up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.seen:]:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{text!r} did not appear; the screen shows:\n{self.screen}")
            self.screen += os.read(self.master, 4096).decode("utf-8", "replace")
        end = self.screen.index(text, self.seen) + len(text)
        new, self.seen = self.screen[self.seen:end], end
        return new

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def test_two_turns_reset_and_exit_through_a_terminal(model_folder):
    term = Terminal("chat", str(model_folder), "--template", "vicuna_v1.1", "--temperature", "0",
                    "--max-new-tokens", "12")
    try:
        term.read_until("user> ")
        term.type("What does the licence allow?")
        term.read_until("assistant> ")
        first = term.read_until("\nuser> ").split("\n")[0].rstrip("\r")
        term.type("And what does it forbid?")
        term.read_until("assistant> ")
        second = term.read_until("\nuser> ").split("\n")[0].rstrip("\r")
        term.type("/reset")
        term.read_until("(conversation cleared)")
        term.type("/exit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.proc.kill()
        os.close(term.master)
    # What the screen showed is the greedy continuation of the rendered conversation, turn by turn.
    tokenizer = Tokenizer(model_folder / "tokenizer.model")
    from llama_pt.pretrained.loading import load_hf_model
    model = load_hf_model(model_folder)
    template = load_template("vicuna_v1.1")
    prefix = tokenizer.encode_continuation(ResponseFrame.of(template).prefix)
    turns = [("user", "What does the licence allow?")]
    expected = []
    for question in ("What does the licence allow?", "And what does it forbid?"):
        if question != turns[-1][1]:
            turns.append(("user", question))
        prompt = encode(Conversation(tuple(turns)), template, tokenizer)[0].tolist() + prefix
        answer = tokenizer.decode(generate(model, [prompt], 12, temperature=0.0, eos_id=tokenizer.eos_id)[0])
        expected.append(answer)
        turns.append(("assistant", answer.strip()))
    assert [first, second] == expected
    assert first.strip(), "the model printed nothing"


def test_an_unknown_template_is_one_line(model_folder):
    done = subprocess.run([sys.executable, "-m", "llama_pt.pretrained", "chat", str(model_folder), "--template",
                           "alpacca"], cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "alpacca" in done.stderr, done.stderr


def test_history_is_trimmed_to_the_context(model_folder):
    from llama_pt.pretrained.loading import load_hf_model
    short = load_hf_model(model_folder)
    short.cfg = ModelConfig(**{**CFG.to_dict(), "max_seq_len": 96})
    session = ChatSession(short, Tokenizer(model_folder / "tokenizer.model"), load_template("vicuna_v1.1"),
                          system="Be brief.", temperature=0.0, max_new_tokens=16)
    for i in range(4):
        list(session.reply(f"question number {i} about the licence and its many long conditions"))
    assert session.dropped >= 1 and len(session.turns) < 8
    assert session.turns[-2] == ("user", "question number 3 about the licence and its many long conditions")


def test_the_end_marker_is_never_printed():
    frame = ResponseFrame.of(load_template("llama3"))
    assert frame.end_text == "<|eot_id|>" and frame.prefix == ""
    assert frame.printable("Paris<|eot") == "Paris" and frame.printable("Paris") == "Paris"
    assert ResponseFrame.of(load_template("vicuna_v1.1")) == ResponseFrame(" ", "")


def test_sampled_replies_stream_and_follow_temperature_and_top_p(model_folder):
    """The reply arrives in growing pieces, and with --temperature/--top-p/--seed it is the sampled continuation
    `generate` draws with the same settings; another top-p draws another one."""
    from llama_pt.pretrained.loading import load_hf_model
    model = load_hf_model(model_folder)
    tokenizer = Tokenizer(model_folder / "tokenizer.model")
    template = load_template("alpaca")
    replies = {}
    for top_p in (0.9, 0.3):
        session = ChatSession(model, tokenizer, template, temperature=1.2, top_p=top_p, max_new_tokens=20, seed=3)
        parts = list(session.reply("Name a licence."))
        assert len(parts) > 5 and all(b.startswith(a) for a, b in zip(parts, parts[1:-1]))
        prompt = encode(Conversation((("user", "Name a licence."),)), template, tokenizer)[0].tolist()
        want = generate(model, [prompt], 20, temperature=1.2, top_p=top_p, eos_id=tokenizer.eos_id, seed=3)[0]
        assert parts[-1] == tokenizer.decode(want)
        replies[top_p] = parts[-1]
    assert replies[0.9] != replies[0.3]
