"""Process groups for tensor (TP) and data (DP) parallelism; DeepSpeed's `mpu`.

Layout (Megatron's convention, Shoeybi et al. 2019, Sec. 3): the world of W ranks is cut into W/t
tensor-parallel groups of t CONSECUTIVE ranks (they exchange activations every layer, so they should
share a node), and t data-parallel groups of the ranks with the same TP rank:

    W=4, t=2:  TP groups {0,1} {2,3}    DP groups {0,2} {1,3}

Grouped-query attention with fewer kv heads than TP ranks (n_kv_heads < t) replicates each kv head on
t/n_kv_heads consecutive TP ranks (the ranks whose query heads use it); those ranks form a
"kv-replica" group, which sums the gradients of the replicated k/v projection weights.

Without an initialised process group (one process) every group is None and every size is 1.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..config import COMM_BACKENDS, ConfigError, ModelConfig, ParallelConfig
from ..config.sections import check_choice


def resolve_comm_backend(name: str, device: torch.device) -> str:
    """parallel.backend on `device`: `auto` -> nccl on CUDA, gloo on CPU; an explicit choice must match."""
    check_choice(name, COMM_BACKENDS, "parallel.backend")
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(f"parallel.backend=nccl needs CUDA, but the device is {device.type}")
    return name


class ParallelState:
    """Owns the TP, DP and kv-replica process groups; passed to DeepSpeed as `mpu`."""

    def __init__(self, cfg: ParallelConfig, model: ModelConfig, seq_len: int, timeout: Optional[timedelta] = None):
        """`timeout`: the backend's own limit on a collective in the groups created here (torch's default
        when None; new groups do not inherit the default group's)."""
        self.timeout = timeout
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        if world % cfg.tensor_parallel:  # the layout was validated for another world (llama_pt.config.resolve)
            raise ValueError(f"parallel.tensor_parallel={cfg.tensor_parallel} does not divide this world of {world}")
        self.config, self.model_config, self.seq_len = cfg, model, seq_len
        self.world_size = world
        self.rank = dist.get_rank() if distributed else 0
        t = cfg.tensor_parallel
        self.tp_size, self.dp_size = t, world // t
        self.tp_rank, self.dp_rank = self.rank % t, self.rank // t
        # kv heads: each TP rank holds the kv heads of its query heads; with n_kv_heads < t a head
        # lives on `kv_replicas` consecutive ranks.
        self.kv_replicas = max(1, t // model.kv_heads)
        self.tp_group = self.dp_group = None  # real groups (even of one rank) once distributed
        self.kv_replica_group = None  # only when kv heads are replicated (kv_replicas > 1)
        if distributed:
            self._build_groups()

    def _build_groups(self) -> None:
        # Every rank must create every group, in the same order (torch.distributed.new_group).
        t, world, rep = self.tp_size, self.world_size, self.kv_replicas
        for start in range(0, world, t):
            ranks = list(range(start, start + t))
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self.tp_group = group
            for first in range(start, start + t, rep) if rep > 1 else ():  # no replicated kv heads: no group
                replicas = list(range(first, first + rep))
                kv_group = group if rep == t else dist.new_group(replicas, timeout=self.timeout)
                if self.rank in replicas:
                    self.kv_replica_group = kv_group
        for tp_rank in range(t):
            ranks = list(range(tp_rank, world, t))
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self.dp_group = group

    @classmethod
    def single(cls, model: ModelConfig, seq_len: int) -> "ParallelState":
        """One process, no tensor parallelism (works with or without a process group)."""
        return cls(ParallelConfig(), model, seq_len)

    # --- DeepSpeed `mpu` interface (deepspeed/utils/groups.py, runtime/zero/stage_1_and_2.py). ---
    # DeepSpeed's own "sequence parallel" is Ulysses (it divides the DP world); ours lives inside the
    # TP group, so get_sequence_parallel_* are deliberately absent.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.rank - self.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.tp_rank, self.world_size, self.tp_size))

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, kv_replicas={self.kv_replicas})")
