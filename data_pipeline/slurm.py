"""SLURM execution through submitit: one job array per stage, split when it exceeds MaxArraySize.

SLURM refuses an array whose largest index is >= MaxArraySize (``scontrol show config``; 1001 by
default), and submitit numbers array tasks from 0, so a stage of n tasks is submitted as
ceil(n / MaxArraySize) arrays. Each array task runs ``task.run_task`` on one task, which skips
it when its marker exists, so resubmitting a stage redoes only what did not finish.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from .task import Task, TaskError, pending, progress_bar, read_marker, run_task

SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001


def cluster_max_array_size(fallback: int = SLURM_DEFAULT_MAX_ARRAY_SIZE) -> int:
    """MaxArraySize from ``scontrol show config`` when scontrol answers, else ``fallback``."""
    if shutil.which("scontrol") is None:
        return fallback
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return fallback
    return parse_max_array_size(out) or fallback


def parse_max_array_size(scontrol_output: str) -> int | None:
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", scontrol_output, re.MULTILINE)
    return int(match.group(1)) if match else None


def split_arrays(items: Sequence[Any], max_array_size: int) -> list[list[Any]]:
    """``items`` cut into consecutive chunks of at most ``max_array_size`` (array indices 0..size-1)."""
    if max_array_size < 1:
        raise ValueError(f"slurm.max_array_size={max_array_size} must be >= 1")
    return [list(items[i:i + max_array_size]) for i in range(0, len(items), max_array_size)]


class SlurmExecutor:
    """Submits pending tasks as submitit job arrays and waits for them (progress bar over tasks).

    ``cluster`` is submitit's: ``slurm`` on a cluster, ``local`` (subprocesses) or ``debug``
    (in this process) to run the same submission path without one."""

    def __init__(self, log_dir: Path, *, partition: str | None = None, time_min: int = 240,
                 cpus_per_task: int = 1, mem_gb: float = 4.0, array_parallelism: int = 256,
                 max_array_size: int = SLURM_DEFAULT_MAX_ARRAY_SIZE, account: str | None = None,
                 qos: str | None = None, constraint: str | None = None, cluster: str = "slurm",
                 poll_s: float = 5.0, progress: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.partition, self.account, self.qos, self.constraint = partition, account, qos, constraint
        self.time_min, self.cpus_per_task, self.mem_gb = int(time_min), int(cpus_per_task), float(mem_gb)
        self.array_parallelism = int(array_parallelism)
        self.fallback_max_array_size = int(max_array_size)
        self.cluster, self.poll_s, self.progress = cluster, float(poll_s), progress

    def parameters(self, stage: str) -> dict[str, Any]:
        """submitit AutoExecutor parameters (``slurm_*`` ones apply on SLURM only)."""
        params: dict[str, Any] = {"name": f"llama-data-{stage}", "timeout_min": self.time_min,
                                  "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
                                  "slurm_array_parallelism": self.array_parallelism}
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                params[f"slurm_{key}"] = getattr(self, key)
        return params

    def max_array_size(self) -> int:
        if self.cluster != "slurm":
            return self.fallback_max_array_size
        return cluster_max_array_size(self.fallback_max_array_size)

    def submit(self, stage: str, tasks: Sequence[Task]) -> list[tuple[Task, Any]]:
        """Submit ``tasks`` (all of them) as job arrays; returns (task, submitit job) pairs."""
        import submitit

        executor = submitit.AutoExecutor(folder=self.log_dir / stage, cluster=self.cluster)
        executor.update_parameters(**self.parameters(stage))
        jobs: list[tuple[Task, Any]] = []
        for chunk in split_arrays(list(tasks), self.max_array_size()):
            with executor.batch():
                submitted = [executor.submit(run_task, task) for task in chunk]
            jobs.extend(zip(chunk, submitted))
        return jobs

    def run(self, stage: str, tasks: Sequence[Task]) -> list[dict[str, Any]]:
        todo = pending(tasks)
        if todo:
            jobs = self.submit(stage, todo)
            with progress_bar(len(tasks), len(tasks) - len(todo), stage, self.progress) as bar:
                waiting = list(jobs)
                while waiting:
                    still = [(t, j) for t, j in waiting if not j.done()]
                    bar.update(len(waiting) - len(still))
                    waiting = still
                    if waiting:
                        time.sleep(self.poll_s)
            failures = []
            for task, job in jobs:
                try:
                    job.result()
                except Exception as exc:  # collected so every failed task is named
                    failures.append(f"{task.name} (job {job.job_id}, logs in {job.paths.folder}): {exc}")
            if failures:
                raise TaskError(f"{len(failures)} task(s) of stage {stage} failed:\n" + "\n".join(failures))
        return [read_marker(t.marker) for t in tasks]
