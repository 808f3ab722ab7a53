"""Run under torchrun: the real Trainer at TP x DP layouts (all-reduce and DeepSpeed ZeRO), measured.

Every case builds a Trainer from the base config (a JSON file written by the test) plus the case's
overrides and runs `fit`, with `train_step` wrapped to record per step the loss and a hash of the
GLOBAL batch (all data-parallel ranks' micro-batches in rank order). Actions:
  grads   at step 1: the DP-reduced gradients (gathered over TP), the loss and the global norm against a
          single-process reference computed here on the same global batch from the same seed
  comm    at step 2: every collective issued (llama_pt.parallel.trace_collectives), per group
  resume  restore from --resume-from first (the checkpoint of another launch or layout)
  memory  at step 2: the peak of the bytes the stage's layers keep for backward (pipeline stages)
  nan     at step 2: a NaN in one gradient of the first pipeline stage only (every stage must skip the update)
  corrupt restore from a copy of --resume-from with one byte flipped: every rank must refuse it
Each rank writes <out>/<case>.rank<r>.json; tests/parallel/test_train_parallel.py makes the assertions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_pt.model import Llama
from llama_pt.parallel import gather_shards, summarize, trace_collectives
from llama_pt.train.checkpoint import CheckpointError
from llama_pt.config import resolve
from llama_pt.train.distributed import WorldEnv, start
from llama_pt.train.optim import parameter_groups
from llama_pt.train.trainer import Trainer

Z = "parallel.zero_stage"
TP2 = {"parallel.tensor_parallel": 2}
PP2 = {"parallel.pipeline_parallel": 2}
INTERLEAVED = {"parallel.virtual_stages": 2, "parallel.pipeline_schedule": "interleaved_1f1b", "model.n_layers": 4}
# name: (overrides, actions); the launch's world size decides the data-parallel size.
CASES = {
    # 4 processes: TP=2 x DP=2
    "tp2dp2_z1": ({**TP2, Z: 1, "train.steps": 20, "train.ckpt_every": 4, "train.keep_last": 0},
                  ("grads", "comm")),
    "tp2dp2_sp_z2": ({**TP2, "parallel.sequence_parallel": True, Z: 2, "train.steps": 20}, ("grads", "comm")),
    "tp2dp2_z0": ({**TP2, Z: 0}, ("grads", "comm")),
    "tp2dp2_z1_resume": ({**TP2, Z: 1, "train.steps": 20, "train.exit_interval": 8}, ("resume",)),
    # 2 processes: DP=2, or TP=2 x DP=1
    "dp2_z1": ({Z: 1, "train.steps": 20}, ("grads", "comm")),
    "dp2_z2": ({Z: 2, "train.steps": 20}, ("grads", "comm")),
    "dp2_z1_no_overlap": ({Z: 1, "parallel.overlap": False}, ("grads", "comm")),
    "dp2_z2_no_overlap": ({Z: 2, "parallel.overlap": False}, ("grads", "comm")),
    "dp2_z0": ({Z: 0}, ("grads", "comm")),
    "dp2_z0_no_overlap": ({Z: 0, "parallel.overlap": False}, ("grads", "comm")),
    "dp2_z2_bf16": ({Z: 2, "train.precision": "bf16"}, ("grads",)),
    "tp1dp2_z1_corrupt": ({Z: 1}, ("corrupt",)),
    "tp1dp2_z2_resume": ({Z: 2, "train.steps": 20, "train.exit_interval": 8}, ("resume",)),
    "tp2dp1_z0_resume": ({**TP2, Z: 0, "train.steps": 20, "train.exit_interval": 8}, ("resume",)),
    # pipelines (tests/parallel/test_pipeline_train.py). 2 processes: PP=2
    "pp2_1f1b": ({**PP2, "train.steps": 20}, ("grads", "memory")),
    "pp2_gpipe": ({**PP2, "parallel.pipeline_schedule": "gpipe", "train.eval_every": 2}, ("grads", "memory")),
    "pp2_interleaved": ({**PP2, **INTERLEAVED, "train.eval_every": 2}, ("grads",)),
    "pp2_nan_on_stage0": ({**PP2, "train.steps": 3}, ("nan",)),
    "pp2tp1_resume": ({**PP2, "train.steps": 20, "train.exit_interval": 8}, ("resume",)),
    "pp1tp2_resume": ({**TP2, "train.steps": 20, "train.exit_interval": 8}, ("resume",)),
    # 4 processes: PP=2 x TP=2 (it saves the checkpoints the resumes read), with SP; PP=2 x DP=2 ZeRO-1
    "pp2tp2": ({**PP2, **TP2, "train.steps": 20, "train.ckpt_every": 4, "train.keep_last": 0}, ("grads",)),
    "pp2tp2_sp": ({**PP2, **TP2, "parallel.sequence_parallel": True, "train.eval_every": 2}, ("grads",)),
    "pp2tp2_resume": ({**PP2, **TP2, "train.steps": 20, "train.exit_interval": 8}, ("resume",)),
    "pp2dp2_z1": ({**PP2, Z: 1, "train.steps": 20, "train.ckpt_every": 4, "train.keep_last": 0}, ("grads",)),
    "pp2tp2dp2_z1_sp": ({**PP2, **TP2, Z: 1, "parallel.sequence_parallel": True, "train.steps": 20}, ("grads",)),
    "pp2dp2_z1_resume": ({**PP2, Z: 1, "train.steps": 20, "train.exit_interval": 8,
                          "train.resume": "{out}/pp2dp2_z1/checkpoints/step_00000004"}, ()),
}


def with_overrides(base: dict, overrides: dict) -> dict:
    cfg = copy.deepcopy(base)
    for dotted, value in overrides.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for key in path:
            node = node[key]
        node[leaf] = value
    return cfg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def global_batch(micro_batches: list[torch.Tensor], trainer: Trainer) -> torch.Tensor:
    """This step's global batch: the data-parallel ranks' micro-batches concatenated in rank order."""
    local = torch.cat(micro_batches)
    p = trainer.pstate
    if p.dp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(p.dp_size)]
    dist.all_gather(parts, local, group=p.dp_group)
    return torch.cat(parts)


def reference_step(trainer: Trainer, batch: torch.Tensor) -> dict:
    """One process, the same seed, the same global batch in micro-batches: loss, gradients, norm (unclipped)."""
    run = trainer.run
    with torch.random.fork_rng():
        torch.manual_seed(run.train.seed)
        ref = Llama(run.model)
    micro = batch.split(run.train.micro_batch_size)
    total = 0.0
    for m in micro:
        loss = F.cross_entropy(ref(m[:, :-1]).flatten(0, 1).float(), m[:, 1:].flatten())
        (loss / len(micro)).backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    return {"loss": total / len(micro), "norm": norm.item(), "grads": {n: q.grad for n, q in ref.named_parameters()}}


class _Saved:
    """A tensor autograd keeps for backward, counted in `live` (bytes per storage) until autograd frees it."""

    def __init__(self, t: torch.Tensor, live: dict):
        self.t, self.live, self.key = t, live, t.untyped_storage().data_ptr()
        entry = live.setdefault(self.key, [0, t.untyped_storage().nbytes()])
        entry[0] += 1

    def __del__(self):
        entry = self.live[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[self.key]


@contextlib.contextmanager
def peak_layer_activations(stage: torch.nn.Module):
    """The most bytes the stage's transformer layers keep for backward at once (distinct storages, weights
    and buffers such as the RoPE tables left out) while the block runs: yields {"bytes": peak}, filled on exit."""
    weights = {q.untyped_storage().data_ptr() for q in [*stage.parameters(), *stage.buffers()]}
    live: dict[int, list[int]] = {}
    peak = {"bytes": 0}

    def pack(t):
        if t.untyped_storage().data_ptr() in weights:
            return t
        saved = _Saved(t, live)
        peak["bytes"] = max(peak["bytes"], sum(n for _, n in live.values()))
        return saved

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t if isinstance(s, _Saved) else s)
    handles = []
    for layer in stage.layers.values():
        handles.append(layer.register_forward_pre_hook(lambda *_: hooks.__enter__()))
        handles.append(layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None)))
    try:
        yield peak
    finally:
        for h in handles:
            h.remove()


def corrupt_copy(checkpoint: Path, out: Path) -> Path:
    """A copy of the checkpoint with one byte of one rank's DCP file flipped (made by rank 0)."""
    copy_dir = out / "corrupt" / checkpoint.name
    if dist.get_rank() == 0:
        shutil.copytree(checkpoint, copy_dir)
        shard = sorted(copy_dir.glob("*.distcp"))[-1]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    return copy_dir


def run_case(name: str, base: dict, out: Path, resume_from: str | None) -> dict:
    overrides, actions = CASES[name]
    cfg = with_overrides(base, {**overrides, "train.out_dir": str(out / name)})
    if "resume" in actions:
        cfg["train"]["resume"] = resume_from
    cfg["train"]["resume"] = cfg["train"]["resume"].format(out=out)  # a checkpoint of an earlier case
    if "corrupt" in actions:
        cfg["train"]["resume"] = str(corrupt_copy(Path(resume_from), out))
    env = WorldEnv.from_environ()
    run = resolve(cfg, env.world_size)
    trainer = Trainer(run, cfg, start(run, env))
    if "corrupt" in actions:
        try:
            trainer.restore(trainer.resume_from)
            return {"refused": None}
        except CheckpointError as e:
            return {"refused": str(e), "checkpoint": cfg["train"]["resume"]}
        finally:
            trainer.close()
    if trainer.resume_from is not None:
        trainer.restore(trainer.resume_from)
    p = trainer.pstate
    result = {"tp": p.tp_size, "dp": p.dp_size, "pp": p.pp_size, "pp_rank": p.pp_rank,
              "virtual_stages": run.parallel.virtual_stages, "sp": run.parallel.sequence_parallel,
              "zero": run.parallel.zero_stage, "overlap": run.parallel.overlap,
              "gas": run.grad_accumulation_steps(), "resumed_at": trainer.step, "steps": {},
              "dp_ranks": list(range(p.tp_rank, p.world_size, p.tp_size)),
              "tp_ranks": list(range(p.rank - p.tp_rank, p.rank - p.tp_rank + p.tp_size))}
    groups = parameter_groups(trainer.model, run.optim)  # AdamW's two groups, as DeepSpeed flattens them
    result["group_numel"] = [sum(q.numel() for q in g["params"]) for g in groups]
    result["n_params"] = sum(len(g["params"]) for g in groups)
    result["param_dtypes"] = sorted({str(q.dtype) for q in trainer.model.parameters()})
    result["master_dtypes"] = sorted({str(t.dtype) for t in trainer.engine.state_tensors()["model"].values()})
    original_step, original_engine_step = trainer.train_step, trainer.engine.step

    def recorded_step(micro_batches):
        index = trainer.step + 1
        batch = global_batch(micro_batches, trainer)
        digest = hashlib.sha256(batch.numpy().tobytes()).hexdigest()
        if index == 1 and "grads" in actions:
            ref = reference_step(trainer, batch)

            def engine_step(lr):
                full = gather_shards(trainer.engine.local_gradients(), trainer.model, p)
                result["grad_rel_err"] = {n: rel_err(g, ref["grads"][n]) for n, g in full.items()}
                return original_engine_step(lr)
            trainer.engine.step = engine_step
            metrics = original_step(micro_batches)
            trainer.engine.step = original_engine_step
            result.update(ref_loss=ref["loss"], ref_norm=ref["norm"], loss1=metrics["loss"], norm1=metrics["grad_norm"])
        elif index == 2 and "memory" in actions:
            with peak_layer_activations(trainer.model) as peak:
                metrics = original_step(micro_batches)
            result["peak_layer_activation_bytes"] = peak["bytes"]
            result["stage_layers"] = len(trainer.model.layers)
        elif index == 2 and "nan" in actions:
            def poisoned_step(lr):  # a NaN in one gradient of the first stage only
                if p.pp_rank == 0:
                    next(q for q in trainer.model.parameters() if q.grad is not None).grad.view(-1)[0] = float("nan")
                return original_engine_step(lr)
            trainer.engine.step = poisoned_step
            before = {n: q.detach().clone() for n, q in trainer.model.named_parameters()}
            metrics = original_step(micro_batches)
            trainer.engine.step = original_engine_step
            result["unchanged_after_skip"] = all(torch.equal(q, before[n]) for n, q in trainer.model.named_parameters())
        elif index == 2 and "comm" in actions:
            with trace_collectives() as calls:
                metrics = original_step(micro_batches)
            result["comm_dp"] = _jsonable(summarize(calls, result["dp_ranks"]))
            result["comm_tp"] = _jsonable(summarize(calls, result["tp_ranks"]))
            result["dp_grad_reductions_in_backward"] = [
                c.during_backward for c in calls
                if tuple(c.ranks) == tuple(result["dp_ranks"]) and c.op == "all_reduce" and c.numel > 1
                and "float" in c.dtype]  # gradients, not the trainer's int32 step-agreement flags
        else:
            metrics = original_step(micro_batches)
        if trainer.timeline is not None:
            result.setdefault("p2p_bytes", {})[index] = trainer.link.bytes_sent
        result["steps"][index] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "batch": digest,
                                  "skipped": metrics["skipped"]}
        return metrics

    trainer.train_step = recorded_step
    try:
        trainer.fit(resumed_from=trainer.resume_from)
    finally:
        trainer.close()
    return result


def _jsonable(summary: dict) -> dict:
    return {op: {**v, "bytes": str(v["bytes"])} for op, v in summary.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", required=True, choices=sorted(CASES))
    parser.add_argument("--resume-from", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = json.loads(args.base.read_text())
    rank = dist.get_rank()
    for name in args.cases:
        result = run_case(name, base, args.out, args.resume_from)
        tmp = args.out / f"{name}.rank{rank}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out / f"{name}.rank{rank}.json")
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # free engines and groups before interpreter shutdown (see llama_pt.train.entry)


if __name__ == "__main__":
    main()
