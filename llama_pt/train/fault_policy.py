"""What a training step does about faults, behind one small interface (docs/fault_tolerance.md).

- `beat(step, phase)`: this rank's heartbeat, which the watchdog thread writes and which names the phase
  a hang report shows (.watchdog; the watchdog also ends a rank stuck in one collective);
- `decide(step, mean_loss, stop_requested)`: before the last backward of a step, whether to skip its
  update (.step_guard: non-finite or spiking loss) and whether to stop after it (a stop signal), agreed
  by every rank in one MAX all-reduce;
- `after_update(loss, grad_norm, skipped)`: a non-finite gradient norm also skips; the guard's window and
  its count of bad steps in a row;
- `should_roll_back` / `rolled_back()`: too many bad steps in a row, and the roll-back that follows.
The guard's state is part of the trainer state (`state_dict`), so a resumed run decides as the original.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import FaultConfig
from ..parallel.inflight import CollectiveTracker
from .step_guard import StepGuard
from .watchdog import Watchdog


class FaultPolicy:
    def __init__(self, fault: FaultConfig, out_dir: Path, rank: int, distributed: bool, device: torch.device):
        self.fault, self.distributed, self.device = fault, distributed, device
        self.guard = StepGuard(fault.spike_zscore, fault.spike_window, fault.max_bad_steps)
        self.watchdog = Watchdog(out_dir, rank, fault.collective_timeout_s, fault.heartbeat_every_s)
        self._closing = contextlib.ExitStack()
        self._closing.callback(self.watchdog.close)
        self.watchdog.start()

    def watch_collectives(self) -> None:
        """From now on every torch.distributed collective is visible to the watchdog (with a process group)."""
        if self.distributed:
            self.watchdog.tracker = self._closing.enter_context(CollectiveTracker().installed())

    def beat(self, step: int, phase: str) -> None:
        self.watchdog.beat(step, phase)

    def decide(self, step: int, mean_loss: float, stop_requested: bool) -> tuple[Optional[str], bool]:
        """(why step `step`'s update is skipped or None, whether every rank stops after it)."""
        return self._agree(step, self.guard.check_loss(mean_loss), stop_requested)

    def _agree(self, step: int, skip: Optional[str], stop: bool) -> tuple[Optional[str], bool]:
        """Every rank takes the same two decisions (MAX over the world): skip this update? stop after it?
        A signal reaches the ranks at different moments; the loss checks agree by construction."""
        if not self.distributed:
            return skip, stop
        self.beat(step, "step agreement")
        flags = torch.tensor([skip is not None, stop], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        any_skip, any_stop = (bool(v) for v in flags.tolist())
        if any_skip and skip is None:
            skip = "skipped by another rank's check"
        return skip, any_stop

    def after_update(self, loss: float, grad_norm: float, skipped: Optional[str]) -> Optional[str]:
        """Record the step; returns why it was skipped (a non-finite gradient norm included), or None."""
        if skipped is None:
            skipped = self.guard.check_grad_norm(grad_norm)
        self.guard.record(loss, skipped)
        return skipped

    @property
    def should_roll_back(self) -> bool:
        return self.guard.should_roll_back

    @property
    def bad_in_row(self) -> int:
        return self.guard.bad_in_row

    def rolled_back(self) -> None:
        """Called before restoring the roll-back checkpoint; TrainingDiverged when it happens twice in a row."""
        self.guard.rolled_back()

    def state_dict(self) -> dict[str, Any]:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.load_state_dict(state)

    def close(self) -> None:
        self._closing.close()
