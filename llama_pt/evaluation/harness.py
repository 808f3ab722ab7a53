"""A model of ours as an EleutherAI lm-evaluation-harness model (`lm_eval.api.model.LM`), the way the LLaMA paper
evaluates (Touvron et al. 2023, Sec. 3): multiple-choice tasks rank the proposed completions by their
likelihood (lm-eval's `acc`, and `acc_norm`, the likelihood normalised by the completion's length in
characters, which the paper follows from Gao et al. 2021), and open-ended tasks generate greedily.

`LlamaPtLM` wraps a model in memory (a plain `Llama`, or the trainer's tensor-parallel model seen through
`llama_pt.parallel.FullLogits`) and our SentencePiece tokenizer; `llama_pt.pretrained.lm_eval_model` registers
the one that loads a checkpoint or Hugging Face folder as lm-eval's model "llama_pt".

Tokens, as LLaMA and lm-eval's Hugging Face model (HFLM) with LLaMA's tokenizer have them:
- loglikelihood(context, continuation): BOS + context + continuation, the continuation's ids being those of
  the whole text after the context's (lm-eval's `TemplateLM._encode_pair`); an empty context is BOS alone.
  Inputs longer than the model's context keep their last max_length tokens.
- loglikelihood_rolling(text): the text's tokens, without BOS, in lm-eval's disjoint rolling windows with BOS
  as the first window's prefix: every token is scored once, given BOS and what precedes it in its window.
  (HFLM encodes the text with BOS as well and so also scores BOS after the BOS prefix: lm-eval issue #3333.)
- generate_until: BOS + the context, left-truncated to leave room for max_gen_toks; greedy unless the task's
  gen_kwargs ask for sampling (llama_pt.generate: temperature, top_p); the text is cut at the first stop string.

Requests are batched longest first (right padding: causal attention never lets a real position see a pad),
on the device the model's parameters are on. Log-probabilities are taken in float32 whatever the model's
dtype, and the padding ids of the vocabulary take no probability mass (llama_pt.model.vocab).
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..generate import generate
from ..model.vocab import mask_padded_vocab
from ..tokenizer import Tokenizer

# Keys of a task's generation_kwargs that llama_pt.generate acts on (after lm-eval's normalize_gen_kwargs).
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


def pick_device(device: str) -> torch.device:
    """"auto": the first CUDA GPU when torch sees one, else the CPU; otherwise the device named ("cuda:1")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LlamaPtLM(TemplateLM):
    """`model` (tokens [b, s] -> logits [b, s, padded vocab], its `cfg` the ModelConfig) and `tokenizer` as an
    lm_eval LM; one process computes every request (lm-eval's rank 0 of 1, also on each rank of a
    tensor-parallel group, which must all make the same calls).

    `batch_size` sequences per forward pass; `max_length` tokens of context at most (default: the model's
    max_seq_len); `pad_multiple`: batches are padded to a length that is a multiple of it (a sequence-parallel
    model splits the sequence over its ranks); `progress`: lm-eval's progress bars.
    """

    backend = "causal"

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int | str = 8,
                 max_length: Optional[int] = None, pad_multiple: int = 1, progress: bool = True):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (no 'auto' here)")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.cfg.max_seq_len)
        if self.max_length > model.cfg.max_seq_len:
            raise ValueError(f"max_length={self.max_length} exceeds model.max_seq_len={model.cfg.max_seq_len}")
        self.pad_multiple = pad_multiple
        self.progress = progress
        self._device = next(model.parameters()).device

    # ---- tokens ----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a continuation scored from nothing, and the first rolling window's prefix: BOS."""
        return self.tokenizer.bos_id

    @property
    def max_gen_toks(self) -> int:
        return 256  # lm-eval's default when a task does not say

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """The ids of `string`, BOS first unless add_special_tokens is False (lm-eval asks for the bare ids of
        a continuation scored from an empty context)."""
        return self.tokenizer.encode(string, bos=add_special_tokens is not False)

    # ---- the model -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _logits(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [len(rows), longest, padded vocab] of token rows, right-padded (with EOS) to the longest,
        rounded up to a multiple of pad_multiple; the padding ids' logits are -inf."""
        width = -(-max(map(len, rows)) // self.pad_multiple) * self.pad_multiple
        tokens = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return mask_padded_vocab(self.model(tokens.to(self._device)), self.model.cfg.vocab_size)

    def _batches(self, order: list[int]) -> Iterator[list[int]]:
        for i in range(0, len(order), self.batch_size):
            yield order[i:i + self.batch_size]

    # ---- lm-eval's three request types ---------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request
        ((context, continuation) strings or None, context ids, continuation ids), longest first in batches."""
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with self._evaluating():
            for batch in self._batches(order):
                logits = self._logits([inputs[i] for i in batch])
                for row, i in enumerate(batch):
                    cont = requests[i][2]
                    end = len(inputs[i])
                    logp = F.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)
                    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                    score = logp.gather(-1, target[:, None]).sum().item()
                    out[i] = (score, bool((logp.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text) per request, scored in lm-eval's disjoint windows of at most max_length tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of the contexts, requests with equal gen_kwargs decoded together (longest first)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True), []).append(i)
        out = [""] * len(requests)
        with self._evaluating():
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
                unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
                if unknown:
                    raise ValueError(f"generation_kwargs {unknown} are not supported "
                                     f"(known: {', '.join(GENERATION_KEYS)})")
                until = handle_stop_sequences(kwargs["until"], eos=None)  # EOS ends a row as a token
                room = self.max_length - kwargs["max_gen_toks"]
                if room <= 0:
                    raise ValueError(f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a context in "
                                     f"max_length={self.max_length}")
                prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in indices}
                temperature = kwargs["temperature"] if kwargs["do_sample"] else 0.0
                for batch in self._batches(sorted(indices, key=lambda i: -len(prompts[i]))):
                    new = generate(self.model, [prompts[i] for i in batch], kwargs["max_gen_toks"],
                                   temperature=temperature, top_p=kwargs.get("top_p", 1.0),
                                   eos_id=self.eot_token_id)
                    for i, tokens in zip(batch, new):
                        out[i] = postprocess_generated_text(self.tokenizer.decode(tokens), until, None)
        return out
