"""`python -m llama_pt.plan <train.py's Hydra overrides> gpu=h100 nodes=N [gpus_per_node=8] [ib_gbps=400] [--json]`

Composes the same config as train.py (configs/) and prints the plan. Exit status: 0 when the run fits
in the GPU's memory, 1 when it does not, 2 for a bad config or argument.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from ..config import ConfigError, compose_config
from .hardware import get_gpu
from .report import format_report, make_plan

OWN_KEYS = {"gpu": str, "nodes": int, "gpus_per_node": int, "ib_gbps": float}


def split_arguments(argv: list[str]) -> tuple[dict[str, Any], list[str], bool]:
    """Planner keys (gpu=, nodes=, ...) and --json apart from the Hydra overrides."""
    own, overrides, as_json = {}, [], False
    for arg in argv:
        key, sep, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif sep and key in OWN_KEYS:
            try:
                own[key] = OWN_KEYS[key](value)
            except ValueError:
                raise ValueError(f"{key}={value!r} must be a {OWN_KEYS[key].__name__}") from None
        else:
            overrides.append(arg)
    if "gpu" not in own or "nodes" not in own:
        raise ValueError("usage: python -m llama_pt.plan [Hydra overrides] gpu=h100 nodes=N [gpus_per_node=8] "
                         "[ib_gbps=...] [--json]")
    return own, overrides, as_json


def main(argv: list[str]) -> int:
    try:
        own, overrides, as_json = split_arguments(argv)
        gpu = get_gpu(own["gpu"], own.get("ib_gbps"))
        per_node = own.get("gpus_per_node", 8)
        cfg = compose_config(overrides)
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
