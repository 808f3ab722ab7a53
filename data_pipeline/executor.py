"""Running a stage's tasks: the local process pool, and the choice between it and SLURM.

Both executors take a stage name and its tasks (``task.Task``), run the tasks without a completion
marker, and return every task's stats, read from the markers.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Sequence

from .slurm import SlurmExecutor
from .task import Task, pending, progress_bar, read_marker, run_task


class LocalExecutor:
    """Runs pending tasks on ``workers`` processes (in this process when one worker)."""

    def __init__(self, workers: int = 1, progress: bool = True) -> None:
        self.workers = max(1, int(workers))
        self.progress = progress

    def run(self, stage: str, tasks: Sequence[Task]) -> list[dict[str, Any]]:
        todo = pending(tasks)
        with progress_bar(len(tasks), len(tasks) - len(todo), stage, self.progress) as bar:
            if self.workers == 1 or len(todo) <= 1:
                for task in todo:
                    run_task(task)
                    bar.update()
            else:
                # fork: workers start at once with what this process imported (no thread pool of
                # torch or tokenizers has started here); spawn where fork does not exist.
                ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
                with ctx.Pool(min(self.workers, len(todo))) as pool:
                    for _ in pool.imap_unordered(run_task, todo):
                        bar.update()
        return [read_marker(t.marker) for t in tasks]


def make_executor(kind: str, *, workers: int = 1, progress: bool = True, log_dir: Path | None = None,
                  slurm: dict[str, Any] | None = None) -> LocalExecutor | SlurmExecutor:
    """``local`` or ``slurm`` (submitit job arrays; ``slurm.cluster=local|debug`` runs them here)."""
    if kind == "local":
        return LocalExecutor(workers, progress)
    if kind == "slurm":
        return SlurmExecutor(Path(log_dir or "."), progress=progress, **(slurm or {}))
    raise ValueError(f"executor={kind!r} must be local or slurm")
