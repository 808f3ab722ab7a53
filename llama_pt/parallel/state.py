"""Process groups for tensor (TP), data (DP) and pipeline (PP) parallelism; DeepSpeed's `mpu`.

Layout (Megatron's convention, Shoeybi et al. 2019, Sec. 3; Narayanan et al. 2021, Sec. 3): TP innermost,
then DP, then PP,

    rank = pp_rank * (d * t) + dp_rank * t + tp_rank

so the world of W ranks is cut into W/t tensor-parallel groups of t CONSECUTIVE ranks (they exchange
activations every layer, so they should share a node), d = W/(t p) data-parallel groups per stage of the
ranks with the same TP rank and stage, and t d pipeline groups of the ranks with the same TP and DP rank
(one per stage; they exchange activations once per micro-batch and stage boundary, the least traffic, so
they may span nodes):

    W=4, t=2:       TP groups {0,1} {2,3}    DP groups {0,2} {1,3}
    W=8, t=2, p=2:  TP {0,1} {2,3} {4,5} {6,7}   DP {0,2} {1,3} {4,6} {5,7}   PP {0,4} {1,5} {2,6} {3,7}

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

from ..config import ModelConfig, ParallelConfig
from ..config.layout import comm_backend
from .inflight import compact_ranks


def resolve_comm_backend(name: str, device: torch.device) -> str:
    """parallel.backend on `device` (llama_pt.config.layout.comm_backend)."""
    return comm_backend(name, device.type)


class ParallelState:
    """Owns the TP, DP, PP and kv-replica process groups; passed to DeepSpeed as `mpu` (whose "model
    parallel" group is the TP group: the pipeline's stages hold different parameters, which DeepSpeed's
    ZeRO never sees together)."""

    def __init__(self, cfg: ParallelConfig, model: ModelConfig, seq_len: int, timeout: Optional[timedelta] = None):
        """`timeout`: the backend's own limit on a collective in the groups created here (torch's default
        when None; new groups do not inherit the default group's)."""
        self.timeout = timeout
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        t, p = cfg.tensor_parallel, cfg.pipeline_parallel
        if world % (t * p):  # the layout was validated for another world (llama_pt.config.resolve)
            raise ValueError(f"parallel.pipeline_parallel={p} x parallel.tensor_parallel={t} does not divide this "
                             f"world of {world}")
        self.config, self.model_config, self.seq_len = cfg, model, seq_len
        self.world_size = world
        self.rank = dist.get_rank() if distributed else 0
        self.tp_size, self.dp_size, self.pp_size = t, world // (t * p), p
        self.tp_rank, self.dp_rank = self.rank % t, (self.rank // t) % self.dp_size
        self.pp_rank = self.rank // (world // p)
        # kv heads: each TP rank holds the kv heads of its query heads; with n_kv_heads < t a head
        # lives on `kv_replicas` consecutive ranks.
        self.kv_replicas = max(1, t // model.kv_heads)
        self.tp_group = self.dp_group = None  # real groups (even of one rank) once distributed
        self.pp_group = None  # only with a pipeline (pp_size > 1)
        self.model_parallel_group = None  # TP x PP: the ranks of one model replica (only with a pipeline)
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
        stage_size = self.dp_size * t
        for stage in range(self.pp_size):
            for tp_rank in range(t):
                ranks = list(range(stage * stage_size + tp_rank, (stage + 1) * stage_size, t))
                group = dist.new_group(ranks, timeout=self.timeout)
                if self.rank in ranks:
                    self.dp_group = group
        for first in range(stage_size if self.pp_size > 1 else 0):  # no pipeline: no PP groups
            ranks = list(range(first, world, stage_size))
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self.pp_group = group
        for dp_rank in range(self.dp_size if self.pp_size > 1 else 0):
            ranks = [s * stage_size + dp_rank * t + i for s in range(self.pp_size) for i in range(t)]
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self.model_parallel_group = group

    def stage_rank(self, stage: int) -> int:
        """The global rank holding pipeline stage `stage` (taken modulo the stages) with this rank's TP and DP
        ranks: the peer of a point-to-point transfer between stages."""
        return (stage % self.pp_size) * self.dp_size * self.tp_size + self.dp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        """One line: the process-group layout and this world's groups (printed at start-up by rank 0; the
        first 4 groups of each kind and their count in a larger world)."""
        def groups(ranks_of: list[list[int]]) -> str:
            shown = " ".join("{" + compact_ranks(r) + "}" for r in ranks_of[:4])
            return shown + (f" ... ({len(ranks_of)} groups)" if len(ranks_of) > 4 else "")
        t, d, stage_size = self.tp_size, self.dp_size, self.tp_size * self.dp_size
        tp = [list(range(s, s + t)) for s in range(0, self.world_size, t)]
        dp = [list(range(s * stage_size + i, (s + 1) * stage_size, t)) for s in range(self.pp_size) for i in range(t)]
        pp = [list(range(f, self.world_size, stage_size)) for f in range(stage_size)]
        return (f"rank = pp*{d * t} + dp*{t} + tp (TP innermost, then DP, then PP): TP groups {groups(tp)}; "
                f"DP groups {groups(dp)}; PP groups {groups(pp)}")

    @classmethod
    def single(cls, model: ModelConfig, seq_len: int) -> "ParallelState":
        """One process, no tensor parallelism (works with or without a process group)."""
        return cls(ParallelConfig(), model, seq_len)

    # --- DeepSpeed `mpu` interface (deepspeed/utils/groups.py, runtime/zero/stage_1_and_2.py). ---
    # DeepSpeed's own "sequence parallel" is Ulysses (it divides the DP world); ours lives inside the
    # TP group, so get_sequence_parallel_* are deliberately absent. "Model parallel" is Megatron's TP x PP
    # (one replica of the model): ZeRO sums its gradient norm over that group, counting a parameter without
    # the `tensor_model_parallel` mark on TP rank 0 only (its TP rank comes from get_tensor_model_parallel_rank),
    # so with a pipeline the norm covers every stage. Without one it is the TP group.
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_model_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self.model_parallel_group if self.pp_size > 1 else self.tp_group

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
        return [self.stage_rank(self.pp_rank) + (d - self.dp_rank) * self.tp_size for d in range(self.dp_size)]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipeline_model_parallel_group(self) -> Optional[dist.ProcessGroup]:
        return self.pp_group

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size}, kv_replicas={self.kv_replicas})")
