"""What a task is and how one runs: completion markers, and outputs written so that reruns are safe.

A task is one shard (or one dedup partition) of one stage: a picklable object with ``name``,
``marker`` (a JSON path) and ``run() -> stats``. ``run_task`` skips a task whose marker exists, and
writes the marker only after the task's outputs are in place, so a rerun after a kill redoes exactly
the tasks that had not finished.

Every output is written under a temporary name and renamed when complete (``llama_pt.atomic``).
``output_file`` and ``output_path`` first delete the temporary files that killed attempts left beside
the same path, so a rerun leaves none behind.
"""
from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import IO, Any, Iterator, Protocol, Sequence

from llama_pt.atomic import atomic_open, atomic_path, leftovers, remove


class Task(Protocol):
    name: str
    marker: Path

    def run(self) -> dict[str, Any]: ...


class TaskError(RuntimeError):
    """A task failed; the message names it and carries the worker's traceback."""


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files that unfinished writers of ``path`` left."""
    for tmp in leftovers(path):
        remove(tmp)


@contextlib.contextmanager
def output_path(path: Path) -> Iterator[Path]:
    """``atomic_path(path)`` after ``remove_leftovers(path)``: a temporary path renamed to ``path``."""
    remove_leftovers(path)
    with atomic_path(path) as tmp:
        yield tmp


@contextlib.contextmanager
def output_file(path: Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``atomic_open(path, mode)`` after ``remove_leftovers(path)``: a file that becomes ``path``."""
    remove_leftovers(path)
    with atomic_open(path, mode, **kwargs) as f:
        yield f


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_marker(path: Path, stats: dict[str, Any]) -> None:
    with output_file(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(stats, sort_keys=True) + "\n")


def pending(tasks: Sequence[Task]) -> list[Task]:
    """The tasks without a completion marker."""
    return [t for t in tasks if not Path(t.marker).exists()]


def run_task(task: Task) -> dict[str, Any]:
    """Run ``task`` unless its marker says it is complete; return its stats (from the marker)."""
    if Path(task.marker).exists():
        return read_marker(task.marker)
    start = time.perf_counter()
    try:
        stats = task.run()
    except Exception as exc:  # re-raised with the task's name; the worker's traceback kept
        raise TaskError(f"{task.name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None
    stats["elapsed_s"] = round(time.perf_counter() - start, 3)
    write_marker(task.marker, stats)
    return stats


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over a stage's tasks (``initial``: those already complete)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="task", disable=not enabled, dynamic_ncols=True)
