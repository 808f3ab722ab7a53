"""Instruction examples packed into training windows; `samples[g]` is a pure function of (seed, g).

Epoch e orders the examples by a permutation drawn from np.random.default_rng([seed, e]). With packing, the
windows of seq_len + 1 tokens are filled greedily in that order: an example joins the current window if it
fits, else it starts the next one, and the rest of a window is padding (EOS ids, never scored, a document
of its own). Without packing every window holds one example, padded. An example longer than a window keeps
its first seq_len + 1 tokens; one left without a response token is dropped (counted). The window layout is
llama_pt.data.batch's (rows TOKENS, DOCUMENTS, SCORED), which the trainer reads with train.document_mask
deciding whether the documents become an attention mask and restarting positions (Dubey et al. 2024, Sec. 3.2).

Nothing depends on the data-parallel layout, loader workers or restarts: since the epochs' window counts
differ with packing, an object keeps the cumulative counts of the epochs it has reached and the plans of the
last two it read, both recomputed identically by any process.
"""
from __future__ import annotations

import bisect
import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import TaskConfig
from ..data.batch import DOCUMENTS, ROWS, SCORED, TOKENS
from ..tokenizer import Tokenizer
from .records import Conversation, read_conversations
from .templates import ChatTemplate, encode, load_template


@dataclass(frozen=True)
class Example:
    ids: np.ndarray     # int32 token ids
    scored: np.ndarray  # bool: the response tokens, the targets the loss counts


def build_examples(conversations: Sequence[Conversation], template: ChatTemplate, tokenizer: Tokenizer,
                   max_tokens: int) -> tuple[list[Example], Counter]:
    """Every conversation tokenized in the template and cut to max_tokens; the counts of cut and dropped ones."""
    examples, counts = [], Counter()
    for conversation in conversations:
        ids, scored = encode(conversation, template, tokenizer)
        if len(ids) > max_tokens:
            counts["truncated"] += 1
            ids, scored = ids[:max_tokens], scored[:max_tokens]
            if not scored.any():
                counts["dropped_no_response_left"] += 1
                continue
        examples.append(Example(ids, scored))
    return examples, counts


class InstructSamples:
    """`samples[g]` -> int64 [3, seq_len + 1] for any global sample index g >= 0 (epochs repeat)."""

    def __init__(self, examples: Sequence[Example], seq_len: int, seed: int, packing: bool, pad_id: int):
        if not examples:
            raise ValueError("no instruction examples to train on")
        self.examples, self.seq_len, self.seed, self.packing = list(examples), seq_len, seed, packing
        self.pad_id = pad_id
        self.lengths = np.array([len(e.ids) for e in self.examples])
        if self.lengths.max() > seq_len + 1:
            raise ValueError(f"an example has {self.lengths.max()} tokens, more than seq_len + 1 = {seq_len + 1}")
        self._starts = [0]  # the first global index of each epoch reached so far
        self._plans: OrderedDict[int, list[list[int]]] = OrderedDict()

    def plan(self, epoch: int) -> list[list[int]]:
        """The examples of each window of `epoch`, in order."""
        if epoch in self._plans:
            return self._plans[epoch]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
        windows: list[list[int]] = []
        used = self.seq_len + 1  # no open window yet
        for i in order:
            n = int(self.lengths[i])
            if not self.packing or used + n > self.seq_len + 1:
                windows.append([])
                used = 0
            windows[-1].append(i)
            used += n
        self._plans[epoch] = windows
        while len(self._plans) > 2:
            self._plans.popitem(last=False)
        return windows

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, window within the epoch) of global sample g."""
        if g < 0:
            raise IndexError(f"sample {g} is negative")
        while self._starts[-1] <= g:
            self._starts.append(self._starts[-1] + len(self.plan(len(self._starts) - 1)))
        epoch = bisect.bisect_right(self._starts, g) - 1
        return epoch, g - self._starts[epoch]

    def __getitem__(self, g: int) -> np.ndarray:
        epoch, k = self.locate(int(g))
        members = self.plan(epoch)[k]
        out = np.zeros((ROWS, self.seq_len + 1), dtype=np.int64)
        out[TOKENS] = self.pad_id
        out[DOCUMENTS] = len(members)  # the padding: one more document
        pos = 0
        for d, i in enumerate(members):
            example = self.examples[i]
            end = pos + len(example.ids)
            out[TOKENS, pos:end] = example.ids
            out[DOCUMENTS, pos:end] = d
            out[SCORED, pos:end] = example.scored
            pos = end
        return out

    def report(self, num_samples: int) -> str:
        """Examples, tokens, and what the run's first num_samples windows make of them."""
        tokens, scored = int(self.lengths.sum()), sum(int(e.scored.sum()) for e in self.examples)
        windows = len(self.plan(0))
        epochs, _ = self.locate(max(num_samples - 1, 0))
        return (f"{len(self.examples)} examples, {tokens:,} tokens ({scored:,} in responses); "
                f"{'packed' if self.packing else 'one per window'}: {windows} windows of {self.seq_len + 1} per epoch "
                f"({tokens / (windows * (self.seq_len + 1)):.0%} filled); the run reads {num_samples} windows "
                f"(into epoch {epochs + 1})")


def held_out(example: Example, fraction: float) -> bool:
    """Whether an example is held out: a hash of its token ids below `fraction` (the same on every rank and run,
    whatever the order of the files)."""
    digest = hashlib.blake2b(np.ascontiguousarray(example.ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < fraction


@dataclass
class InstructionData:
    samples: InstructSamples
    tokenizer: Tokenizer
    summary: str  # lines for the trainer's start-up log
    valid: Optional[InstructSamples] = None  # the held-out examples, one per window (task.valid_fraction)


def open_instruction_data(task: TaskConfig, seq_len: int, tokenizer_path: str | Path, num_samples: int,
                          warn: Callable[[str], None] = print) -> InstructionData:
    """task.files read, written in task.template, tokenized and packed into windows of seq_len + 1 tokens;
    each skipped record is one `warn` line, and the summary says what was read, kept, cut and packed."""
    tokenizer = Tokenizer(tokenizer_path)
    template = load_template(task.template)
    conversations, read = read_conversations(task.files, warn)
    examples, cut = build_examples(conversations, template, tokenizer, seq_len + 1)
    valid = [e for e in examples if held_out(e, task.valid_fraction)]
    train = [e for e in examples if not held_out(e, task.valid_fraction)]
    samples = InstructSamples(train, seq_len, task.seed, task.packing, tokenizer.eos_id)
    cut_text = ", ".join(f"{n} {reason}" for reason, n in sorted(cut.items())) or "none cut"
    summary = f"{read.summary()}\ntemplate {template.name}: {cut_text}; {samples.report(num_samples)}"
    held = None
    if valid:
        held = InstructSamples(valid, seq_len, task.seed, packing=False, pad_id=tokenizer.eos_id)
        summary += (f"\nheld out (task.valid_fraction={task.valid_fraction}): {len(valid)} examples, "
                    f"{sum(int(e.scored.sum()) for e in valid):,} response tokens")
    return InstructionData(samples, tokenizer, summary, held)
