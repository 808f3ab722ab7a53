"""Record every torch.distributed collective issued inside a block: which group, which op, how many bytes.

`COMM_COUNTER` (comm.py) counts the tensor-parallel collectives our own layers issue. The data-parallel
gradient reduction is issued by DeepSpeed (ZeRO stages 1, 2) or by data_parallel.py (stage 0), so it
is measured one level lower: `trace_collectives()` wraps the torch.distributed entry points (and the
two that DeepSpeed's TorchBackend caches when it starts) for the duration of a `with` block and
records each call as a `Collective`: `ranks` are the global ranks of the group, `nbytes` the size of
the tensor comm.py's convention is stated in (the all-reduce's tensor, the all-gather's output, the
reduce-scatter's input), `during_backward` whether autograd's backward was running when it was
issued (from a gradient hook: the data-parallel reduction overlapping the backward pass).
`sent_bytes` applies that ring convention. A wrapped function calling another wrapped one (torch's
deprecated aliases do) is recorded once, at the outermost call.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

# torch.distributed function -> (op, position and keyword of the tensor the byte count refers to)
_WRAPPED = {
    "all_reduce": ("all_reduce", 0, "tensor"),
    "reduce": ("reduce", 0, "tensor"),
    "broadcast": ("broadcast", 0, "tensor"),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "all_gather_single": ("all_gather", 0, "output_tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "reduce_scatter_single": ("reduce_scatter", 1, "input"),
    "all_gather": ("all_gather", 0, "tensor_list"),
}
# DeepSpeed's TorchBackend keeps references taken at start-up (deepspeed/comm/torch.py): attribute ->
# the torch.distributed function it holds.
_DEEPSPEED_CACHED = {"all_gather_function": "all_gather_into_tensor",
                     "reduce_scatter_function": "reduce_scatter_tensor"}


@dataclass(frozen=True)
class Collective:
    op: str
    ranks: tuple[int, ...]
    nbytes: int
    numel: int
    dtype: str
    during_backward: bool = False

    @property
    def sent_bytes(self) -> Fraction:
        """Bytes each rank sends: 2(t-1)/t N for all-reduce, (t-1)/t N for all-gather and reduce-scatter,
        N for reduce and broadcast (what the root's neighbour must move)."""
        t = len(self.ranks)
        if t == 1:
            return Fraction(0)
        if self.op == "all_reduce":
            return Fraction(2 * (t - 1), t) * self.nbytes
        if self.op in ("all_gather", "reduce_scatter"):
            return Fraction(t - 1, t) * self.nbytes
        return Fraction(self.nbytes)


_local = threading.local()


def _argument(args, kwargs, index: int, keyword: str):
    return kwargs[keyword] if keyword in kwargs else args[index]


def _group(args, kwargs) -> Optional[dist.ProcessGroup]:
    if kwargs.get("group") is not None:
        return kwargs["group"]
    return next((a for a in args if isinstance(a, dist.ProcessGroup)), None)


def _wrap(fn: Callable, op: str, index: int, keyword: str, log: list) -> Callable:
    def wrapper(*args, **kwargs):
        if getattr(_local, "inside", False):
            return fn(*args, **kwargs)
        tensor = _argument(args, kwargs, index, keyword)
        tensors = list(tensor) if isinstance(tensor, (list, tuple)) else [tensor]
        group = _group(args, kwargs)
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else \
            tuple(range(dist.get_world_size()))
        log.append(Collective(op, ranks, sum(t.numel() * t.element_size() for t in tensors),
                              sum(t.numel() for t in tensors), str(tensors[0].dtype),
                              torch._C._current_graph_task_id() != -1))
        _local.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            _local.inside = False
    return wrapper


@contextlib.contextmanager
def interposed(names: tuple[str, ...], make_wrapper: Callable[[Callable, str], Callable]) -> Iterator[None]:
    """For the block, replace each torch.distributed function in `names` by make_wrapper(fn, name), and
    the two DeepSpeed keeps (when DeepSpeed's comm backend has started) by wrappers named after the
    torch function they stand for; everything is put back afterwards."""
    patched: list[tuple[object, str, Callable]] = []
    owners: list[tuple[object, dict[str, str]]] = [(dist, {name: name for name in names})]
    cdb = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    if cdb is not None:
        owners.append((cdb, {attr: name for attr, name in _DEEPSPEED_CACHED.items() if name in names}))
    for owner, table in owners:
        for attr, name in table.items():
            fn = getattr(owner, attr, None)
            if fn is not None:
                patched.append((owner, attr, fn))
                setattr(owner, attr, make_wrapper(fn, name))
    try:
        yield
    finally:
        for owner, attr, fn in reversed(patched):
            setattr(owner, attr, fn)


@contextlib.contextmanager
def trace_collectives() -> Iterator[list[Collective]]:
    """`with trace_collectives() as calls:` -> every collective issued in the block, in order."""
    log: list[Collective] = []
    with interposed(tuple(_WRAPPED), lambda fn, name: _wrap(fn, *_WRAPPED[name], log)):
        yield log


def summarize(calls: list[Collective], ranks: tuple[int, ...] | list[int]) -> dict[str, dict]:
    """Per op over the group `ranks`: {"calls", "bytes" (sent per rank), "elements", "sizes" (per call)}."""
    out: dict[str, dict] = {}
    for c in calls:
        if c.ranks != tuple(ranks):
            continue
        entry = out.setdefault(c.op, {"calls": 0, "bytes": Fraction(0), "elements": 0, "sizes": []})
        entry["calls"] += 1
        entry["bytes"] += c.sent_bytes
        entry["elements"] += c.numel
        entry["sizes"].append(c.numel)
    return out
