"""Cross-entropy over vocabulary-parallel logits, never gathering the full logits (Shoeybi et al. 2019, Sec. 3).

Rank r holds logits z[:, r*V/t : (r+1)*V/t]. With m = max_v z_v (all-reduce MAX over the group),
    loss = log sum_v exp(z_v - m) - (z_target - m)
where the sum of exponentials and the target's shifted logit (found on exactly one rank, zero on
the others) are summed over the group in ONE all-reduce of [2, tokens]. The gradient needs no
communication: d loss / d z_v = softmax(z)_v - [v == target], each rank for its own columns.
Communication: 2 all-reduces of 3 * tokens floats in total, against V * tokens for gathering logits.

The padding ids of the vocabulary (llama_pt.model.vocab) are masked on each rank's slice before any of
this: they take no probability mass and get no gradient.

A loss mask (`scored`, instruction tuning: only response tokens count) leaves the other tokens out of the
sum and out of the gradient (their rows of d loss / d z are exactly zero, whatever their targets), and
`normalizer` divides the sum of the scored tokens' losses instead of their count. The trainer passes the
scored tokens of the whole global batch over (data-parallel ranks x micro-batches), so that the engines'
average over micro-batches and ranks gives the mean over every scored token of the global batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model.vocab import mask_padded_vocab
from . import comm
from .comm import FWD

IGNORE = -100  # F.cross_entropy's ignore_index: a target that is not scored


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The mean over tokens; with `scored` [tokens] (bool), the sum over the scored ones / `normalizer`."""

    @staticmethod
    def forward(ctx, logits, targets, group, scored=None, normalizer=None):
        n_local = logits.shape[-1]
        local = targets - dist.get_rank(group) * n_local
        outside = (local < 0) | (local >= n_local)
        local = local.masked_fill(outside, 0)

        shift = logits.max(dim=-1).values
        comm.all_reduce(shift, group, FWD, op=dist.ReduceOp.MAX).wait()
        shifted = logits - shift[:, None]
        exp = shifted.exp()
        picked = shifted.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
        sums = torch.stack([exp.sum(dim=-1), picked])
        comm.all_reduce(sums, group, FWD).wait()
        softmax = exp.div_(sums[0][:, None])
        ctx.save_for_backward(softmax, local, outside, scored)
        ctx.used, ctx.normalizer = False, normalizer
        losses = sums[0].log() - sums[1]
        if scored is None:
            return losses.mean()
        return torch.where(scored, losses, torch.zeros_like(losses)).sum() / normalizer

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy: backward runs once (the softmax is reused in place)")
        ctx.used = True
        softmax, local, outside, scored = ctx.saved_tensors
        rows = torch.arange(local.shape[0], device=local.device)
        softmax.index_put_((rows, local), -(~outside).to(softmax.dtype), accumulate=True)
        if scored is None:
            return softmax.mul_(grad / local.shape[0]), None, None, None, None
        softmax.masked_fill_(~scored[:, None], 0.0)
        return softmax.mul_(grad / ctx.normalizer), None, None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, group, vocab_size: int,
                                 scored: Optional[torch.Tensor] = None,
                                 normalizer: Optional[float] = None) -> torch.Tensor:
    """Mean cross-entropy of [..., V/t] local logits (at least float32 math) against [...] global target ids,
    over the first `vocab_size` ids of the padded vocabulary V.

    Equals F.cross_entropy on the first vocab_size of the gathered logits; with a one-rank group it is
    F.cross_entropy on the masked logits. With `scored` (bool, shaped like targets): the sum of the scored
    tokens' losses divided by `normalizer` (default: their number); the others contribute nothing.
    """
    logits = logits_local.reshape(-1, logits_local.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    rank = 0 if group is None else dist.get_rank(group)
    logits = mask_padded_vocab(logits, vocab_size, start=rank * logits.shape[-1])
    flat = targets.reshape(-1)
    if flat.shape[0] != logits.shape[0]:
        raise ValueError(f"targets have {flat.shape[0]} tokens but the logits have {logits.shape[0]}")
    if scored is not None:
        scored = scored.reshape(-1)
        if normalizer is None:
            normalizer = max(int(scored.sum()), 1)
    if comm.group_size(group) == 1:
        if scored is None:
            return F.cross_entropy(logits, flat)
        return F.cross_entropy(logits, flat.masked_fill(~scored, IGNORE), ignore_index=IGNORE, reduction="sum") \
            / normalizer
    return _VocabParallelCrossEntropy.apply(logits, flat, group, scored, normalizer)
