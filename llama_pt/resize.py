"""A model grown to a tokenizer that extends its vocabulary: step 2 of the Chinese-LLaMA recipe (Cui et al.
2023, "Efficient and Effective Text Encoding for Chinese LLaMA and Alpaca", Section 2: LLaMA's 32,000
pieces merged with 20,000 Chinese ones, the embedding and the output head resized to the 49,953 pieces
before further pretraining).

The new tokenizer must keep every piece of the old one at its id and add pieces after them
(`check_extends`). The rows of the old pieces are kept bit for bit in both tables; each new piece gets a
row by a named rule (`INITS`):
- `subtoken_mean` (the default): the mean of the old rows of the ids the OLD tokenizer splits the new
  piece into (Tokenizer.encode_piece), in the embedding and in the head alike — the new piece starts out
  as what the model saw for the same text (fast vocabulary transfer, Gee et al. 2022);
- `mean`: the mean of all old rows;
- `normal`: N(0, init_std) from a generator seeded 0.
A model whose vocab_size exceeds its tokenizer's pieces had rows no token used; the new tokenizer names
those ids too, and they get rows by the rule like the other new pieces.

What changes and what does not: the hidden states of a sequence of old ids are unchanged (their embedding
rows and every other weight are), so are the logits of the old ids; but the new rows' logits join the
softmax and take probability mass, so the loss and perplexity of the same text change (they grow), by
design — the new pieces are what further pretraining teaches.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from .config import ModelConfig
from .model import VOCAB_ROWS
from .tokenizer import Tokenizer

INITS = ("subtoken_mean", "mean", "normal")


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"--init={init} is unknown (known: {', '.join(INITS)})")


def check_extends(old: Tokenizer, new: Tokenizer, vocab_size: int) -> None:
    """ValueError (one line) unless `new` extends the vocabulary of a model of `vocab_size` ids whose tokenizer
    is `old`: every piece of `old` at its id, and at least vocab_size pieces."""
    if old.vocab_size > vocab_size:
        raise ValueError(f"base tokenizer {old.model_path}: {old.vocab_size} pieces do not fit the model's "
                         f"vocab_size={vocab_size}")
    if new.vocab_size < vocab_size:
        raise ValueError(f"{new.model_path} has {new.vocab_size} pieces, fewer than the model's vocab_size="
                         f"{vocab_size}: it does not extend the vocabulary")
    for i in range(old.vocab_size):
        if new.id_to_piece(i) != old.id_to_piece(i):
            raise ValueError(f"{new.model_path} does not extend the vocabulary of {old.model_path}: id {i} is "
                             f"{new.id_to_piece(i)!r} there, {old.id_to_piece(i)!r} in the model's")


def _new_rows(table: torch.Tensor, init: str, ids: range, old: Tokenizer, new: Tokenizer,
              init_std: float) -> torch.Tensor:
    """Rows for the new ids, in float64 (the old rows are table[:old.vocab_size])."""
    kept = table[:old.vocab_size]
    if init == "mean":
        return (kept.sum(dim=0, dtype=torch.float64) / len(kept)).expand(len(ids), -1)
    if init == "normal":
        generator = torch.Generator().manual_seed(0)
        return torch.normal(0.0, init_std, (len(ids), table.shape[1]), generator=generator, dtype=torch.float64)
    return torch.stack([kept[old.encode_piece(new.id_to_piece(i))].double().mean(dim=0) for i in ids])


def resize_vocabulary(state: Mapping[str, torch.Tensor], cfg: ModelConfig, old: Tokenizer, new: Tokenizer,
                      init: str = "subtoken_mean") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and state dict (padded, llama_pt.model.vocab) of the model `state`, `cfg` (tokenizer `old`)
    grown to the vocabulary of `new`. The rows of old's pieces are copied bit for bit, the new pieces' rows
    are made by `init` (in float64, then rounded once to the table's dtype), the padding rows are zero. A
    state dict of part of the model (a pipeline stage's) grows the tables it has."""
    check_init(init)
    check_extends(old, new, cfg.vocab_size)
    grown = dataclasses.replace(cfg, vocab_size=new.vocab_size)
    out = dict(state)
    ids = range(old.vocab_size, new.vocab_size)
    for name in VOCAB_ROWS:
        if name not in state:  # a part of the model (a pipeline stage) without this table
            continue
        table = state[name]
        out[name] = table.new_zeros(grown.padded_vocab_size, table.shape[1])
        out[name][:old.vocab_size] = table[:old.vocab_size]
        if ids:
            out[name][ids.start:ids.stop] = _new_rows(table, init, ids, old, new, cfg.init_std).to(table.dtype)
    return grown, out
