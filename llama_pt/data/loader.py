"""Per-rank micro-batches for each optimizer step; the loader's whole state is one counter.

A step consumes global samples [c, c + B) where c is the number of samples consumed so far and B
the global batch (sequences). Data-parallel rank r of D owns the contiguous slice
[c + r * B/D, c + (r + 1) * B/D), delivered as B / (m * D) micro-batches of m sequences each.
Because samples[g] is a pure function of g (samples.py), the concatenation over ranks of a step's
micro-batches is the same for every D, every number of workers, and after any restart from c.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import ConfigError


class _Indexed(Dataset):
    """Adapts `samples[g]` to a map-style torch Dataset; unbounded, so the sampler picks indices."""

    def __init__(self, samples):
        self.samples = samples

    def __getitem__(self, g: int) -> np.ndarray:
        return self.samples[g]


class _RankIndices(Sampler):
    """Global indices of rank r's slices of consecutive steps, starting at `consumed`."""

    def __init__(self, consumed: int, global_batch: int, rank: int, world: int):
        self.consumed, self.global_batch, self.rank, self.per_rank = consumed, global_batch, rank, global_batch // world

    def __iter__(self) -> Iterator[int]:
        c = self.consumed
        while True:
            first = c + self.rank * self.per_rank
            yield from range(first, first + self.per_rank)
            c += self.global_batch


def _stack(batch: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch)).long()


class MicroBatchLoader:
    """Iterating yields, per optimizer step, a list of LongTensor [micro_batch, seq_len + 1].

    num_workers > 0 reads ahead in torch DataLoader worker processes (results stay in order).
    `state_dict()` is {"consumed_samples": c}; it counts every step already yielded.
    """

    def __init__(self, samples, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, num_workers: int = 0):
        for name, v in (("global_batch", global_batch), ("micro_batch", micro_batch), ("dp_size", dp_size)):
            if v <= 0:
                raise ConfigError(f"{name}={v} must be positive")
        if global_batch % (micro_batch * dp_size):
            raise ConfigError(f"global_batch={global_batch} is not divisible by micro_batch={micro_batch} "
                              f"x dp_size={dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be non-negative")
        self.samples = samples
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.micro_batches_per_step = global_batch // (micro_batch * dp_size)
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        c = state.get("consumed_samples") if isinstance(state, dict) else None
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0:
            raise ValueError(f"loader state consumed_samples={c!r} must be a non-negative integer")
        self.consumed_samples = int(c)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        sampler = _RankIndices(self.consumed_samples, self.global_batch, self.dp_rank, self.dp_size)
        loader = DataLoader(_Indexed(self.samples), batch_size=self.micro_batch, sampler=sampler,
                            num_workers=self.num_workers, collate_fn=_stack)
        step: list[torch.Tensor] = []
        for micro in loader:
            step.append(micro)
            if len(step) == self.micro_batches_per_step:
                self.consumed_samples += self.global_batch
                yield step
                step = []
