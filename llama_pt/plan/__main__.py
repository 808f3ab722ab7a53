"""`python -m llama_pt.plan <train.py's Hydra overrides> gpu=h100 nodes=N [gpus_per_node=8] [ib_gbps=400] [--json]`
`python -m llama_pt.plan search <Hydra overrides: model, train.seq_len, train.global_batch_tokens> gpu=h100 nodes=N [top=10]`

Composes the same config as train.py (configs/) and prints the plan. Pipeline parallelism is the config's:
parallel.pipeline_parallel=, parallel.virtual_stages=, parallel.pipeline_schedule=,
parallel.pipeline_embedding_layers=, parallel.pipeline_head_layers= (Hydra overrides like any other);
pp=, vp= and schedule= are short for the first three (ALIASES). `search` prints the best layouts that fit
(llama_pt.plan.search; it sets the parallel.* fields itself). Exit status: 0 when the run fits in the GPU's
memory (search: when some layout fits), 1 when it does not, 2 for a bad config or argument.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from ..config import ConfigError, compose_config
from .hardware import get_gpu
from .report import format_report, make_plan
from .search import format_table, search

OWN_KEYS = {"gpu": str, "nodes": int, "gpus_per_node": int, "ib_gbps": float, "top": int}
# short names for config fields: `pp=4` is the Hydra override `parallel.pipeline_parallel=4`
ALIASES = {"pp": "parallel.pipeline_parallel", "vp": "parallel.virtual_stages", "schedule": "parallel.pipeline_schedule"}
USAGE = ("usage: python -m llama_pt.plan [search] [Hydra overrides] gpu=h100 nodes=N [gpus_per_node=8] [ib_gbps=...] "
         "[parallel.pipeline_parallel=P (pp=P) parallel.virtual_stages=V (vp=V) parallel.pipeline_schedule=gpipe|1f1b|"
         "interleaved_1f1b (schedule=)] [top=N] [--json]")


def split_arguments(argv: list[str]) -> tuple[dict[str, Any], list[str], bool]:
    """Planner keys (gpu=, nodes=, ...) and --json apart from the Hydra overrides (ALIASES spelled out)."""
    own, overrides, as_json = {}, [], False
    for arg in argv:
        key, sep, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif sep and key in ALIASES:
            overrides.append(f"{ALIASES[key]}={value}")
        elif sep and key in OWN_KEYS:
            try:
                own[key] = OWN_KEYS[key](value)
            except ValueError:
                raise ValueError(f"{key}={value!r} must be a {OWN_KEYS[key].__name__}") from None
        else:
            overrides.append(arg)
    if "gpu" not in own or "nodes" not in own:
        raise ValueError(USAGE)
    return own, overrides, as_json


def run_search(own: dict[str, Any], cfg: dict[str, Any], per_node: int, as_json: bool) -> int:
    gpu = get_gpu(own["gpu"], own.get("ib_gbps"))
    world = own["nodes"] * per_node
    ranked = search(cfg, gpu, world, per_node)
    top = own.get("top", 10)
    if as_json:
        print(json.dumps([dict(tp=r.layout.tp, pp=r.layout.pp, vp=r.layout.vp, schedule=r.layout.schedule,
                               dp=r.layout.dp, zero_stage=r.layout.zero_stage, micro_batch=r.layout.micro_batch,
                               activation=r.layout.activation, peak_bytes=r.peak, bubble=r.layout.bubble,
                               tokens_per_s_per_gpu=r.time.tokens_per_s_per_gpu, mfu=r.time.mfu)
                          for r in ranked[:top]], indent=1))
    elif ranked:
        print(f"{len(ranked)} layouts fit on {world} x {gpu.name}; the {min(top, len(ranked))} fastest:")
        print(format_table(ranked, top))
    else:
        print(f"no layout fits on {world} x {gpu.name}")
    return 0 if ranked else 1


def main(argv: list[str]) -> int:
    searching = argv[:1] == ["search"]
    try:
        own, overrides, as_json = split_arguments(argv[1:] if searching else argv)
        per_node = own.get("gpus_per_node", 8)
        cfg = compose_config(overrides)
        if searching:
            return run_search(own, cfg, per_node, as_json)
        gpu = get_gpu(own["gpu"], own.get("ib_gbps"))
        plan = make_plan(cfg, gpu, own["nodes"] * per_node, per_node)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_report(plan, steps=cfg["train"]["steps"]))
        if not plan.fits:
            print(f"\n{plan.refusal()}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
