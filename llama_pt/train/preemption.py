"""Preemption: SIGTERM and SLURM's pre-timeout signal become "write a checkpoint after this step, then exit".

`StopSignals` is a context manager around the training loop. Its handler only records the first
signal (the loop may be inside a collective or a checkpoint write when it arrives); the loop asks
`requested` once per step, all ranks agree (trainer.py: a MAX all-reduce, since a signal reaches the
ranks at slightly different times), the step completes, a checkpoint is written and the run returns
normally, so the process exits with status 0 and torchrun sees a clean exit.

Under SLURM (launch/slurm/train.sbatch) USR1 arrives `--signal=B:USR1@120` before the time limit and
the batch script requeues the job; torchrun forwards SIGTERM to its workers on preemption or scancel.
Under submitit (Hydra sweeps) the pre-timeout signal is USR2 and submitit's own handler requeues the
job: the handler found when the trainer started is called after the checkpoint (`forward_to_previous`),
so submitit still does its part. The default handlers are put back when the block ends.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable, Optional


class StopSignals:
    def __init__(self, names: tuple[str, ...] | list[str], rank: int = 0):
        self.signals = [signal.Signals[name] for name in names]
        self.rank = rank
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return self.received.name if self.received is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            print(f"rank {self.rank}: received {self.received.name}: a checkpoint is written after this step, "
                  f"then the run exits", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def forward_to_previous(self) -> None:
        """Call the Python handler that was installed before ours for the received signal (submitit's)."""
        previous: Optional[Callable] = self._previous.get(self.received)
        if self.received is not None and callable(previous):
            previous(int(self.received), None)
