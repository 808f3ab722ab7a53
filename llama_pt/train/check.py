"""Check a training config for a world of N processes without starting any.

    python -m llama_pt.train.check --world-size 4 parallel=tp2 parallel.zero_stage=1 data.manifest=...

launch/torchrun.sh runs this before spawning workers, so a bad config stops in one line (exit 2)
before any process or process group exists. It makes the trainer's own start-up checks: every config
field, the parallel layout for N processes (llama_pt.parallel.validate_layout), the split of the global
batch over the N / (tensor_parallel x pipeline_parallel) data-parallel ranks (and, with a pipeline, its
micro-batch and layer counts), and the data (manifest, shards, vocabulary). On success it prints one line
describing the layout, with the pipeline's stage split.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

def check(config_dict: dict[str, Any], world_size: int) -> str:
    from ..config import resolve
    from .data_setup import build_train_data
    from .model_setup import check_base_weights
    run = resolve(config_dict, world_size=world_size)
    check_base_weights(run)
    build_train_data(run, dp_rank=0, dp_size=run.dp_size, build_index=False)
    p = run.parallel
    pipeline = ""
    if p.pipeline_parallel > 1:
        from ..config.pipeline import describe_split, stage_layers
        split = stage_layers(run.model.n_layers, p.model_chunks, p.pipeline_embedding_layers, p.pipeline_head_layers)
        pipeline = f"; PP {p.pipeline_parallel} ({p.pipeline_schedule}): {describe_split(split, p.pipeline_parallel)}"
    return (f"ok: {world_size} process(es) = TP {p.tensor_parallel}{' +SP' if p.sequence_parallel else ''} x "
            f"DP {run.dp_size} (zero_stage {p.zero_stage}) x PP {p.pipeline_parallel}, "
            f"{run.grad_accumulation_steps()} micro-batches of {run.train.micro_batch_size} per rank per step"
            f"{pipeline}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_pt.train.check", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True, help="total processes (nodes x processes per node)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to train.py")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from ..config import ConfigError, compose_config
    try:
        if args.world_size < 1:
            raise ConfigError(f"--world-size={args.world_size} must be positive")
        print(check(compose_config(args.overrides), args.world_size))
    except (ConfigError, FileNotFoundError, ValueError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
