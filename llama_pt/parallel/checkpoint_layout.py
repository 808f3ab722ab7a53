"""How a rank's tensors enter a torch.distributed.checkpoint: full parameter names, TP shards as DTensors,
ZeRO partitions as fragments.

A DCP checkpoint records for each key the GLOBAL shape and which chunk of it every rank wrote;
loading into another layout reads the chunks that overlap what the loading rank holds. So the tree
handed to DCP is keyed by the full parameter name (``layers.0.attention.wq.weight``; optimizer
moments under the same name), and a tensor that is this rank's TP shard of a parameter is wrapped
as a DTensor that says which chunk it is. The mesh is this rank's pipeline stage in Megatron's order,
``rank = pp_rank * d * t + dp_rank * t + tp_rank`` with ``tp_rank = outer * r + inner`` (r = kv replicas, 1
unless n_kv_heads < t), of shape (dp, t / r, r), sliced from the world's (pp, dp, t / r, r). A pipeline
stage holds the parameters of its layers under their full names (``layers.5.…``: llama_pt.parallel.pipeline),
so a checkpoint is keyed by global layer index whatever the split, and loads at any other number of stages:

    shard of t chunks along dim d   (ShardSpec(d, t, i))        (Replicate(), Shard(d), Shard(d))  -> chunk tp_rank
    replicated kv shard, t/r chunks (ShardSpec(0, t/r, i))      (Replicate(), Shard(0), Replicate()) -> chunk tp_rank // r

Shard on two mesh dimensions splits the dimension by the first, then each piece by the second
(DTensor's nested sharding), hence chunk outer * r + inner = tp_rank. Replicas over DP are one chunk,
and DCP's planner writes it once. Replicated parameters (norm weights) and scalars (the Adam step)
stay plain tensors, equal on every rank; DCP writes those once too. `wrap` shares storage with the
tensors it wraps (DTensor.from_local), so DCP loads in place into them.

An engine that partitions its state over DP (zero.ZeroDataParallel) hands over, instead of whole TP
shards, the range of each flattened TP shard that its partition holds (a `FlatFragment`). Such a
range becomes a `FragmentTensor` (fragment_tensor.py): up to three rectangles of the TP shard, placed
at the shard's offset in the global tensor (ShardSpec(d, c, i) of local size n along d: offset i * n
along d). DP ranks hold disjoint ranges that together cover the shard. TP ranks holding the same
values (replicated parameters: all t; a replicated kv shard: its r ranks) have the same ranges, so
only the first of them (tp_rank % holders == 0) writes: every element is saved exactly once. On
load every rank reads its own ranges, replicas included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .fragment_tensor import FlatFragment, FragmentTensor
from .state import ParallelState


@dataclass
class EngineCheckpoint:
    """`tree`: what DCP saves from, or loads into in place, for a data-parallel engine; `loaded()`:
    brings the engine up to the values a load has just put into `tree`."""
    tree: dict[str, Any]
    loaded: Callable[[], None]


class CheckpointLayout:
    def __init__(self, pstate: ParallelState, device: torch.device):
        self.pstate = pstate
        self.mesh = None
        if dist.is_available() and dist.is_initialized() and pstate.tp_size > 1:
            from torch.distributed.device_mesh import init_device_mesh
            t, r = pstate.tp_size, pstate.kv_replicas
            mesh = init_device_mesh(device.type, (pstate.pp_size, pstate.dp_size, t // r, r),
                                    mesh_dim_names=("pp", "dp", "tp_outer", "tp_inner"))
            self.mesh = mesh["dp", "tp_outer", "tp_inner"]  # this rank's stage: its parameters live there only

    def _placements(self, spec) -> tuple:
        from torch.distributed.tensor import Replicate, Shard
        if spec.chunks == self.pstate.tp_size:
            return Replicate(), Shard(spec.dim), Shard(spec.dim)
        return Replicate(), Shard(spec.dim), Replicate()  # kv head replicated on r consecutive TP ranks

    def _shard_geometry(self, param: torch.nn.Parameter) -> tuple[list[int], list[int]]:
        """(global shape, offsets of this rank's TP shard in it) of `param`."""
        shape, offsets = list(param.shape), [0] * param.ndim
        spec = getattr(param, "tp_shard", None)
        if spec is not None:
            offsets[spec.dim] = spec.index * shape[spec.dim]
            shape[spec.dim] *= spec.chunks
        return shape, offsets

    def _writes_shard(self, param: torch.nn.Parameter) -> bool:
        """Whether this rank saves its copy of `param`'s TP shard: the first of the TP ranks holding it."""
        spec = getattr(param, "tp_shard", None)
        holders = self.pstate.tp_size // spec.chunks if spec is not None else self.pstate.tp_size
        return self.pstate.tp_rank % holders == 0

    def wrap_tensor(self, tensor: Any, param: Optional[torch.nn.Parameter]) -> Any:
        if isinstance(tensor, FlatFragment):
            size, offsets = self._shard_geometry(param)
            return FragmentTensor.from_flat(tensor, param.shape, size, offsets, writes=self._writes_shard(param))
        spec = getattr(param, "tp_shard", None)
        if self.mesh is None or spec is None or tensor.ndim == 0:
            return tensor
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(tensor, self.mesh, self._placements(spec), run_check=False)

    def wrap(self, tree: dict[str, Any], params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
        """{"model": {name: t}, "optim": {name: {key: t}}} with each TP shard as a DTensor, each
        FlatFragment as a FragmentTensor (others as they are)."""
        return {"model": {n: self.wrap_tensor(t, params.get(n)) for n, t in tree["model"].items()},
                "optim": {n: {k: self.wrap_tensor(t, params.get(n)) for k, t in state.items()}
                          for n, state in tree["optim"].items()}}

    def engine_checkpoint(self, engine: Any, params: dict[str, torch.nn.Parameter]) -> EngineCheckpoint:
        """The checkpoint tree of a data-parallel engine: its ZeRO partition's fragments when it has a
        partition (``partition_fragments`` / ``load_partition_fragments``, zero.py: no communication
        to save), else its whole TP shards (``state_tensors`` / ``load_state_tensors``)."""
        if hasattr(engine, "partition_fragments"):
            tensors = engine.partition_fragments()
            return EngineCheckpoint(self.wrap(tensors, params), lambda: engine.load_partition_fragments(tensors))
        tensors = engine.state_tensors()
        return EngineCheckpoint(self.wrap(tensors, params), lambda: engine.load_state_tensors(tensors))
