"""Run under torchrun with 2 processes: ZeRO checkpoints written from the partitions, counted and resumed.

Every case builds the real Trainer from the base config (a JSON file written by the test) plus the
case's overrides, restores the checkpoint at step RESUME_STEP of the case it names (if any) and runs
`fit`, with these wrapped to record:
  train_step        each step's loss
  save, restore     every collective issued inside, in order (op, ranks of its group); and at every
                    save and right after the restore, the SHA-256 of this rank's whole TP shard of
                    every weight (the model's own), fp32 master weight, Adam moment and step (the
                    engine's state_tensors, computed outside the recorded block)
Each rank writes <out>/<case>.rank<r>.json; tests/parallel/test_zero_checkpoint.py makes the assertions.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from llama_pt.parallel.comm_trace import interposed
from llama_pt.parallel.inflight import WATCHED
from llama_pt.config import resolve
from llama_pt.train.distributed import WorldEnv, start
from llama_pt.train.trainer import Trainer
from support.workers.train_worker import with_overrides

Z = "parallel.zero_stage"
RESUME_STEP = 4
STRAIGHT = {"train.steps": 8, "train.ckpt_every": RESUME_STEP, "train.keep_last": 0}
RESUMED = {"train.steps": 8}
# 30 parameters instead of 21; SwiGLU hidden size 117, so the ZeRO partitions split layers.1's w1
# (117 x 44) in the middle of its row 87 (docs in tests/parallel/test_zero_checkpoint.py)
ODD = {"model.n_layers": 3, "model.dim": 44, "model.n_heads": 2, "model.n_kv_heads": 2, "model.multiple_of": 1}
KV_REPLICATED = {"parallel.tensor_parallel": 2, "model.n_kv_heads": 1}  # each kv head on both TP ranks
# name: (overrides, case whose checkpoint is resumed)
CASES = {
    "dp2_z1": ({Z: 1, **STRAIGHT}, None),
    "dp2_z2": ({Z: 2, **STRAIGHT}, None),
    "dp2_z1_odd": ({Z: 1, **ODD, **STRAIGHT}, None),
    "dp2_z1_resume": ({Z: 1, **RESUMED}, "dp2_z1"),
    "dp2_z2_resume": ({Z: 2, **RESUMED}, "dp2_z2"),
    "dp2_z1_odd_resume": ({Z: 1, **ODD, **RESUMED}, "dp2_z1_odd"),
    # DeepSpeed's bf16 mode (stage 1: its BF16_Optimizer): bf16 weights refreshed from fp32 master weights
    "dp2_z1_bf16": ({Z: 1, "train.precision": "bf16", **STRAIGHT}, None),
    "dp2_z1_bf16_resume": ({Z: 1, "train.precision": "bf16", **RESUMED}, "dp2_z1_bf16"),
    "tp2dp1_z0_from_z1": ({Z: 0, "parallel.tensor_parallel": 2, **RESUMED}, "dp2_z1"),
    "dp2_z2_from_z1": ({Z: 2, **RESUMED}, "dp2_z1"),
    "tp2dp1_z1_kv": ({Z: 1, **KV_REPLICATED, **STRAIGHT}, None),
    "tp2dp1_z1_kv_resume": ({Z: 1, **KV_REPLICATED, **RESUMED}, "tp2dp1_z1_kv"),
}

_local = threading.local()


@contextlib.contextmanager
def recorded_collectives():
    """Every torch.distributed collective (llama_pt.parallel.inflight.WATCHED: tensor and object
    collectives, barriers) issued in the block as (op, ranks of its group); calls made from inside
    another recorded call (gather_object's own all_gather) are not counted again."""
    calls: list[tuple[str, list[int]]] = []

    def make(fn, name):
        def wrapper(*args, **kwargs):
            if getattr(_local, "inside", False):
                return fn(*args, **kwargs)
            group = kwargs.get("group") or next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            calls.append((name, ranks))
            _local.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                _local.inside = False
        return wrapper
    with interposed(WATCHED, make):
        yield calls


def state_digest(trainer: Trainer) -> str:
    """SHA-256 over this rank's weights and the engine's whole state, in parameter order."""
    h = hashlib.sha256()
    tensors = trainer.engine.state_tensors()
    for name, p in trainer.model.named_parameters():
        optim = tensors["optim"][name]
        for t in (p.detach(), tensors["model"][name], *(optim[k] for k in sorted(optim))):
            h.update(t.detach().float().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_case(name: str, base: dict, out: Path) -> dict:
    overrides, resume_of = CASES[name]
    cfg = with_overrides(base, {**overrides, "train.out_dir": str(out / name)})
    if resume_of is not None:
        cfg["train"]["resume"] = str(out / resume_of / "checkpoints" / f"step_{RESUME_STEP:08d}")
    env = WorldEnv.from_environ()
    run = resolve(cfg, env.world_size)
    trainer = Trainer(run, cfg, start(run, env))
    result = {"steps": {}, "saves": [], "restores": [], "states": {},
              "n_params": len(list(trainer.model.parameters()))}
    original_save, original_restore, original_step = trainer.save, trainer.restore, trainer.train_step

    def save():
        result["states"][str(trainer.step)] = state_digest(trainer)
        with recorded_collectives() as calls:
            path = original_save()
        result["saves"].append(calls)
        return path

    def restore(path, **kwargs):
        with recorded_collectives() as calls:
            original_restore(path, **kwargs)
        result["restores"].append(calls)
        result["states"][f"restored_{trainer.step}"] = state_digest(trainer)

    def recorded_step(micro_batches):
        metrics = original_step(micro_batches)
        result["steps"][str(trainer.step)] = metrics["loss"]
        return metrics

    trainer.save, trainer.restore, trainer.train_step = save, restore, recorded_step
    try:
        if trainer.resume_from is not None:
            trainer.restore(trainer.resume_from)
        trainer.fit(resumed_from=trainer.resume_from)
    finally:
        trainer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", required=True, choices=sorted(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = json.loads(args.base.read_text())
    rank = dist.get_rank()
    for name in args.cases:
        result = run_case(name, base, args.out)
        tmp = args.out / f"{name}.rank{rank}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out / f"{name}.rank{rank}.json")
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # free engines and groups before interpreter shutdown (see llama_pt.train.entry)


if __name__ == "__main__":
    main()
