"""Which collective this process is waiting in, and since when: the input of the hang watchdog.

`CollectiveTracker.installed()` interposes on torch.distributed's collectives (comm_trace.interposed:
our layers, the data-parallel engines, DeepSpeed and torch.distributed.checkpoint all call them through
the module) for as long as the block runs. A blocking call is "in flight" from its start until it
returns; an asynchronous one (``async_op=True``) until its Work reports completion, so a rank blocked
in ``work.wait()`` is seen too. Works are held by weak reference: tracking never keeps a buffer alive.
The cost is one Python call and a clock read per collective.
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .comm_trace import interposed

WATCHED = ("all_reduce", "reduce", "broadcast", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
           "reduce_scatter_single", "all_gather", "reduce_scatter", "all_to_all_single", "barrier", "gather",
           "scatter", "all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
           "send", "recv", "isend", "irecv")  # point-to-point: the pipeline's transfers between stages
P2P = {"send": "to", "isend": "to", "recv": "from", "irecv": "from"}

_local = threading.local()


@dataclass
class InFlight:
    """One collective call: the op, its group and first tensor's shape and dtype (formatted only when
    described: this is built on the hot path)."""
    op: str
    group: Optional[dist.ProcessGroup]
    tensor: Optional[tuple[torch.Size, torch.dtype]]
    started: float  # time.monotonic()
    peer: Optional[int] = None  # point-to-point: the other rank

    def ranks(self) -> list[int]:
        if self.group is not None:
            return list(dist.get_process_group_ranks(self.group))
        return list(range(dist.get_world_size())) if dist.is_initialized() else [0]

    def describe(self) -> str:
        tensor = ""
        if self.tensor is not None:
            shape, dtype = self.tensor
            tensor = f" ({list(shape)} {str(dtype).removeprefix('torch.')})"
        if self.op in P2P:
            return f"{self.op} {P2P[self.op]} rank {self.peer}{tensor}"
        return f"{self.op} over ranks {compact_ranks(self.ranks())}{tensor}"


def compact_ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 3] -> '0-3'; [0, 2, 4] -> '0,2,4'; long irregular lists are cut after 8."""
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    shown = ",".join(map(str, ranks[:8]))
    return shown + (f",... ({len(ranks)} ranks)" if len(ranks) > 8 else "")


def _first_tensor(args: tuple, kwargs: dict) -> Optional[tuple[torch.Size, torch.dtype]]:
    for value in (*args[:2], *kwargs.values()):
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            value = value[0]
        if isinstance(value, torch.Tensor):
            return value.shape, value.dtype
    return None


def _peer(name: str, args: tuple, kwargs: dict) -> Optional[int]:
    if name not in P2P:
        return None
    return kwargs.get("dst", kwargs.get("src", args[1] if len(args) > 1 else None))


def _group(args: tuple, kwargs: dict) -> Optional[dist.ProcessGroup]:
    if isinstance(kwargs.get("group"), dist.ProcessGroup):
        return kwargs["group"]
    return next((a for a in args if isinstance(a, dist.ProcessGroup)), None)


class CollectiveTracker:
    def __init__(self):
        self._lock = threading.Lock()
        self._blocking: Optional[InFlight] = None
        self._async: list[tuple[InFlight, weakref.ref]] = []

    def _wrap(self, fn: Callable, name: str) -> Callable:
        def wrapper(*args: Any, **kwargs: Any):
            if getattr(_local, "inside", False):  # a wrapped function calling another (torch's aliases)
                return fn(*args, **kwargs)
            call = InFlight(name, _group(args, kwargs), _first_tensor(args, kwargs), time.monotonic(),
                            _peer(name, args, kwargs))
            _local.inside = True
            self._blocking = call
            try:
                out = fn(*args, **kwargs)
            finally:
                self._blocking = None
                _local.inside = False
            if out is not None and hasattr(out, "is_completed"):
                with self._lock:
                    while self._async and _done(self._async[0][1]):
                        self._async.pop(0)
                    self._async.append((call, weakref.ref(out)))
            return out
        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator["CollectiveTracker"]:
        with interposed(WATCHED, self._wrap):
            yield self

    def oldest_waiting(self) -> Optional[InFlight]:
        """The longest-running collective not yet complete (blocking or asynchronous), if any."""
        with self._lock:
            self._async = [(call, ref) for call, ref in self._async if not _done(ref)]
            waiting = [call for call, _ in self._async]
        blocking = self._blocking
        if blocking is not None:
            waiting.append(blocking)
        return min(waiting, key=lambda c: c.started) if waiting else None


def _done(ref: weakref.ref) -> bool:
    work = ref()
    return work is None or work.is_completed()
