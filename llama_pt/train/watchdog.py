"""Hangs: a heartbeat file per rank, and a watchdog that ends a rank stuck in a collective.

Every rank runs one daemon thread that
1. writes ``<out_dir>/heartbeats/rank_XXXXX.json`` (atomically, every fault.heartbeat_every_s seconds):
   host, pid, torchrun restart count, the step and phase the training loop last announced (`beat`) and
   since when, and the collective the rank is waiting in;
2. ends the process (exit status 3, after printing why) when this rank has waited in one collective
   for more than fault.collective_timeout_s. The message names the step, the phase, the collective
   (op, group, tensor), where the main thread waits, and every rank's last heartbeat: a rank that
   stopped participating is the one whose heartbeat is old (frozen or dead) or whose phase differs.

When one rank stops, the others block in their next collective with it, so each of them times out and
reports. torchrun then restarts the workers (``--max-restarts``) or the job ends. The process groups get
a backstop timeout of twice collective_timeout_s (llama_pt.train.distributed) in case this thread
cannot run. ``python -m llama_pt.train.watchdog <out_dir>`` prints the heartbeats of a run.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

from ..atomic import write_text_atomic
from ..parallel.inflight import CollectiveTracker, compact_ranks

HUNG_EXIT_STATUS = 3
STALE_AFTER_BEATS = 4  # a heartbeat older than this many intervals means the rank stopped


def heartbeat_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "heartbeats"


def _write_json(path: Path, record: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(record), durable=False)  # rewritten every few seconds


def read_heartbeats(folder: Path) -> list[dict[str, Any]]:
    beats = []
    for path in sorted(folder.glob("rank_*.json")):
        try:
            beats.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):  # being replaced right now: skip this one
            continue
    return beats


def describe_heartbeats(folder: Path, interval_s: float, now: Optional[float] = None) -> str:
    """Ranks grouped by (step, phase) when fresh; each stale rank on its own line."""
    now = time.time() if now is None else now
    fresh: dict[tuple[int, str], list[int]] = defaultdict(list)
    lines = []
    for beat in read_heartbeats(folder):
        age = now - beat["written"]
        where = f"step {beat['step']}, phase '{beat['phase']}'"
        if age > STALE_AFTER_BEATS * interval_s:
            lines.append(f"  rank {beat['rank']} ({beat['host']} pid {beat['pid']}): NO HEARTBEAT for {age:.1f} s, "
                         f"last at {where}{', in ' + beat['collective'] if beat.get('collective') else ''}")
        else:
            fresh[(beat["step"], beat["phase"])].append(beat["rank"])
    for (step, phase), ranks in sorted(fresh.items()):
        label = "rank" if len(ranks) == 1 else "ranks"
        lines.append(f"  {label} {compact_ranks(sorted(ranks))}: alive at step {step}, phase '{phase}'")
    return "\n".join(lines) if lines else "  (no heartbeat files)"


def _main_thread_location() -> str:
    """Innermost frame of the main thread outside torch, and the innermost llama_pt frame."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    outside_torch = ours = None
    while frame is not None:
        name = frame.f_code.co_filename
        here = f"{Path(name).name}:{frame.f_lineno} in {frame.f_code.co_name}"
        if outside_torch is None and f"{os.sep}torch{os.sep}" not in name:
            outside_torch = here
        if ours is None and f"{os.sep}llama_pt{os.sep}" in name:
            ours = here
        frame = frame.f_back
    if outside_torch == ours or ours is None:
        return outside_torch or "unknown"
    return f"{outside_torch} (from {ours})"


class Watchdog:
    def __init__(self, out_dir: str | Path, rank: int, collective_timeout_s: float, heartbeat_every_s: float,
                 tracker: Optional[CollectiveTracker] = None, on_hang: Optional[Callable[[str], None]] = None):
        self.folder = heartbeat_dir(out_dir)
        self.path = self.folder / f"rank_{rank:05d}.json"
        self.rank, self.timeout_s, self.interval_s = rank, collective_timeout_s, heartbeat_every_s
        self.tracker = tracker
        self.on_hang = on_hang or _end_process
        self.step, self.phase, self.phase_since = 0, "start-up", time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llama_pt-watchdog", daemon=True)
        self._identity = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                          "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}

    def start(self) -> "Watchdog":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()
        return self

    def beat(self, step: int, phase: str) -> None:
        """The training loop's progress: called at every phase change (cheap: three assignments)."""
        if phase != self.phase or step != self.step:
            self.step, self.phase, self.phase_since = step, phase, time.time()

    def write(self, collective: Optional[str] = None, hung: Optional[str] = None) -> None:
        record = {**self._identity, "step": self.step, "phase": self.phase, "phase_since": self.phase_since,
                  "written": time.time(), "collective": collective}
        if hung:
            record["hung"] = hung
        _write_json(self.path, record)

    def _run(self) -> None:
        wake = min(self.interval_s, self.timeout_s / 4)
        last_write = time.monotonic()
        while not self._stop.wait(wake):
            waiting = self.tracker.oldest_waiting() if self.tracker is not None else None
            now = time.monotonic()
            if waiting is not None and now - waiting.started > self.timeout_s:
                self._report_hang(waiting.describe(), now - waiting.started)
                return
            if now - last_write >= self.interval_s:
                self.write(waiting.describe() if waiting is not None else None)
                last_write = now

    def _report_hang(self, collective: str, waited_s: float) -> None:
        summary = (f"rank {self.rank} ({self._identity['host']} pid {self._identity['pid']}): collective {collective} "
                   f"has not completed after {waited_s:.1f} s (fault.collective_timeout_s={self.timeout_s:g}) at step "
                   f"{self.step}, phase '{self.phase}', waiting at {_main_thread_location()}; ending this process")
        self.write(collective, hung=summary)
        self.on_hang(f"{summary}\nheartbeats ({self.folder}):\n{describe_heartbeats(self.folder, self.interval_s)}")

    def close(self) -> None:
        """Stop the thread; the file keeps the last phase (e.g. 'finished' or 'stopped')."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.write()


def _end_process(message: str) -> None:
    """The main thread is blocked inside a collective (C++): the process can only be ended from here."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(HUNG_EXIT_STATUS)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m llama_pt.train.watchdog",
                                     description="Print the per-rank heartbeats of a training run.")
    parser.add_argument("out_dir", help="the run's train.out_dir")
    parser.add_argument("--interval", type=float, default=10.0, help="the run's fault.heartbeat_every_s")
    args = parser.parse_args(argv)
    folder = heartbeat_dir(args.out_dir)
    if not folder.is_dir():
        print(f"error: {folder} does not exist (no heartbeats written there)", file=sys.stderr)
        return 2
    print(describe_heartbeats(folder, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
