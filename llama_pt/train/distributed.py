"""Process start-up for training: the world from torchrun's environment, the device, the process groups.

torchrun (or launch/torchrun.sh) sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is one
process and no process group is created. The order is fixed: read the environment, validate the
config for that world (llama_pt.config.resolve: layout and batch split, one ConfigError line naming the
field) BEFORE any process group exists, then pick the device (CUDA: the GPU numbered LOCAL_RANK),
init the process group (gloo on CPU, nccl on CUDA; parallel.backend; with a backstop timeout of twice
fault.collective_timeout_s), and build the ParallelState.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig
from ..config.layout import validate_pipeline_transfers
from ..parallel import ParallelState, resolve_comm_backend


@dataclass(frozen=True)
class WorldEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "WorldEnv":
        """Read torchrun's variables; a missing WORLD_SIZE means one process."""
        environ = os.environ if environ is None else environ
        values = {}
        for key, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
            raw = environ.get(key, default)
            try:
                values[key] = int(raw)
            except ValueError:
                raise ConfigError(f"environment variable {key}={raw!r} must be an integer") from None
        world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(f"environment WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local} is not a valid world")
        return cls(world, rank, local)


@dataclass
class DistContext:
    env: WorldEnv
    device: torch.device
    pstate: ParallelState
    owns_process_group: bool = False

    @property
    def is_coordinator(self) -> bool:
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def backstop_timeout(run: RunConfig) -> timedelta:
    """The backend's own collective timeout: twice fault.collective_timeout_s, so that the watchdog
    (llama_pt.train.watchdog), which names the step and the collective, normally speaks first."""
    return timedelta(seconds=2 * run.fault.collective_timeout_s)


def _generation_store(env: WorldEnv, timeout: timedelta) -> dict:
    """Under torchrun's restarts, a store whose keys belong to this generation of workers.

    torchrun's agent hosts the workers' store and keeps it across restarts (TORCHELASTIC_USE_AGENT_STORE):
    without a prefix, a restarted worker can read the address its peer published in the previous
    generation and fail to connect to it (gloo: "connectFullMesh failed ... Connection refused").
    Empty (torch's own env:// rendezvous) outside torchrun."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return {}
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    return {"store": dist.PrefixStore(f"llama_pt/restart_{restart}", store), "rank": env.rank,
            "world_size": env.world_size}


def start(run: RunConfig, env: WorldEnv) -> DistContext:
    """Device, process group and ParallelState for a config already resolved for env.world_size."""
    if run.world_size != env.world_size:
        raise ValueError(f"the config was validated for {run.world_size} processes, the world has {env.world_size}")
    device = pick_device(run.train.device, env.local_rank)
    owns = False
    if env.world_size > 1 and not dist.is_initialized():
        backend = resolve_comm_backend(run.parallel.backend, device)
        validate_pipeline_transfers(run.parallel, backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=backstop_timeout(run), **_generation_store(env, backstop_timeout(run)))
        owns = True
    pstate = ParallelState(run.parallel, run.model, run.train.seq_len,
                           timeout=backstop_timeout(run) if env.world_size > 1 else None)
    return DistContext(env=env, device=device, pstate=pstate, owns_process_group=owns)


def single_process(run: RunConfig) -> DistContext:
    """The context of a one-process run (no process group), e.g. for a Trainer built directly."""
    return start(run, WorldEnv())
