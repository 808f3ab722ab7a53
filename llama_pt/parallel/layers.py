"""Tensor-parallel layers holding slices of the full model's weights (Shoeybi et al. 2019, Sec. 3).

- ColumnParallelLinear: Y_r = X A_r for the rank's rows of A (output features). Its input is replicated
  (plain TP) or sequence-sharded (SP, Korthikanti et al. 2022, Sec. 4.2.2: gathered before the matmul).
- RowParallelLinear: Y = sum_r X_r B_r: the partial products are all-reduced (plain TP) or
  reduce-scattered to sequence shards (SP).
- VocabParallelEmbedding: each rank looks up the tokens of its vocabulary range, zero elsewhere; the
  partial embeddings are all-reduced (plain TP) or reduce-scattered (SP).

Several column-parallel linears that read the same input (q/k/v, w1/w3) go through ONE
`column_parallel` call, so the input's collective happens once for all of them. With overlap on, that
call is a fused autograd function whose backward hides the collectives behind the matmuls:

  SP:    issue all-gather(x shard) | dgrad = sum_i dY_i W_i | wait; issue reduce-scatter(dgrad) | dW_i = dY_i^T X | wait
  no SP: dgrad = sum_i dY_i W_i | issue all-reduce(dgrad) | dW_i = dY_i^T X | wait

Under SP only the sequence shard of x is saved and the full input is gathered again in backward
(Korthikanti et al. 2022, Sec. 4.2.2: "store only the sequence-parallel input"), which costs one
more all-gather per linear group but 1/t of the activation memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm, timeline
from .comm import BWD, FWD
from .mappings import copy_to_tp, gather_from_seq, reduce_from_tp, reduce_scatter_to_seq, split_to_seq


@dataclass(frozen=True)
class ShardSpec:
    """A parameter is chunk `index` of its full tensor cut into `chunks` equal pieces along `dim`.

    chunks < tp size means replication: consecutive TP ranks hold the same chunk (kv heads when
    n_kv_heads < t).
    """
    dim: int
    chunks: int
    index: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        if full.shape[self.dim] % self.chunks:
            raise ValueError(f"dimension {self.dim} of size {full.shape[self.dim]} does not split into "
                             f"{self.chunks} shards")
        return full.chunk(self.chunks, dim=self.dim)[self.index]


def shard_parameter(full: torch.Tensor, spec: ShardSpec) -> nn.Parameter:
    """A new parameter holding a copy of `spec`'s slice of `full`; the spec is kept as `.tp_shard`."""
    param = nn.Parameter(spec.take(full.detach()).clone(), requires_grad=full.requires_grad)
    param.tp_shard = spec
    return param


@dataclass(frozen=True)
class TPContext:
    group: Optional[object]  # torch.distributed.ProcessGroup of the TP ranks
    sequence_parallel: bool
    overlap: bool


class ColumnParallelLinear(nn.Module):
    """Output features split across TP ranks; the output stays split (no gather).

    `adapter`: an optional low-rank update (llama_pt.adapters: `down(x)` to rank r, `up(u)` back) added to
    the output; it reads the full input (gathered under SP) and its `up` holds this rank's output rows.
    """

    def __init__(self, weight: nn.Parameter, tp: TPContext):
        super().__init__()
        self.weight, self.tp = weight, tp
        self.adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel(x, (self,))[0]

    def extra_repr(self) -> str:
        return f"local_out={self.weight.shape[0]}, in={self.weight.shape[1]}, shard={self.weight.tp_shard}"


class RowParallelLinear(nn.Module):
    """Input features split across TP ranks; partial outputs summed (or reduce-scattered under SP).

    `adapter`: an optional low-rank update whose `down` holds this rank's input columns: its rank-r
    partial products are summed over TP, `up` (replicated) maps them back, and under SP the result is
    cut to this rank's sequence shard before it is added.
    """

    def __init__(self, weight: nn.Parameter, tp: TPContext):
        super().__init__()
        self.weight, self.tp = weight, tp
        self.adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.tp.sequence_parallel:
            y = reduce_scatter_to_seq(partial, self.tp.group)
        else:
            y = reduce_from_tp(partial, self.tp.group)
        if self.adapter is not None:
            update = self.adapter.up(reduce_from_tp(self.adapter.down(x), self.tp.group))
            y = y + (split_to_seq(update, self.tp.group) if self.tp.sequence_parallel else update)
        return y

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}, local_in={self.weight.shape[1]}, shard={self.weight.tp_shard}"


class VocabParallelEmbedding(nn.Module):
    """Rows vocab_start ... vocab_start + local_vocab - 1 of the embedding table on this rank."""

    def __init__(self, weight: nn.Parameter, tp: TPContext):
        super().__init__()
        self.weight, self.tp = weight, tp
        self.vocab_start = weight.tp_shard.index * weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        partial = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_seq(partial, self.tp.group)
        return reduce_from_tp(partial, self.tp.group)

    def extra_repr(self) -> str:
        return f"vocab_start={self.vocab_start}, local_vocab={self.weight.shape[0]}, dim={self.weight.shape[1]}"


def column_parallel(x: torch.Tensor, linears: Sequence[ColumnParallelLinear]) -> tuple[torch.Tensor, ...]:
    """Apply column-parallel linears that share the input x, with one collective for all of them (and one
    more for their adapters, if any)."""
    if torch.is_autocast_enabled(x.device.type):
        # The matmuls would cast x anyway; casting first moves half the bytes (bf16) through the collective.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    outputs = _column_parallel_base(x, linears)
    adapted = [i for i, lin in enumerate(linears) if lin.adapter is not None]
    if not adapted:
        return outputs
    tp = linears[0].tp
    full = gather_from_seq(x, tp.group) if tp.sequence_parallel else copy_to_tp(x, tp.group)
    outputs = list(outputs)
    for i in adapted:
        adapter = linears[i].adapter
        outputs[i] = outputs[i] + adapter.up(adapter.down(full))
    return tuple(outputs)


def _column_parallel_base(x: torch.Tensor, linears: Sequence[ColumnParallelLinear]) -> tuple[torch.Tensor, ...]:
    tp = linears[0].tp
    weights = [lin.weight for lin in linears]
    if tp.overlap and comm.group_size(tp.group) > 1:
        return _OverlappedColumnParallel.apply(x, tp.group, tp.sequence_parallel, *weights)
    x = gather_from_seq(x, tp.group) if tp.sequence_parallel else copy_to_tp(x, tp.group)
    return tuple(F.linear(x, w) for w in weights)


class _OverlappedColumnParallel(torch.autograd.Function):
    """Y_i = X W_i^T; backward overlaps the input's collectives with the dgrad and wgrad matmuls."""

    @staticmethod
    def forward(ctx, x, group, sequence_parallel, *weights):
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        full = comm.all_gather_seq(x, group, FWD).wait() if sequence_parallel else x
        ctx.save_for_backward(x, *weights)  # under SP: the shard only; re-gathered in backward
        return tuple(F.linear(full, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        gather = comm.all_gather_seq(x, group, BWD, async_op=True) if sp else comm.Pending(None, lambda: x, "noop")
        # Under autocast the forward ran in the autocast dtype (that of the output gradients).
        grad_in, grad_weights = column_parallel_backward(list(grads), weights, gather, group, sp, True,
                                                         grads[0].dtype, ctx.needs_input_grad[3:])
        return (grad_in, None, None, *grad_weights)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def column_parallel_backward(grads: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], gather: comm.Pending,
                             group, sequence_parallel: bool, overlap: bool, dtype: torch.dtype,
                             needs: Sequence[bool], masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                             ) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """The backward of column-parallel linears Y_i = X W_i^T that share the input X, in the order that
    hides the input's collectives (the one home of this pattern; the hand-written layer uses it too):

      dgrad = sum_i dY_i W_i   while `gather` (the full input, all-gathered under SP) is in flight;
      issue reduce-scatter(dgrad) [SP] or all-reduce(dgrad) [TP], asynchronous with `overlap`;
      dW_i = dY_i^T X          while that reduction is in flight (for the weights in `needs`).

    `grads` are [b, s, out_i] in `dtype`, the matmul dtype; returns this rank's part of dX (a sequence
    shard under SP) and the weight gradients in the weights' dtypes (None where not needed).
    `masks[i]`, where given ([b, s, in] in `dtype`), makes linear i read X * M_i instead of X (dropout on
    the input of a low-rank adapter): its dgrad term is (dY_i W_i) * M_i and dW_i = dY_i^T (X * M_i)."""
    masks = masks or [None] * len(weights)
    with timeline.span("dgrad"):
        grad_in = _masked(torch.matmul(grads[0], weights[0].to(dtype)), masks[0])
        for g, w, m in zip(grads[1:], weights[1:], masks[1:]):
            grad_in.add_(_masked(torch.matmul(g, w.to(dtype)), m))
    full = _flat(gather.wait()).to(dtype)
    reduce = (comm.reduce_scatter_seq(grad_in, group, BWD, async_op=overlap) if sequence_parallel
              else comm.all_reduce(grad_in, group, BWD, async_op=overlap))
    grad_weights: list[Optional[torch.Tensor]] = []
    with timeline.span("wgrad"):
        for g, w, need, m in zip(grads, weights, needs, masks):
            grad_weights.append(torch.matmul(_flat(g).t(), full if m is None else full * _flat(m)).to(w.dtype)
                                if need else None)
    return reduce.wait(), grad_weights


def _masked(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return t if mask is None else t.mul_(mask)
