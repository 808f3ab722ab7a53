"""The stages of a pipeline seen as one forward-only model, for evaluation (held-out loss, downstream accuracy).

Every stage calls `PipelineLogits(stage, pstate)(tokens)` with the same tokens; the model chunks run in
global order (chunk k on stage k % p), each stage receiving its input from the previous one and sending its
output on, as a forward pass of `run_schedule` does, one batch at a time. The last stage's logits (its TP
shard of the vocabulary, in float32) are broadcast over the PP group, so every stage returns them and goes on
computing the same metric; under TP, `FullLogits` wraps this and gathers the vocabulary. The shapes come
from the tokens, so any batch size and sequence length works (the tail window of a held-out set included).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..state import ParallelState
from .p2p import FORWARD, StageLink
from .stages import PipelineStage


class PipelineLogits(nn.Module):
    def __init__(self, stage: PipelineStage, pstate: ParallelState):
        super().__init__()
        self.stage, self.pstate = stage, pstate
        self.cfg = pstate.model_config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p, s, t = self.pstate.pp_size, self.pstate.pp_rank, self.pstate.tp_size
        chunks = p * len(self.stage.chunks)
        b, seq = tokens.shape
        shard = seq // t if self.pstate.config.sequence_parallel and t > 1 else seq
        dtype = next(self.stage.parameters()).dtype
        link = StageLink(self.pstate, (b, shard, self.cfg.dim), dtype, tokens.device)
        out = None
        for k in range(s, chunks, p):
            hidden = link.recv(s - 1, k - 1, FORWARD) if k > 0 else None
            out = self.stage(tokens, hidden=hidden, chunk=k // p)
            if k < chunks - 1:
                link.send(out, s + 1, k, FORWARD)
        link.wait_sends()
        vocab = self.cfg.padded_vocab_size // t
        logits = out.float().contiguous() if self.pstate.is_last_stage else \
            torch.empty(b, seq, vocab, dtype=torch.float32, device=tokens.device)
        dist.broadcast(logits, self.pstate.stage_rank(p - 1), group=self.pstate.pp_group)
        return logits
