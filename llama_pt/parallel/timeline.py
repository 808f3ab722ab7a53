"""A host-side timeline of communication and matmuls, to show overlap (docs/parallelism.md, "Overlap").

While `record_timeline()` is active, the parallel layers append events: when each asynchronous
collective was issued and waited for (and whether it had already finished when the wait began), and
when each backward matmul started and ended. Timestamps are host clock (time.perf_counter_ns): on CPU
(gloo runs collectives on its own threads) they are the real execution times; on CUDA they are launch
times, so use torch.profiler for device timelines there. Recording is off by default and costs one
`is None` test per event.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..atomic import write_text_atomic


@dataclass
class Event:
    name: str   # e.g. "all_gather", "dgrad"
    kind: str   # "issue" | "wait_start" | "wait_end" | "start" | "end"
    seq: int    # id tying the events of one collective or one matmul together
    time_ns: int
    done: Optional[bool] = None  # for wait_start: had the collective already finished?


_events: Optional[list[Event]] = None
_next_id = 0


@contextlib.contextmanager
def record_timeline() -> Iterator[list[Event]]:
    """Collect events from the parallel layers into the yielded list (not re-entrant)."""
    global _events
    if _events is not None:
        raise RuntimeError("record_timeline() is already active")
    _events = []
    try:
        yield _events
    finally:
        _events = None


def recording() -> bool:
    return _events is not None


def new_id() -> int:
    global _next_id
    _next_id += 1
    return _next_id


def mark(name: str, kind: str, seq: int, done: Optional[bool] = None) -> None:
    if _events is not None:
        _events.append(Event(name, kind, seq, time.perf_counter_ns(), done))


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    """Mark the start and end of a piece of computation (a matmul)."""
    if _events is None:
        yield
        return
    seq = new_id()
    mark(name, "start", seq)
    yield
    mark(name, "end", seq)


def write_chrome_trace(events: list[Event], path: str | Path, pid: int = 0) -> None:
    """Write `events` as a Chrome/Perfetto trace (collectives on one track, matmuls on another), atomically."""
    by_seq: dict[int, dict[str, Event]] = {}
    for e in events:
        by_seq.setdefault(e.seq, {})[e.kind] = e
    t0 = min((e.time_ns for e in events), default=0)
    trace = []
    for seq, kinds in sorted(by_seq.items()):
        first = kinds.get("issue") or kinds.get("start")
        last = kinds.get("wait_end") or kinds.get("end")
        if first is None or last is None:
            continue
        tid = 1 if "issue" in kinds else 0
        trace.append({"name": first.name, "ph": "X", "pid": pid, "tid": tid, "ts": (first.time_ns - t0) / 1e3,
                      "dur": (last.time_ns - first.time_ns) / 1e3, "args": {"seq": seq}})
    write_text_atomic(path, json.dumps({"traceEvents": trace, "events": [asdict(e) for e in events]}))
