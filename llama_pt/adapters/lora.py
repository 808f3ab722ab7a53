"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Sec. 4.1): a frozen linear
layer W plus a trainable low-rank update, h = W x + (alpha / r) B A dropout(x), A [r, in], B [out, r].

Applied from outside, by a module plan (llama_pt.model.module_plan) that names the projections to adapt
(`layers.*.attention.wq`, ...), after tensor parallelism has sharded the model:

  plain nn.Linear          -> AdaptedLinear: the same weight, plus `adapter`
  ColumnParallelLinear     -> its `adapter` set: A replicated (its gradient summed over TP, as each rank's
                              output rows give part of it), B sharded like the weight's rows (kv heads
                              replicated over r ranks: B's gradient summed over those, as the weight's is)
  RowParallelLinear        -> its `adapter` set: A sharded like the weight's columns, B replicated

The parallel layers compute the update (llama_pt.parallel.layers); the hand-written block of activation
mode `selective` reads `adapter_of(linear)` and computes it in its own forward and backward.

Dropout (on the update's input only, as peft) draws what F.dropout draws (`dropout_noise`); for a row-parallel
A the noise is drawn for the full input width and cut to the rank's columns, so a TP run with the same random
state drops exactly what one process drops.

Initialisation as the paper (and peft): A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts from W.
Each A is drawn in full (the unsharded layer's shape) on the CPU from a generator of its own, seeded like the
model's weights from an adapter seed and its full name (`layers.3.attention.wq.adapter.lora_A`,
llama_pt.model.llama.parameter_seed), so a process that holds only some layers (a pipeline stage) or a
shard of them starts from exactly the adapters one process would; the adapter seed is drawn once from the
global random state when the plan is made (`lora_transform`).
`merge` folds W + (alpha/r) B A into the weight (this rank's shard of it) and keeps the original to
restore bitwise on `unmerge`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PeftConfig
from ..config.sections import PEFT_TARGETS
from ..model.llama import draw_seed, parameter_seed
from ..parallel import ColumnParallelLinear, ParallelState, RowParallelLinear, ShardSpec
from ..parallel import comm
from ..parallel.comm import BWD
from .nf4 import NF4Linear

# Each adaptable projection (llama_pt.config.PEFT_TARGETS) and the module of a layer that holds it.
PROJECTIONS = {name: ("attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward") for name in PEFT_TARGETS}


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float = 0.0

    @classmethod
    def of(cls, peft: PeftConfig) -> "LoRASettings":
        return cls(peft.rank, float(peft.alpha), float(peft.dropout))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LowRankUpdate(nn.Module):
    """The update (alpha / r) B A dropout(x) in two halves: `down(x)` = A dropout(x) [.., r], and
    `up(u)` = (alpha / r) B u [.., out]. Parameter names follow peft (`lora_A`, `lora_B`)."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter, settings: LoRASettings):
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B
        self.settings = settings

    @property
    def scale(self) -> float:
        return self.settings.scale

    @property
    def active_dropout(self) -> float:
        """The dropout probability this forward applies: the settings' in training, 0 in evaluation."""
        return self.settings.dropout if self.training else 0.0

    def noise(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The dropout multiplier for the input x of `down` (None without dropout): see dropout_noise; a
        row-parallel A (sharded by columns) draws it for the full input width."""
        p = self.active_dropout
        return None if p == 0 else dropout_noise(x, p, getattr(self.lora_A, "tp_shard", None))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.noise(x)
        if noise is not None:
            x = x * noise
        return F.linear(x, self.lora_A.to(x.dtype))

    def up(self, u: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(u, self.lora_B.to(u.dtype))

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A: what `merge` adds to the weight (this rank's shard), in at least float32."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        s = self.settings
        return f"rank={s.rank}, alpha={s.alpha}, dropout={s.dropout}, A={list(self.lora_A.shape)}, B={list(self.lora_B.shape)}"


def dropout_noise(x: torch.Tensor, p: float, columns: Optional[ShardSpec] = None) -> torch.Tensor:
    """The multiplier of dropout with probability p on x: Bernoulli(1 - p) / (1 - p), drawn as F.dropout
    draws it, so that `x * dropout_noise(x, p)` is F.dropout(x, p) for the same random state.

    `columns`: x holds these columns of the full input (the input of a row-parallel layer); the noise is
    drawn for the full width and this rank's columns kept. Every TP rank then draws the numbers one process
    draws (the ranks share the random state), and each column gets its own draw (drawing only the local
    width would give every rank the same pattern for different columns)."""
    if columns is None:
        return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    full = torch.empty((*x.shape[:-1], x.shape[-1] * columns.chunks), dtype=x.dtype, device=x.device)
    return full.bernoulli_(1 - p).div_(1 - p).chunk(columns.chunks, dim=-1)[columns.index].contiguous()


class AdaptedLinear(nn.Linear):
    """nn.Linear (no bias) with a low-rank update; the weight is the original layer's Parameter."""

    def __init__(self, linear: nn.Linear, adapter: LowRankUpdate):
        if linear.bias is not None:
            raise TypeError("AdaptedLinear: the layer has a bias, which LoRA here does not carry over")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = None
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y if self.adapter is None else y + self.adapter.up(self.adapter.down(x))


def adapter_of(linear: nn.Module) -> Optional[LowRankUpdate]:
    """The low-rank update attached to a projection (None for a layer that has none, or a merged one)."""
    if isinstance(linear, (AdaptedLinear, ColumnParallelLinear, RowParallelLinear, NF4Linear)):
        return linear.adapter
    return None


def _sum_grad_over(param: nn.Parameter, group) -> None:
    """Gradient summed over `group` during backward (the parameter sees only part of the data on each rank)."""
    if comm.group_size(group) > 1:
        param.register_hook(lambda g: comm.all_reduce(g.clone(memory_format=torch.contiguous_format),
                                                      group, BWD).wait())


def _init_pair(out_features: int, in_features: int, rank: int, like: torch.Tensor, seed: int,
               path: str) -> tuple[nn.Parameter, nn.Parameter]:
    """A (kaiming-uniform, from its own generator: seed and its full name) and B (zeros) of the projection at
    `path`, in the unsharded shapes, on like's device."""
    generator = torch.Generator().manual_seed(parameter_seed(seed, f"{path}.adapter.lora_A"))
    a = torch.empty(rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    b = torch.zeros(out_features, rank, dtype=torch.float32, device=like.device)
    return nn.Parameter(a.to(like.device)), nn.Parameter(b)


def lora_transform(settings: LoRASettings, pstate: Optional[ParallelState] = None, seed: Optional[int] = None):
    """The module-plan transform that adds LoRA to one projection (plain, column- or row-parallel).

    A and B are created in full (the shapes of the unsharded layer), A from the adapter seed `seed` (None:
    drawn now from the global random state, one draw) and the projection's path, then this rank keeps its
    shard, so every layout starts from the same adapter as one process would."""
    seed = draw_seed() if seed is None else seed

    def adapt(path: str, linear: nn.Module) -> nn.Module:
        if isinstance(linear, ColumnParallelLinear):
            spec: ShardSpec = linear.weight.tp_shard
            full_out = linear.weight.shape[0] * spec.chunks
            a, b = _init_pair(full_out, linear.weight.shape[1], settings.rank, linear.weight, seed, path)
            b = nn.Parameter(spec.take(b.detach()).clone())
            b.tp_shard = spec
            b.tensor_model_parallel = getattr(linear.weight, "tensor_model_parallel", True)
            if getattr(linear.weight, "kv_replicated", False):
                if pstate is None:
                    raise ValueError(f"LoRA: {path} holds replicated kv heads; lora_transform needs the "
                                     f"ParallelState (its kv-replica group sums B's gradient)")
                b.kv_replicated = True
                _sum_grad_over(b, pstate.kv_replica_group)
            # A is replicated and not marked tensor_model_parallel: counted once in the global norm.
            _sum_grad_over(a, linear.tp.group)
            linear.adapter = LowRankUpdate(a, b, settings)
            return linear
        if isinstance(linear, RowParallelLinear):
            spec = linear.weight.tp_shard
            a, b = _init_pair(linear.weight.shape[0], linear.weight.shape[1] * spec.chunks, settings.rank,
                              linear.weight, seed, path)
            a = nn.Parameter(spec.take(a.detach()).clone())
            a.tp_shard = spec
            a.tensor_model_parallel = True
            linear.adapter = LowRankUpdate(a, b, settings)
            return linear
        if isinstance(linear, nn.Linear):
            a, b = _init_pair(linear.out_features, linear.in_features, settings.rank, linear.weight, seed, path)
            return AdaptedLinear(linear, LowRankUpdate(a, b, settings))
        if isinstance(linear, NF4Linear):
            a, b = _init_pair(linear.out_features, linear.in_features, settings.rank, linear.packed, seed, path)
            linear.adapter = LowRankUpdate(a, b, settings)
            return linear
        raise TypeError(f"LoRA: {path} is a {type(linear).__name__}, not a linear layer")
    return adapt


def lora_plan(targets: list[str], settings: LoRASettings, pstate: Optional[ParallelState] = None):
    """Module-plan entries adapting `targets` (names among PROJECTIONS) in every layer."""
    transform = lora_transform(settings, pstate)
    return [(f"layers.*.{PROJECTIONS[name]}.{name}", transform) for name in targets]


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every adapter's (alpha / r) B A into its weight and set the adapter aside (the layer then runs
    as a plain one); the original weights are kept for `unmerge`."""
    for module in model.modules():
        adapter = adapter_of(module)
        if adapter is None:
            continue
        module._unmerged = (module.weight.detach().clone(), adapter)
        module.weight.add_(adapter.delta_weight().to(module.weight.dtype))
        module.adapter = None


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Restore the weights `merge` changed, bitwise, and put the adapters back."""
    for module in model.modules():
        if hasattr(module, "_unmerged"):
            weight, adapter = module._unmerged
            module.weight.copy_(weight)
            module.adapter = adapter.train(module.training)  # the model may have changed mode meanwhile
            del module._unmerged
