"""Bad batches for the fault tests: the real data loader, with the batches at chosen positions replaced.

A batch is addressed by its position in the data (1 = the first global batch the loader yields), not by
the trainer's step, so a roll-back (which keeps the data position) is visible: the batches after it
have new positions. The real loader still advances and its state is what checkpoints record.

- `poisoned`: every token is POISON, whose embedding row `poison_embedding` sets to NaN: the forward
  pass of that batch gives a NaN loss (and NaN gradients), every other batch never reads the row.
- `random_tokens`: uniformly random tokens: a genuine loss spike for a model that has learnt the data.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

POISON = 1  # never in the test corpora (their tokens are >= 2)


class InjectingLoader:
    def __init__(self, loader, bad: dict[int, Callable[[list[torch.Tensor]], list[torch.Tensor]]]):
        self.loader, self.bad = loader, bad
        self.positions: list[int] = []  # positions yielded, in order

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for micro_batches in self.loader:
            position = self.loader.consumed_samples // self.loader.global_batch
            self.positions.append(position)
            replace = self.bad.get(position)
            yield replace(micro_batches) if replace is not None else micro_batches


def poisoned(micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.full_like(m, POISON) for m in micro_batches]


def random_tokens(micro_batches: list[torch.Tensor], vocab: int = 512) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, m.shape, generator=g) for m in micro_batches]


def poison_embedding(trainer) -> None:
    """Set POISON's embedding row to NaN on the rank that holds it (vocab-parallel: TP rank 0), through the
    engine's checkpoint API so that DeepSpeed's fp32 master copy has it too (every rank must call this)."""
    tensors = trainer.engine.state_tensors()
    emb = trainer.model.tok_embeddings
    start = getattr(emb, "vocab_start", 0)
    weight = tensors["model"]["tok_embeddings.weight"]
    if start <= POISON < start + weight.shape[0]:
        with torch.no_grad():
            weight[POISON - start] = float("nan")
    trainer.engine.load_state_tensors(tensors)


def snapshot(trainer) -> dict[str, torch.Tensor]:
    """Weights and AdamW moments of this rank, as raw bytes-comparable copies (NaN-safe comparison)."""
    tensors = trainer.engine.state_tensors()
    out = {f"model.{k}": v.detach().clone() for k, v in tensors["model"].items()}
    for name, state in tensors["optim"].items():
        for key, value in state.items():
            out[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and _raw(a[k]) == _raw(b[k]) for k in a)
