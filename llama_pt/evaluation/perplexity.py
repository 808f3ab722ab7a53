"""Perplexity: exp of the mean next-token negative log-likelihood, over held-out shards or one token stream.

Two ways of cutting a long stream into the model's context (Touvron et al. 2023 report perplexity as the
training loss of held-out data, Sec. 2 and Fig. 1; downstream scores in Sec. 3):

- `evaluate_perplexity`, the trainer's held-out loss: the shards read in order, without shuffling, as
  consecutive windows of seq_len + 1 tokens sharing one token (data.packing.SequentialWindows): every token
  after the first is a target exactly once, with the context since its window's start (0 ... seq_len - 1
  tokens), the last window being shorter when the tokens do not divide evenly.
- `strided_perplexity`, how WikiText is usually scored: the sliding window of Hugging Face's "Perplexity of
  fixed-length models" recipe. Windows of `max_length` tokens start every `stride` tokens; in each, only the
  tokens not scored by an earlier window are targets (the overlapping prefix is context, label -100), so
  every token is scored once, with up to max_length - 1 tokens of context. stride = max_length gives the
  disjoint windows (the first token of each window then goes unscored, as in the recipe).

The padding ids of the vocabulary take no probability mass (llama_pt.model.vocab).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batch import read_micro_batch
from ..data.indexed import PathLike
from ..data.packing import SequentialWindows
from ..data.shards import Shards
from ..model.vocab import mask_padded_vocab


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, prefixes: Sequence[PathLike], seq_len: int, batch_size: int,
                        max_batches: Optional[int] = None, device: torch.device | str = "cpu",
                        eos_id: Optional[int] = None) -> dict[str, float]:
    """Mean token NLL and perplexity of `model` (tokens [b, s] -> logits [b, s, padded vocab]; its `cfg` gives
    the real vocabulary) on held-out shards.

    Full windows go in batches of `batch_size`; the short tail window, if any, is a batch of its own.
    `max_batches` stops after that many batches (None: all). With `eos_id`, targets equal to it are
    left out of the mean (perplexity of the text alone); by default EOS targets count like any token.
    Log-probabilities are taken in float32 and summed in float64. The model is put in eval mode and
    restored to its previous mode afterwards.

    Returns {"nll", "perplexity", "tokens" (targets scored), "batches"}.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches={max_batches} must be positive or None")
    windows = SequentialWindows(prefixes, seq_len)
    batches = [list(range(i, min(i + batch_size, windows.num_full)))
               for i in range(0, windows.num_full, batch_size)]
    if len(windows) > windows.num_full:
        batches.append([windows.num_full])
    if max_batches is not None:
        batches = batches[:max_batches]

    def scored():
        for idx in batches:
            tokens = torch.stack([torch.from_numpy(windows[k]) for k in idx]).to(device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            yield inputs, targets, None if eos_id is None else targets != eos_id
    return _mean_nll(model, scored(), len(batches), "no target tokens were scored (all targets are EOS?)")


@torch.no_grad()
def evaluate_response_loss(model: torch.nn.Module, windows: Sequence[np.ndarray], batch_size: int,
                           max_batches: Optional[int] = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean NLL and perplexity over the scored targets (the responses) of instruction windows (int64 [3, seq_len
    + 1], llama_pt.data.batch's layout), `batch_size` windows at a time, in order. Each window should hold one
    example followed by padding: attention being causal, the example then sees nothing but itself, as alone.

    Returns {"nll", "perplexity", "tokens" (targets scored), "batches"}."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    starts = list(range(0, len(windows), batch_size))[:max_batches]

    def scored():
        for start in starts:
            micro = read_micro_batch(torch.from_numpy(np.stack(windows[start:start + batch_size])).to(device))
            yield micro.inputs, micro.targets, micro.scored
    return _mean_nll(model, scored(), len(starts), "no response tokens were scored")


def _mean_nll(model: torch.nn.Module, batches, n_batches: int, empty: str) -> dict[str, float]:
    """The mean NLL over the kept targets of (inputs [b, s], targets [b, s], keep: bool [b, s] or None for all)
    batches, log-probabilities in float32 summed in float64; the model in eval mode, its mode restored after."""
    vocab_size = model.cfg.vocab_size
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for inputs, targets, keep in batches:
            logits = mask_padded_vocab(model(inputs).float(), vocab_size)
            if keep is None:
                keep = torch.ones_like(targets, dtype=torch.bool)
            nll = F.cross_entropy(logits[keep], targets[keep], reduction="none")
            total_nll += nll.double().sum().item()
            total_tokens += int(keep.sum().item())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError(empty)
    mean = total_nll / total_tokens
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "batches": n_batches}


def stream_of(prefixes: Sequence[PathLike]) -> np.ndarray:
    """All the tokens of the held-out shards, in order, as one int64 stream (EOS between documents)."""
    shards = Shards(prefixes)
    return shards.token_slice(0, shards.num_tokens).astype(np.int64)


def strided_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The recipe's windows over a stream of num_tokens: (begin, end, first target) per window, where tokens
    [begin, end) are the input and tokens [first target, end) its targets. Each window starts `stride` after
    the previous; its targets are the tokens after the previous window's end (`trg_len = end - prev_end`
    in the recipe), never its own first token, which has no context."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]")
    if num_tokens < 2:
        raise ValueError(f"a stream of {num_tokens} token(s) has nothing to score")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def strided_perplexity(model: torch.nn.Module, tokens: Sequence[int] | np.ndarray, max_length: int, stride: int,
                       batch_size: int = 1, device: torch.device | str = "cpu") -> dict[str, float]:
    """Perplexity of one token stream (BOS first when it is a text, as a tokenizer gives it) under the
    sliding window of `strided_windows`, `batch_size` windows per forward pass.

    The mean is over the tokens scored, each once, so that it is the same number as the recipe run with
    transformers when its per-window mean losses are weighted by the targets each averaged (the labels
    other than -100 after the shift). Log-probabilities in float32, sums in float64; the model's mode is
    restored afterwards.

    Returns {"nll", "perplexity", "tokens" (targets scored), "windows"}.
    """
    if max_length > model.cfg.max_seq_len:
        raise ValueError(f"max_length={max_length} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    windows = strided_windows(len(stream), max_length, stride)
    vocab_size = model.cfg.vocab_size
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            width = max(end - begin for begin, end, _ in batch) - 1
            inputs = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (begin, end, first) in enumerate(batch):
                inputs[row, :end - begin - 1] = stream[begin:end - 1]
                scored = slice(first - begin - 1, end - begin - 1)  # target j is token begin + 1 + j
                targets[row, scored] = stream[first:end]
            logits = mask_padded_vocab(model(inputs.to(device)).float(), vocab_size)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1),
                                  ignore_index=-100, reduction="none")  # 0 where ignored
            total_nll += nll.double().sum().item()
            total_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "windows": len(windows)}
