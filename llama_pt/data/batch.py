"""What a training window holds, and the micro-batch the trainer reads from a stack of windows.

A pretraining window (.packing) is int64 [seq_len + 1]: tokens, documents one after another, each ending
with its EOS. A window of packed instruction examples (llama_pt.instruct) is int64 [3, seq_len + 1], rows:
  TOKENS     the tokens;
  DOCUMENTS  the example each token belongs to (0, 1, ... in the window; the padding after the last example
             is one more);
  SCORED     1 where the token is a target the loss counts (a response token), else 0.
The loader stacks windows into [m, seq_len + 1] or [m, 3, seq_len + 1]. `read_micro_batch` cuts a stack
into inputs and targets (the next tokens), the mask of the targets that count (None: all of them) and,
with document masking (train.document_mask), the document of every input token: for instruction windows
the DOCUMENTS row, for pretraining windows the EOS positions (a document ends with its EOS, the next one
starts after it; Dubey et al. 2024, Llama 3, Sec. 3.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

TOKENS, DOCUMENTS, SCORED = 0, 1, 2
ROWS = 3  # rows of an instruction window


@dataclass
class MicroBatch:
    inputs: torch.Tensor                       # [m, seq_len]
    targets: torch.Tensor                      # [m, seq_len]: the next tokens
    scored: Optional[torch.Tensor] = None      # bool [m, seq_len]: the targets the loss counts (None: all)
    documents: Optional[torch.Tensor] = None   # [m, seq_len]: each input token's document (None: no mask)


def documents_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[m, s] document numbers of tokens [m, s]: each EOS belongs to the document it ends."""
    ends = (tokens == eos_id).long()
    return ends.cumsum(dim=1) - ends


def read_micro_batch(batch: torch.Tensor, document_mask: bool = False, eos_id: Optional[int] = None) -> MicroBatch:
    """The micro-batch of a stack of windows ([m, seq_len + 1] tokens or [m, 3, seq_len + 1] instruction windows)."""
    if batch.dim() == 2:
        inputs = batch[:, :-1]
        if document_mask and eos_id is None:
            raise ValueError("document masking of pretraining windows needs the EOS id")
        return MicroBatch(inputs, batch[:, 1:], None, documents_from_eos(inputs, eos_id) if document_mask else None)
    tokens = batch[:, TOKENS]
    return MicroBatch(tokens[:, :-1], tokens[:, 1:], batch[:, SCORED, 1:].bool(),
                      batch[:, DOCUMENTS, :-1] if document_mask else None)


def scored_targets(batch: torch.Tensor) -> int:
    """How many targets of a stack of windows the loss counts (every one of pretraining windows)."""
    if batch.dim() == 2:
        return batch.shape[0] * (batch.shape[1] - 1)
    return int(batch[:, SCORED, 1:].sum())
