"""Numerical faults: which steps to skip, and when to roll back to the last checkpoint.

A step is skipped - the optimizer does not update the weights or its moments - when
- its loss (the global batch's mean) is not finite;
- its loss spikes: z = (loss - mean) / std over the last fault.spike_window accepted losses (population
  standard deviation) is at least fault.spike_zscore, once the window is full (upward spikes only);
- its global gradient norm is not finite.
The first two are decided before the last micro-batch's backward; the trainer then makes that backward
produce non-finite gradients, which every data-parallel engine discards (ours and DeepSpeed's), so one
skip path serves all three. The loss and norm are global values, so all ranks decide alike.

After fault.max_bad_steps skipped steps in a row the trainer rolls back to the newest checkpoint and
goes on with the data AFTER the bad batches (the batches in between are not replayed: PaLM, Chowdhery et
al. 2022, Sec. 5.1, skipped the data around its loss spikes). If the steps right after a roll-back are
bad again as many times in a row, the run stops with an error rather than roll back for ever. The
window and the counters are part of the trainer state, so a resumed run decides as the original would.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional


class TrainingDiverged(RuntimeError):
    """Bad steps in a row again right after a roll-back, or with no checkpoint to roll back to."""


class StepGuard:
    def __init__(self, spike_zscore: float, spike_window: int, max_bad_steps: int):
        self.spike_zscore, self.max_bad_steps = spike_zscore, max_bad_steps
        self.window: deque[float] = deque(maxlen=spike_window)
        self.bad_in_row = 0
        self.just_rolled_back = False

    def check_loss(self, loss: float) -> Optional[str]:
        """Why this step must be skipped, from its loss alone; None if it may go ahead."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if self.spike_zscore and len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            z = (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)
            if z >= self.spike_zscore:
                return (f"loss spike ({loss:.4g} is {z:.1f} standard deviations above the mean {mean:.4g} of the "
                        f"last {len(self.window)} steps; fault.spike_zscore={self.spike_zscore:g})")
        return None

    @staticmethod
    def check_grad_norm(grad_norm: float) -> Optional[str]:
        return None if math.isfinite(grad_norm) else f"non-finite gradient norm ({grad_norm})"

    def record(self, loss: float, skipped: Optional[str]) -> None:
        if skipped is None:
            self.window.append(loss)
            self.bad_in_row, self.just_rolled_back = 0, False
        else:
            self.bad_in_row += 1

    @property
    def should_roll_back(self) -> bool:
        return bool(self.max_bad_steps) and self.bad_in_row >= self.max_bad_steps

    def rolled_back(self) -> None:
        if self.just_rolled_back:
            raise TrainingDiverged(f"{self.bad_in_row} bad steps in a row again right after rolling back "
                                   f"(fault.max_bad_steps={self.max_bad_steps}); stopping")
        self.bad_in_row, self.just_rolled_back = 0, True

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "bad_in_row": self.bad_in_row, "just_rolled_back": self.just_rolled_back}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(float(x) for x in state["window"])
        self.bad_in_row, self.just_rolled_back = int(state["bad_in_row"]), bool(state["just_rolled_back"])
