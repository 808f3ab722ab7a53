"""One pipeline stage of a Llama, cut from the full model where `Llama.forward`'s comments say.

Like tensor parallelism, the cut is applied from outside (as in torchtitan): the trainer makes the full model
on the meta device (no storage) the same way on every rank, `build_stage` keeps the parts of this rank's
stage, and only those are then materialized, sharded over TP, given adapters and their activation mode
(llama_pt.train.model_setup; the transforms take a stage as they take a Llama). `build_stage` also cuts a
model already materialized and transformed (the tests do), keeping its parts as they are. The stage holds them
under the full model's names (``tok_embeddings``, ``layers.<global index>``, ``norm``, ``output``), so its
state dict, its optimizer's parameter groups (weight decay by name) and its checkpoints are keyed as the whole
model's are: a checkpoint written by any split loads at any other (llama_pt.parallel.checkpoint_layout).

With virtual stages (interleaved 1F1B) a stage holds V model chunks: chunk v of stage s is model chunk
k = v * p + s of llama_pt.config.pipeline.stage_layers; the embedding belongs to chunk 0 of stage 0, the
head to the last chunk of the last stage.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...config.pipeline import stage_layers
from ...model.llama import Llama
from ...ops.documents import DocumentMask
from ..state import ParallelState


class PipelineStage(nn.Module):
    """The embedding (first stage), the layers of this stage's chunks, the final norm and head (last stage)."""

    def __init__(self, model: Llama, chunks: list[range], first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.chunks = chunks  # global layer indices of each of this stage's model chunks (virtual stages)
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for r in chunks for i in r})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, tokens: torch.Tensor, hidden: Optional[torch.Tensor] = None, chunk: int = 0,
                positions: Optional[torch.Tensor] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model chunk `chunk` of this stage on one micro-batch: tokens [batch, seq] (every stage has them: the
        sequence length, positions and documents come from them), `hidden` the previous chunk's output (None
        on the first). Returns the hidden state for the next chunk, or the logits after the last."""
        s = tokens.shape[1]
        if positions is None:
            cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None if documents is None else DocumentMask(documents)
        h = self.tok_embeddings(tokens) if hidden is None else hidden
        for i in self.chunks[chunk]:
            h = self.layers[str(i)](h, cos, sin, 0, None, mask)
        if chunk == len(self.chunks) - 1 and self.output is not None:
            return self.output(self.norm(h))
        return h


def stage_split(pstate: ParallelState) -> list[range]:
    """The layers of every model chunk of the run (chunk k on stage k % p)."""
    cfg = pstate.config
    return stage_layers(pstate.model_config.n_layers, cfg.model_chunks, cfg.pipeline_embedding_layers,
                        cfg.pipeline_head_layers)


def build_stage(model: Llama, pstate: ParallelState) -> PipelineStage:
    """This rank's stage of `model` (on meta, or materialized, sharded over TP, with its blocks): the rest is
    dropped."""
    split, p = stage_split(pstate), pstate.pp_size
    chunks = split[pstate.pp_rank::p]
    return PipelineStage(model, chunks, first=pstate.is_first_stage, last=pstate.is_last_stage)
