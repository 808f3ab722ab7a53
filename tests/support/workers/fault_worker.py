"""Run under torchrun with 2 processes: bad batches in the real multi-rank trainer.

Cases (each a fresh Trainer from the JSON base config plus the case's overrides):
  dp2_z0, dp2_z1  DP=2 (all-reduce; DeepSpeed ZeRO-1): only RANK 1's micro-batches of data position 4
                  are poisoned (NaN loss on one rank); position 8 is random tokens on every rank (spike)
  tp2_z0          TP=2: position 4 poisoned (the NaN row lives on TP rank 0 only)
Each rank writes <out>/<case>.rank<r>.json: the steps each rank skipped (with the reason) and, per
step, whether its weights and optimizer state changed. tests/faults/test_numerical_faults_dist.py checks them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist

from support.injection import InjectingLoader, bitwise_equal, poison_embedding, poisoned, random_tokens, snapshot
from llama_pt.config import resolve
from llama_pt.train.distributed import WorldEnv, start
from llama_pt.train.trainer import Trainer

CASES = {"dp2_z0": {"parallel": {"zero_stage": 0}}, "dp2_z1": {"parallel": {"zero_stage": 1}},
         "tp2_z0": {"parallel": {"tensor_parallel": 2}}}


def run_case(name: str, base: dict, out: Path) -> dict:
    cfg = copy.deepcopy(base)
    for section, values in CASES[name].items():
        cfg[section].update(values)
    cfg["train"]["out_dir"] = str(out / name)
    env = WorldEnv.from_environ()
    run = resolve(cfg, env.world_size)
    trainer = Trainer(run, cfg, start(run, env))
    poison_embedding(trainer)
    bad = {4: poisoned if trainer.pstate.dp_size == 1 or env.rank == 1 else None, 8: random_tokens}
    trainer.data.loader = InjectingLoader(trainer.data.loader, {k: v for k, v in bad.items() if v is not None})
    result = {"skipped": {}, "changed": {}}
    original = trainer.train_step

    def recorded(micro_batches):
        before = snapshot(trainer)
        metrics = original(micro_batches)
        result["changed"][trainer.step] = not bitwise_equal(before, snapshot(trainer))
        if metrics["skipped"]:
            result["skipped"][trainer.step] = metrics["skipped"]
        return metrics
    trainer.train_step = recorded
    try:
        trainer.fit()
    finally:
        trainer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = json.loads(args.base.read_text())
    for name in CASES:
        result = run_case(name, base, args.out)
        (args.out / f"{name}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
        gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
