"""Tensor (and sequence) parallelism applied to a plain `Llama` from outside, by one declared plan.

`tensor_parallel_plan` says, for each module path, what takes the place of the module found there
(llama_pt.model.module_plan); `parallelize` applies it. Each new module holds a SLICE of the existing full
weight, so a model initialised identically on every rank and then parallelized computes exactly what the
single-process model computes (docs/parallelism.md):

  tok_embeddings.weight [V, d]      rows (padded vocabulary)   VocabParallelEmbedding
  wq / w1 / w3 / output [out, d]    rows (heads / hidden / V)  ColumnParallelLinear
  wk / wv [kv*hd, d]                rows, whole kv heads; replicated when n_kv_heads < t
  wo / w2 [d, in]                   columns                    RowParallelLinear
  attention, feed_forward           the same, with q/k/v (w1/w3) sharing ONE input collective
  RMSNorm weights                   replicated (on sequence shards under SP)

Gradients of replicated parameters that see only part of the data are summed by hooks on the
parameters DURING backward (so DeepSpeed's gradient hooks, which run as soon as a gradient is
accumulated, already see the full gradient; nothing needs calling after backward):
  - SP norm weights (`param.sequence_parallel = True`): each rank saw its sequence shard -> all-reduce over TP
    (Korthikanti et al. 2022, Sec. 4.2.2);
  - replicated k/v projections (`param.kv_replicated = True`): each replica saw its query heads -> all-reduce
    over the kv-replica group.
`param.tensor_model_parallel = True` marks parameters whose values differ across TP ranks (DeepSpeed's
gradient-norm convention, deepspeed/runtime/utils.py: `is_model_parallel_parameter`); a replicated kv
shard is marked on the first rank of its replica group only, so the global norm counts it once.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ConfigError
from ..model.llama import Attention, FeedForward, Llama
from ..model.module_plan import Transform, apply_module_plan
from . import comm
from .comm import BWD
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, ShardSpec, TPContext, VocabParallelEmbedding,
                     column_parallel, shard_parameter)
from .mappings import gather_from_tp
from .state import ParallelState


class TensorParallelAttention(Attention):
    """Attention over the rank's heads; q/k/v share one input collective."""

    def project_qkv(self, x):
        return column_parallel(x, (self.wq, self.wk, self.wv))


class TensorParallelFeedForward(FeedForward):
    """SwiGLU over the rank's hidden units; w1/w3 share one input collective."""

    def project_in(self, x):
        return column_parallel(x, (self.w1, self.w3))


def _sum_grad_over(param: torch.nn.Parameter, group) -> None:
    """Make param's gradient the sum over `group` (identity forward, all-reduce backward: copy_to_tp on a weight)."""
    if comm.group_size(group) > 1:
        param.register_hook(lambda g: comm.all_reduce(g.clone(memory_format=torch.contiguous_format),
                                                      group, BWD).wait())


@dataclass(frozen=True)
class Sharding:
    """What every style needs: the rank's TP layout and communication settings."""
    pstate: ParallelState
    tp: TPContext

    @property
    def rows(self) -> ShardSpec:
        return ShardSpec(0, self.pstate.tp_size, self.pstate.tp_rank)

    @property
    def cols(self) -> ShardSpec:
        return ShardSpec(1, self.pstate.tp_size, self.pstate.tp_rank)

    @property
    def kv_rows(self) -> ShardSpec:
        """Whole kv heads; with fewer kv heads than TP ranks each is held by `kv_replicas` consecutive ranks."""
        r = self.pstate.kv_replicas
        return ShardSpec(0, self.pstate.tp_size // r, self.pstate.tp_rank // r)


# ---- the styles: transforms of one module, given the sharding ----

def column_parallel_style(s: Sharding, kv_heads: bool = False) -> Transform:
    def shard(path: str, linear: nn.Module) -> ColumnParallelLinear:
        weight = shard_parameter(linear.weight, s.kv_rows if kv_heads else s.rows)
        if kv_heads and s.pstate.kv_replicas > 1:
            weight.kv_replicated = True
            weight.tensor_model_parallel = s.pstate.tp_rank % s.pstate.kv_replicas == 0
            _sum_grad_over(weight, s.pstate.kv_replica_group)
        else:
            weight.tensor_model_parallel = True
        return ColumnParallelLinear(weight, s.tp)
    return shard


def row_parallel_style(s: Sharding) -> Transform:
    def shard(path: str, linear: nn.Module) -> RowParallelLinear:
        weight = shard_parameter(linear.weight, s.cols)
        weight.tensor_model_parallel = True
        return RowParallelLinear(weight, s.tp)
    return shard


def vocab_parallel_style(s: Sharding) -> Transform:
    def shard(path: str, embedding: nn.Module) -> VocabParallelEmbedding:
        weight = shard_parameter(embedding.weight, s.rows)
        weight.tensor_model_parallel = True
        return VocabParallelEmbedding(weight, s.tp)
    return shard


def shared_input_attention(path: str, attn: Attention) -> TensorParallelAttention:
    return TensorParallelAttention(attn.wq, attn.wk, attn.wv, attn.wo, attn.head_dim, attn.backend)


def shared_input_feed_forward(path: str, ffn: FeedForward) -> TensorParallelFeedForward:
    return TensorParallelFeedForward(ffn.w1, ffn.w2, ffn.w3)


def sequence_parallel_norm_style(s: Sharding) -> Transform:
    def mark(path: str, norm: nn.Module) -> nn.Module:
        norm.weight.sequence_parallel = True
        _sum_grad_over(norm.weight, s.pstate.tp_group)
        return norm
    return mark


def tensor_parallel_plan(s: Sharding) -> list[tuple[str, Transform]]:
    """The declared plan: which module path gets which style (the table in this module's docstring)."""
    plan = [
        ("tok_embeddings", vocab_parallel_style(s)),
        ("layers.*.attention.wq", column_parallel_style(s)),
        ("layers.*.attention.wk", column_parallel_style(s, kv_heads=True)),
        ("layers.*.attention.wv", column_parallel_style(s, kv_heads=True)),
        ("layers.*.attention.wo", row_parallel_style(s)),
        ("layers.*.attention", shared_input_attention),
        ("layers.*.feed_forward.w1", column_parallel_style(s)),
        ("layers.*.feed_forward.w3", column_parallel_style(s)),
        ("layers.*.feed_forward.w2", row_parallel_style(s)),
        ("layers.*.feed_forward", shared_input_feed_forward),
        ("output", column_parallel_style(s)),
    ]
    if s.tp.sequence_parallel:
        plan.append(("*norm", sequence_parallel_norm_style(s)))
    return plan


def tp_context(pstate: ParallelState, sequence_parallel: Optional[bool] = None,
               overlap: Optional[bool] = None) -> Optional[TPContext]:
    """The TP group and communication settings layers use (pstate.config's unless given); None at TP=1."""
    if pstate.tp_size == 1:
        return None
    cfg = pstate.config
    return TPContext(pstate.tp_group, cfg.sequence_parallel if sequence_parallel is None else sequence_parallel,
                     cfg.overlap if overlap is None else overlap)


def parallelize(model: Llama, pstate: ParallelState, *, sequence_parallel: Optional[bool] = None,
                overlap: Optional[bool] = None, within: Optional[str] = None) -> Llama:
    """Shard `model` over pstate's TP group in place by `tensor_parallel_plan` and return it (unchanged
    when the TP size is 1). `sequence_parallel` and `overlap` default to pstate.config's values.

    `within`: shard only the part at this path ("tok_embeddings", "layers.5", "norm", "output"), the others
    left as they are: a model materialized part by part (llama_pt.train.model_setup) is sharded as each part
    gets its full weights, so that no more than one full part exists at a time. `model` may then be a
    pipeline stage (the same names, only its parts)."""
    if model.cfg != pstate.model_config:
        raise ConfigError("parallelize: the model's config differs from the one ParallelState was made for")
    tp = tp_context(pstate, sequence_parallel, overlap)
    if tp is None:
        return model
    if within is None and isinstance(model.tok_embeddings, VocabParallelEmbedding):
        raise ValueError("parallelize: the model is already parallelized")
    return apply_module_plan(model, tensor_parallel_plan(Sharding(pstate, tp)), within=within)


def make_loss_fn(pstate: ParallelState) -> Callable[..., torch.Tensor]:
    """loss_fn(logits_local, targets, scored=None, normalizer=None) -> mean token cross-entropy over the real
    vocabulary (the padding ids masked), without gathering the logits; with a loss mask `scored`, the sum over
    the scored tokens divided by `normalizer` (.cross_entropy)."""
    return functools.partial(vocab_parallel_cross_entropy, group=pstate.tp_group,
                             vocab_size=pstate.model_config.vocab_size)


def gather_logits(logits_local: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """Full-vocabulary logits [..., V] from the local [..., V/t] (evaluation, sampling; differentiable)."""
    return gather_from_tp(logits_local, pstate.tp_group)


class FullLogits(torch.nn.Module):
    """A tensor-parallel model seen as one returning full-vocabulary logits (evaluation); run on all TP ranks.
    `cfg` is the model's config, as a plain Llama has it."""

    def __init__(self, model: torch.nn.Module, pstate: ParallelState):
        super().__init__()
        self.model, self.pstate = model, pstate
        self.cfg = pstate.model_config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.model(tokens), self.pstate)


def _unshard(tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter],
             pstate: ParallelState) -> dict[str, torch.Tensor]:
    """All-gather each sharded tensor over the TP group and reassemble it (replicated chunks taken once)."""
    out = {}
    for name, value in tensors.items():
        spec = getattr(params.get(name), "tp_shard", None)
        if spec is None or pstate.tp_size == 1:
            out[name] = value.detach().clone()
            continue
        pieces = [torch.empty_like(value) for _ in range(pstate.tp_size)]
        dist.all_gather(pieces, value.detach().contiguous(), group=pstate.tp_group)
        owners = [c * pstate.tp_size // spec.chunks for c in range(spec.chunks)]
        out[name] = torch.cat([pieces[o] for o in owners], dim=spec.dim)
    return out


def full_state_dict(model: torch.nn.Module, pstate: ParallelState) -> dict[str, torch.Tensor]:
    """The unsharded state dict (keys and shapes of the plain model), on every rank of the TP group."""
    return _unshard(model.state_dict(), dict(model.named_parameters()), pstate)


def full_gradients(model: torch.nn.Module, pstate: ParallelState) -> dict[str, torch.Tensor]:
    """The unsharded gradients {parameter name: grad} (for checks against one process, and debugging)."""
    params = dict(model.named_parameters())
    return _unshard({n: p.grad for n, p in params.items() if p.grad is not None}, params, pstate)


def gather_shards(tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                  pstate: ParallelState) -> dict[str, torch.Tensor]:
    """Full tensors from per-parameter tensors shaped like this rank's shards (e.g. an engine's gradients)."""
    return _unshard(tensors, dict(model.named_parameters()), pstate)


def load_full_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded state dict (e.g. from `full_state_dict` or a TP=1 checkpoint) into the shards."""
    params = dict(model.named_parameters())
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    if unexpected:
        raise ValueError(f"state dict key {unexpected[0]!r} is not in the model")
    for name, value in own.items():
        if name not in state_dict:
            raise ValueError(f"state dict lacks key {name!r}")
        full = state_dict[name]
        spec = getattr(params.get(name), "tp_shard", None)
        expected = list(value.shape)
        if spec is not None:
            expected[spec.dim] *= spec.chunks
        if list(full.shape) != expected:
            raise ValueError(f"state dict key {name!r} has shape {list(full.shape)}, expected {expected}")
        with torch.no_grad():
            value.copy_(full if spec is None else spec.take(full))
