"""The raw collectives of the parallel layers, instrumented: bytes sent per rank, per collective and phase.

Byte convention (ring algorithms, Patarasuk & Yuan 2009; the convention of NCCL's bus bandwidth):
a group of t ranks
- all-reduce of an N-byte tensor: each rank sends 2 (t-1)/t N bytes (reduce-scatter then all-gather);
- all-gather whose OUTPUT is N bytes, reduce-scatter whose INPUT is N bytes: each rank sends (t-1)/t N.
A group of one rank sends nothing and no collective is issued (the layers cost nothing at t=1).

The sequence dimension of activations is dim 1 ([batch, seq, ...]). Gloo and NCCL gather and scatter
along dim 0 of a contiguous buffer, so the helpers gather into [t * batch, seq/t, ...] and move the
rank dimension next to the sequence (one copy), and the reverse for reduce-scatter.

Every collective returns a `Pending`; synchronous callers wait at once. Asynchronous ones let the
caller compute while the collective is in flight (llama_pt.parallel.layers, the overlapped backward).
"""
from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import timeline

FWD, BWD = "fwd", "bwd"


# torch 2.13 renamed the single-tensor collectives; older releases (the GPU machines' 2.11) have the old names.
# Looked up at call time, so comm_trace.trace_collectives sees these calls too.
def _all_gather_single(*args, **kwargs):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_single(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


class CommCounter:
    """Bytes each rank sent and number of calls, keyed "<collective>.<phase>" (e.g. "all_gather.bwd")."""

    def __init__(self) -> None:
        self.bytes: dict[str, Fraction] = defaultdict(Fraction)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, collective: str, phase: str, total_bytes: int, group_size: int) -> None:
        factor = Fraction(2 * (group_size - 1), group_size) if collective == "all_reduce" else \
            Fraction(group_size - 1, group_size)
        key = f"{collective}.{phase}"
        self.bytes[key] += factor * total_bytes
        self.calls[key] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def summary(self) -> dict[str, dict]:
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in sorted(self.bytes)}


COUNTER = CommCounter()


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of a ParallelState group; None (no process group) means one rank."""
    return 1 if group is None else dist.get_world_size(group)


class Pending:
    """A collective in flight; `wait()` returns its result (a tensor)."""

    def __init__(self, work, finish: Callable[[], torch.Tensor], name: str):
        self._work, self._finish, self.name = work, finish, name
        self._seq = timeline.new_id() if timeline.recording() and work is not None else 0
        if work is not None:
            timeline.mark(name, "issue", self._seq)

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            if timeline.recording():
                timeline.mark(self.name, "wait_start", self._seq, done=self._work.is_completed())
            self._work.wait()
            timeline.mark(self.name, "wait_end", self._seq)
            self._work = None
        return self._finish()


def _done(x: torch.Tensor) -> Pending:
    return Pending(None, lambda: x, "noop")


def _issue(name, phase, total_bytes, group, launch, finish, async_op) -> Pending:
    COUNTER.add(name, phase, total_bytes, group_size(group))
    pending = Pending(launch(), finish, name)
    if not async_op:
        pending.wait()
    return pending


def all_reduce(x: torch.Tensor, group, phase: str, *, op=dist.ReduceOp.SUM, async_op: bool = False) -> Pending:
    """Sum (or `op`) of x over the group, in place on a contiguous x."""
    if group_size(group) == 1:
        return _done(x)
    x = x.contiguous()
    return _issue("all_reduce", phase, x.numel() * x.element_size(), group,
                  lambda: dist.all_reduce(x, op=op, group=group, async_op=True), lambda: x, async_op)


def _check_seq(s: int, t: int) -> None:
    if s % t:
        raise ValueError(f"sequence length {s} is not divisible by the tensor-parallel size {t} "
                         f"(sequence parallelism shards dim 1)")


def all_gather_seq(x: torch.Tensor, group, phase: str, *, async_op: bool = False) -> Pending:
    """[b, s/t, ...] shards -> [b, s, ...], rank r's shard at positions r*s/t ... (r+1)*s/t - 1."""
    t = group_size(group)
    if t == 1:
        return _done(x)
    x = x.contiguous()
    b, rest = x.shape[0], x.shape[1:]
    buf = torch.empty((t * b, *rest), dtype=x.dtype, device=x.device)

    def finish() -> torch.Tensor:
        return buf.view(t, b, *rest).transpose(0, 1).reshape(b, t * rest[0], *rest[1:])

    return _issue("all_gather", phase, buf.numel() * buf.element_size(), group,
                  lambda: _all_gather_single(buf, x, group=group, async_op=True), finish, async_op)


def reduce_scatter_seq(x: torch.Tensor, group, phase: str, *, async_op: bool = False) -> Pending:
    """[b, s, ...] partial sums -> this rank's [b, s/t, ...] shard of their sum over the group."""
    t = group_size(group)
    if t == 1:
        return _done(x)
    b, s, more = x.shape[0], x.shape[1], x.shape[2:]
    _check_seq(s, t)
    chunks = x.reshape(b, t, s // t, *more).transpose(0, 1).reshape(t * b, s // t, *more)
    out = torch.empty((b, s // t, *more), dtype=x.dtype, device=x.device)
    return _issue("reduce_scatter", phase, chunks.numel() * chunks.element_size(), group,
                  lambda: _reduce_scatter_single(out, chunks, group=group, async_op=True), lambda: out, async_op)


def all_gather_last(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    """[..., n/t] shards -> [..., n], rank r's shard at columns r*n/t ... (r+1)*n/t - 1."""
    t = group_size(group)
    if t == 1:
        return x
    x = x.contiguous()
    buf = torch.empty((t * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)

    def finish() -> torch.Tensor:
        return buf.view(t, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], t * x.shape[-1])

    return _issue("all_gather", phase, buf.numel() * buf.element_size(), group,
                  lambda: _all_gather_single(buf, x, group=group, async_op=True), finish, False).wait()


def split_last(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's [..., n/t] shard of a replicated [..., n] tensor (no communication)."""
    t = group_size(group)
    if t == 1:
        return x
    return x.chunk(t, dim=-1)[dist.get_rank(group)].contiguous()


def split_seq(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's sequence shard [b, s/t, ...] of a replicated [b, s, ...] tensor (no communication)."""
    t = group_size(group)
    if t == 1:
        return x
    _check_seq(x.shape[1], t)
    return x.chunk(t, dim=1)[dist.get_rank(group)].contiguous()
