"""Held-out perplexity: exp of the mean next-token negative log-likelihood over held-out tokens.

The held-out shards are read in order, without shuffling, as consecutive windows of seq_len + 1
tokens sharing one token (data.packing.SequentialWindows): every token after the first is a
target exactly once, the last window being shorter when the tokens do not divide evenly. The padding ids
of the vocabulary take no probability mass (llama_pt.model.vocab).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llama_pt.data.indexed import PathLike
from llama_pt.data.packing import SequentialWindows
from llama_pt.model.vocab import mask_padded_vocab


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
    vocab_size = model.cfg.vocab_size
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for idx in batches:
            tokens = torch.stack([torch.from_numpy(windows[k]) for k in idx]).to(device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            logits = mask_padded_vocab(model(inputs).float(), vocab_size)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            keep = torch.ones_like(nll, dtype=torch.bool) if eos_id is None else targets.reshape(-1) != eos_id
            total_nll += nll[keep].double().sum().item()
            total_tokens += int(keep.sum().item())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no target tokens were scored (all targets are EOS?)")
    mean = total_nll / total_tokens
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": total_tokens, "batches": len(batches)}
