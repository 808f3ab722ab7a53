"""The trainer's downstream evaluation: train.downstream_task scored every train.downstream_every steps
(llama_pt.evaluation.downstream), on the live model.

Every rank computes it, the ranks of a tensor-parallel group together (their logits gathered by
`FullLogits`, the batches padded to a multiple of the TP size under sequence parallelism), every
data-parallel replica the same numbers; global rank 0 logs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import RunConfig
from ..parallel import FullLogits, ParallelState
from ..parallel.pipeline import PipelineLogits
from ..tokenizer import Tokenizer


class InLoopDownstream:
    def __init__(self, run: RunConfig, tokenizer_path: Path):
        from ..evaluation.downstream import DownstreamTask  # lm_eval: imported only by runs that ask for it
        self.task = DownstreamTask(run.train.downstream_task, Tokenizer(tokenizer_path), run.train.micro_batch_size)

    def evaluate(self, model: torch.nn.Module, autocast: Callable, pstate: ParallelState) -> dict[str, float]:
        pad_multiple = 1
        if pstate.pp_size > 1:
            model = PipelineLogits(model, pstate)
        if pstate.tp_size > 1:
            model = FullLogits(model, pstate)
            pad_multiple = pstate.tp_size if pstate.config.sequence_parallel else 1
        with autocast():
            return self.task.evaluate(model, pad_multiple=pad_multiple)


def build_downstream(run: RunConfig, tokenizer_path: Path) -> Optional[InLoopDownstream]:
    """The run's downstream evaluation, its task file checked and data read (None: train.downstream_every=0)."""
    return InLoopDownstream(run, tokenizer_path) if run.train.downstream_every else None
