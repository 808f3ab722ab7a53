"""The trainer's view of its data: the rank's micro-batch loader, held-out evaluation, and the tokenizer.

The sources' epoch tables (llama_pt.data.packing) go to data.index_dir, by default
<train.out_dir>/data_index, which like the checkpoints must be a folder every rank sees. Global rank 0
builds the tables of the epochs the run's train.steps read (at most the first 8 of each source,
llama_pt.data.samples.PREBUILT_EPOCHS) while the other ranks wait at a barrier; a later epoch is built
on demand by the first process that needs it.

Under task=sft the windows come from instruction data instead (llama_pt.instruct): every rank reads, tokenizes
and packs task.files itself (a pure function of the config), global rank 0 alone printing the skipped records;
the examples task.valid_fraction holds out are the held-out set, scored on their responses.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig
from ..config.sections import sft_tokenizer
from ..data import (BlendedSamples, MicroBatchLoader, SequentialWindows, build_train_samples, format_epoch_table,
                    load_manifest, valid_prefixes)
from ..evaluation import evaluate_perplexity, evaluate_response_loss
from ..parallel import FullLogits, ParallelState
from ..parallel.pipeline import PipelineLogits


def logits_model(model: torch.nn.Module, pstate: Optional[ParallelState]) -> torch.nn.Module:
    """`model` as tokens -> full logits on every rank: a pipeline runs its stages forward and hands the last one's
    logits to all; under TP the vocabulary is gathered. Every rank of the TP group and pipeline must call it."""
    if pstate is not None and pstate.pp_size > 1:
        model = PipelineLogits(model, pstate)
    if pstate is not None and pstate.tp_size > 1:
        model = FullLogits(model, pstate)
    return model


@dataclass
class HeldOut:
    prefixes: list[str]
    seq_len: int
    batch_size: int

    def evaluate(self, model: torch.nn.Module, autocast: Callable, max_batches: int,
                 pstate: Optional[ParallelState] = None) -> dict[str, float]:
        """Held-out loss (see `logits_model` for who must call it).

        Under sequence parallelism the short tail window (length not divisible by the TP size) is left out.
        """
        device = next(model.parameters()).device
        if pstate is not None and pstate.tp_size > 1 and pstate.config.sequence_parallel:
            full_batches = math.ceil(SequentialWindows(self.prefixes, self.seq_len).num_full / self.batch_size)
            max_batches = min(max_batches or full_batches, full_batches)
        with autocast():
            result = evaluate_perplexity(logits_model(model, pstate), self.prefixes, self.seq_len, self.batch_size,
                                         max_batches=max_batches or None, device=device)
        return {"valid_loss": result["nll"], "valid_ppl": result["perplexity"]}


@dataclass
class HeldOutExamples:
    """task=sft with task.valid_fraction: the held-out instruction examples, one per window."""
    windows: Sequence[np.ndarray]
    batch_size: int

    def evaluate(self, model: torch.nn.Module, autocast: Callable, max_batches: int,
                 pstate: Optional[ParallelState] = None) -> dict[str, float]:
        """The mean loss over the held-out responses (see `logits_model` for who must call it)."""
        device = next(model.parameters()).device
        with autocast():
            result = evaluate_response_loss(logits_model(model, pstate), self.windows, self.batch_size,
                                            max_batches=max_batches or None, device=device)
        return {"valid_loss": result["nll"], "valid_ppl": result["perplexity"]}


@dataclass
class TrainData:
    loader: MicroBatchLoader
    valid: Optional[HeldOut | HeldOutExamples]
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    epoch_table: str  # what the run reads: per source, or the instruction data's summary


def prepare_index(samples: BlendedSamples, num_samples: int) -> None:
    """Global rank 0 builds the epoch tables that samples [0, num_samples) read; the other ranks of the
    process group (if there is one) wait for it."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        samples.build_index(num_samples)
    if dist.is_initialized():
        dist.barrier()


def build_train_data(run: RunConfig, dp_rank: int, dp_size: int, build_index: bool = True) -> TrainData:
    """Open and check the data of `run` for one data-parallel rank; `build_index=False` (the launcher's
    config check) leaves the epoch tables to the trainer."""
    if run.task.name == "sft":
        return build_instruction_data(run, dp_rank, dp_size)
    cfg = run.data
    if cfg.index_dir is None:
        cfg = dataclasses.replace(cfg, index_dir=str(Path(run.train.out_dir) / "data_index"))
    samples = build_train_samples(cfg, run.train.seq_len)
    if samples.vocab_size > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({samples.vocab_size}) named in data.manifest={cfg.manifest}")
    if run.train.init_tokenizer is not None and samples.vocab_size != run.model.vocab_size:
        raise ConfigError(f"data.manifest={cfg.manifest} was tokenized with {samples.vocab_size} pieces, not with "
                          f"train.init_tokenizer={run.train.init_tokenizer} ({run.model.vocab_size})")
    if build_index:
        prepare_index(samples, run.train.steps * run.train.global_batch_sequences)
    loader = MicroBatchLoader(samples, run.train.global_batch_sequences, run.train.micro_batch_size,
                              dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.num_workers)
    held_out = valid_prefixes(cfg)
    valid = HeldOut(held_out, run.train.seq_len, run.train.micro_batch_size) if held_out else None
    manifest: dict[str, Any] = load_manifest(cfg.manifest, check_files=False)
    table = format_epoch_table(samples.epoch_report(run.train.steps * run.train.global_batch_tokens))
    return TrainData(loader=loader, valid=valid, tokenizer_path=Path(manifest["tokenizer"]),
                     vocab_size=samples.vocab_size, eos_id=samples.eos_id, epoch_table=table)


def build_instruction_data(run: RunConfig, dp_rank: int, dp_size: int) -> TrainData:
    """task=sft: the packed instruction windows of task.files for one data-parallel rank, and the held-out
    examples (task.valid_fraction) if any."""
    from ..instruct import open_instruction_data
    tokenizer = sft_tokenizer(run.task, run.train)
    quiet = dist.is_initialized() and dist.get_rank() != 0
    warn = (lambda line: None) if quiet else functools.partial(print, file=sys.stderr)
    data = open_instruction_data(run.task, run.train.seq_len, tokenizer,
                                 run.train.steps * run.train.global_batch_sequences, warn)
    if data.tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} is smaller than the vocabulary of the sft "
                          f"tokenizer {tokenizer} ({data.tokenizer.vocab_size})")
    loader = MicroBatchLoader(data.samples, run.train.global_batch_sequences, run.train.micro_batch_size,
                              dp_rank=dp_rank, dp_size=dp_size)
    valid = None if data.valid is None else \
        HeldOutExamples([data.valid[k] for k in range(len(data.valid.examples))], run.train.micro_batch_size)
    return TrainData(loader=loader, valid=valid, tokenizer_path=Path(tokenizer), vocab_size=data.tokenizer.vocab_size,
                     eos_id=data.tokenizer.eos_id, epoch_table=data.summary)
