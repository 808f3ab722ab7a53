"""Hydra config -> validated settings -> processes -> Trainer; bad input ends here as one line on stderr.

One process, or one of torchrun's workers (WORLD_SIZE, RANK, LOCAL_RANK in the environment). The
config is checked for that world before any process group exists (llama_pt.train.distributed).
"""
from __future__ import annotations

import gc
import sys
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, resolve
from ..plan import check_fits
from .checkpoint import CheckpointError
from .distributed import DistContext, WorldEnv, start
from .model_setup import check_base_weights
from .preemption import StopSignals
from .step_guard import TrainingDiverged

STARTUP_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def _fail(error: Exception, env: Optional[WorldEnv]) -> None:
    """One line per node (its local rank 0; global rank 0 without a prefix), exit status 2."""
    if env is None or env.rank == 0:
        print(f"error: {error}", file=sys.stderr)
    elif env.local_rank == 0:
        print(f"error (rank {env.rank}): {error}", file=sys.stderr)
    sys.exit(2)


def run_training(cfg: DictConfig) -> dict[str, Any]:
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    env: Optional[WorldEnv] = None
    ctx: Optional[DistContext] = None
    trainer = None
    stop: Optional[StopSignals] = None
    try:
        try:
            env = WorldEnv.from_environ()
            run = resolve(config_dict, world_size=env.world_size)
            check_base_weights(run)
            ctx = start(run, env)
            fit = check_fits(run, env.world_size, ctx.device)  # memory planner (llama_pt.plan)
            if not fit.fits:
                raise ConfigError(fit.refusal())
            from .trainer import Trainer  # heavy imports only once the config is known to be valid
            trainer = Trainer(run, config_dict, ctx)  # opens and checks the data
            if trainer.resume_from is not None:
                trainer.restore(trainer.resume_from, verified=run.train.resume == "auto")
        except STARTUP_ERRORS as e:
            # Start-up only: errors raised while training keep their traceback.
            _fail(e, env)
        try:
            with StopSignals(run.fault.stop_signals, rank=env.rank) as stop:
                return trainer.fit(resumed_from=trainer.resume_from, stop=stop)
        except TrainingDiverged as e:
            print(f"error (rank {env.rank}): {e}", file=sys.stderr)
            sys.exit(1)
        finally:
            trainer.close()
    finally:
        if ctx is not None:
            ctx.close()
            # Free the engine, model and groups (reference cycles through hooks) while the interpreter
            # is alive: left to interpreter shutdown, gloo's threads may abort the process (SIGABRT).
            trainer = ctx = None
            gc.collect()
        if stop is not None:
            stop.forward_to_previous()  # e.g. submitit's handler, which requeues the job
