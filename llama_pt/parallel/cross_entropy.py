"""Cross-entropy over vocabulary-parallel logits, never gathering the full logits (Shoeybi et al. 2019, Sec. 3).

Rank r holds logits z[:, r*V/t : (r+1)*V/t]. With m = max_v z_v (all-reduce MAX over the group),
    loss = log sum_v exp(z_v - m) - (z_target - m)
where the sum of exponentials and the target's shifted logit (found on exactly one rank, zero on
the others) are summed over the group in ONE all-reduce of [2, tokens]. The gradient needs no
communication: d loss / d z_v = softmax(z)_v - [v == target], each rank for its own columns.
Communication: 2 all-reduces of 3 * tokens floats in total, against V * tokens for gathering logits.

The padding ids of the vocabulary (llama_pt.model.vocab) are masked on each rank's slice before any of
this: they take no probability mass and get no gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model.vocab import mask_padded_vocab
from . import comm
from .comm import FWD


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group):
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
        ctx.save_for_backward(softmax, local, outside)
        ctx.used = False
        return (sums[0].log() - sums[1]).mean()

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("vocab_parallel_cross_entropy: backward runs once (the softmax is reused in place)")
        ctx.used = True
        softmax, local, outside = ctx.saved_tensors
        rows = torch.arange(local.shape[0], device=local.device)
        softmax.index_put_((rows, local), -(~outside).to(softmax.dtype), accumulate=True)
        return softmax.mul_(grad / local.shape[0]), None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, group,
                                 vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of [..., V/t] local logits (at least float32 math) against [...] global target ids,
    over the first `vocab_size` ids of the padded vocabulary V.

    Equals F.cross_entropy on the first vocab_size of the gathered logits; with a one-rank group it is
    F.cross_entropy on the masked logits.
    """
    logits = logits_local.reshape(-1, logits_local.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    rank = 0 if group is None else dist.get_rank(group)
    logits = mask_padded_vocab(logits, vocab_size, start=rank * logits.shape[-1])
    flat = targets.reshape(-1)
    if flat.shape[0] != logits.shape[0]:
        raise ValueError(f"targets have {flat.shape[0]} tokens but the logits have {logits.shape[0]}")
    if comm.group_size(group) == 1:
        return F.cross_entropy(logits, flat)
    return _VocabParallelCrossEntropy.apply(logits, flat, group)
