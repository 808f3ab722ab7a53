"""The transformer block recomputed from its input in backward (activation mode `full`).

Full recomputation (Chen et al. 2016; Korthikanti et al. 2022, Sec. 5): only the layer input is kept
(torch.utils.checkpoint, non-reentrant) and the whole layer's forward runs again in backward.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..model.llama import TransformerBlock


class CheckpointedBlock(TransformerBlock):
    """TransformerBlock whose training forward saves its input only; decoding takes the plain path."""

    def forward(self, x, cos, sin, start_pos: int = 0, cache=None, documents=None):
        if cache is not None or start_pos != 0 or not torch.is_grad_enabled():
            return super().forward(x, cos, sin, start_pos, cache, documents)
        return checkpoint(super().forward, x, cos, sin, 0, None, documents, use_reentrant=False)
