"""The training sample sequence: samples[g] is a pure function of (seed, g) given the mixture.

`BlendedSamples` composes the blend (which source, which of its samples; blend.py) with each
source's packed windows (packing.py). Nothing in it depends on the data-parallel layout, the
number of loader workers, or on what was read before, so any process can read any index.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .blend import DEFAULT_BLOCK, Blend
from .packing import PackedSource

PREBUILT_EPOCHS = 8  # per source, by build_index


class BlendedSamples:
    """`samples[g]` -> int64 array [seq_len + 1] for any global sample index g >= 0 (unbounded)."""

    def __init__(self, sources: Sequence[PackedSource], weights: Sequence[float],
                 requested_epochs: Optional[Mapping[str, Optional[float]]] = None,
                 vocab_size: Optional[int] = None, eos_id: Optional[int] = None,
                 block_size: int = DEFAULT_BLOCK):
        if not sources:
            raise ValueError("a blend needs at least one source")
        lengths = {s.seq_len for s in sources}
        if len(lengths) != 1:
            raise ValueError(f"sources disagree on seq_len: {sorted(lengths)}")
        self.sources = list(sources)
        self.seq_len = lengths.pop()
        self.blend = Blend(weights, [s.name for s in sources], block_size)
        self.requested_epochs = dict(requested_epochs or {})
        self.vocab_size, self.eos_id = vocab_size, eos_id

    def locate(self, g: int) -> tuple[str, int]:
        """(source name, sample index within the source) of global sample g."""
        s, j = self.blend(g)
        return self.sources[s].name, j

    def __getitem__(self, g: int) -> np.ndarray:
        s, j = self.blend(int(g))
        return self.sources[s][j]

    def build_index(self, num_samples: int, max_epochs: int = PREBUILT_EPOCHS) -> int:
        """Build, where missing, the epoch tables that global samples [0, num_samples) read, at most the
        first `max_epochs` of each source; returns how many epochs this call built.

        Later epochs are built when first read. The cap matters for a small source read hundreds of
        times (each epoch's build is cheap, but thousands of them would delay the start); a large source
        is read a few times (LLaMA's Table 1: at most 2.45 epochs), so its whole run is prebuilt."""
        drawn = self.blend.samples_per_source(num_samples)
        return sum(src.build_epochs(src.epochs_for(int(k))[:max_epochs]) for src, k in zip(self.sources, drawn))

    def epoch_report(self, train_tokens: int) -> list[dict[str, Any]]:
        """Per source, for a run of `train_tokens` tokens (rounded up to whole samples): the realised
        sampling fraction, samples and tokens drawn, and the epochs that makes, next to the epochs
        requested in the config or manifest (None where none were given)."""
        n = math.ceil(train_tokens / self.seq_len)
        drawn = self.blend.samples_per_source(n)
        rows = []
        for src, frac, k in zip(self.sources, self.blend.fractions, drawn):
            rows.append({"source": src.name, "fraction": float(frac), "tokens_available": src.num_tokens,
                         "samples": int(k), "tokens_seen": int(k) * self.seq_len,
                         "epochs": int(k) / src.windows_per_epoch,
                         "requested_epochs": self.requested_epochs.get(src.name)})
        return rows


def format_epoch_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width text table of `epoch_report` rows, for the trainer's start-up log."""
    head = f"{'source':<16} {'fraction':>8} {'tokens':>14} {'seen':>14} {'epochs':>7} {'asked':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        asked = "-" if r["requested_epochs"] is None else f"{r['requested_epochs']:.2f}"
        lines.append(f"{r['source']:<16} {r['fraction']:>8.2%} {r['tokens_available']:>14,} "
                     f"{r['tokens_seen']:>14,} {r['epochs']:>7.2f} {asked:>7}")
    return "\n".join(lines)
