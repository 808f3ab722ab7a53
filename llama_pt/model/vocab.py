"""The padded vocabulary (llama_pt.config.model): the embedding and the output head have padded_vocab_size
rows, and the ids from vocab_size on are padding, no token of the tokenizer.

`mask_padded_vocab` is the one place their logits are taken out: the loss (llama_pt.parallel.cross_entropy,
on each rank's slice of the vocabulary), held-out perplexity (llama_pt.evaluation) and sampling
(llama_pt.generate) all call it.
"""
from __future__ import annotations

import torch

# The parameters of Llama with a row per vocabulary id (padded here, not in a Hugging Face folder).
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, start: int = 0) -> torch.Tensor:
    """`logits` [..., n] of the vocabulary ids start ... start + n - 1 with those of the padding ids
    (>= vocab_size) set to -inf: softmax gives them probability 0, argmax never picks them, and they get
    no gradient. Returns `logits` itself when the slice holds no padding id."""
    n = logits.shape[-1]
    if start + n <= vocab_size:
        return logits
    padding = torch.arange(start, start + n, device=logits.device) >= vocab_size
    return logits.masked_fill(padding, float("-inf"))
