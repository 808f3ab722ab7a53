"""Communication as autograd functions: each forward collective has its dual in backward.

Shoeybi et al. 2019 (Megatron-LM), Sec. 3, operators f and g; Korthikanti et al. 2022, Sec. 4.2.2,
operators g and g-bar for sequence parallelism:

  copy_to_tp             forward identity         backward all-reduce       (f: before a column-parallel layer)
  reduce_from_tp         forward all-reduce       backward identity         (g: after a row-parallel layer)
  gather_from_seq        forward all-gather(seq)  backward reduce-scatter   (g under SP: before column-parallel)
  reduce_scatter_to_seq  forward reduce-scatter   backward all-gather(seq)  (g-bar under SP: after row-parallel)
  gather_from_tp         forward all-gather(last) backward split            (full logits for evaluation)
  split_to_seq           forward split(seq)       backward all-gather(seq)  (a replicated output onto SP shards)

All are the identity when the group has one rank.
"""
from __future__ import annotations

import torch

from . import comm
from .comm import BWD, FWD


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad, ctx.group, BWD).wait(), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if x.is_contiguous():
            ctx.mark_dirty(x)  # summed in place: the partial sums are not needed afterwards
        else:
            x = x.contiguous()
        return comm.all_reduce(x, group, FWD).wait()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather_seq(x, group, FWD).wait()

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter_seq(grad, ctx.group, BWD).wait(), None


class _ReduceScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter_seq(x, group, FWD).wait()

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_seq(grad, ctx.group, BWD).wait(), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather_last(x, group, FWD)

    @staticmethod
    def backward(ctx, grad):
        return comm.split_last(grad, ctx.group), None


class _SplitToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_seq(grad, ctx.group, BWD).wait(), None


def _apply(fn, x: torch.Tensor, group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else fn.apply(x, group)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _apply(_ReduceFromTP, x, group)


def gather_from_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _apply(_GatherFromSeq, x, group)


def reduce_scatter_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _apply(_ReduceScatterToSeq, x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _apply(_GatherFromTP, x, group)


def split_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _apply(_SplitToSeq, x, group)
