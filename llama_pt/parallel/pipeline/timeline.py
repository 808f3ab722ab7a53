"""What one pipeline stage did during a step, and the idle time (the bubble) measured from it.

`StageTimeline` records, per stage, the start and end of every forward and backward of a micro-batch and of
every wait for a peer's activation or gradient (host clock, time.perf_counter_ns: one machine's monotonic
clock, comparable between its processes). The idle fraction of a stage is the share of the step's span (from
the earliest start to the latest end over all stages) not spent computing: for 1F1B it is (p-1)/(m+p-1), for
interleaved 1F1B (p-1)/(V m + p-1), with equal forward and backward times per chunk (Narayanan et al. 2021,
Sec. 2.2.1-2.2.2), plus what the transfers cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StageTimeline:
    stage: int
    events: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # (op, chunk, micro-batch, start, end)

    def record(self, op: str, chunk: int, micro_batch: int, start_ns: int) -> None:
        """op: "F" or "B" (compute), "recv_F" or "recv_B" (waiting for a peer), "send_F" or "send_B" (issue)."""
        self.events.append((op, chunk, micro_batch, start_ns, time.perf_counter_ns()))

    def compute_ns(self) -> int:
        return sum(end - start for op, _, _, start, end in self.events if op in ("F", "B"))

    def span(self) -> tuple[int, int]:
        return min(e[3] for e in self.events), max(e[4] for e in self.events)


def idle_fraction(timelines: list[StageTimeline]) -> list[float]:
    """Per stage: 1 - (its compute time) / (the span of the step over all stages)."""
    start = min(t.span()[0] for t in timelines)
    end = max(t.span()[1] for t in timelines)
    return [1.0 - t.compute_ns() / (end - start) for t in timelines]
