"""Run under torchrun (2 processes): instruction tuning (task=sft, packed windows, document masks, the selective
layer) through the real Trainer at TP=2 with sequence parallelism and at DP=2 with DeepSpeed ZeRO-1, recording
every step's loss; the TP case first checks the vocabulary-parallel loss with a loss mask against the full
logits on one rank. Each rank writes <out>/<case>.rank<r>.json; tests/instruct/test_sft_parallel.py asserts.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_pt.config import resolve
from llama_pt.parallel import gather_logits, make_loss_fn
from llama_pt.train.distributed import WorldEnv, start
from llama_pt.train.trainer import Trainer
from support.workers.train_worker import with_overrides

CASES = {
    "tp2_sp": {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": True},
    "dp2_z1": {"parallel.zero_stage": 1},
}


def masked_loss_check(trainer: Trainer) -> dict:
    """Vocabulary-parallel cross-entropy with a loss mask against F.cross_entropy of the gathered logits: the
    loss, zero gradient rows for the unscored tokens, and the same loss whatever their targets."""
    g = torch.Generator().manual_seed(5)
    vocab = trainer.run.model.vocab_size
    full = torch.randn(2, 8, trainer.run.model.padded_vocab_size, generator=g)
    targets = torch.randint(0, vocab, (2, 8), generator=g)
    scored = torch.rand(2, 8, generator=g) < 0.5
    p = trainer.pstate
    local = full.chunk(p.tp_size, dim=-1)[p.tp_rank].clone().requires_grad_()
    loss_fn = make_loss_fn(p)
    loss = loss_fn(local, targets, scored=scored, normalizer=3.0)
    loss.backward()
    want = F.cross_entropy(full[..., :vocab][scored], targets[scored], reduction="sum") / 3.0
    other = loss_fn(local.detach(), torch.where(scored, targets, (targets + 1) % vocab), scored=scored, normalizer=3.0)
    return {"loss_err": abs(loss.item() - want.item()) / want.item(), "same_for_other_targets": bool(other == loss),
            "unscored_grad_nonzero": int(torch.count_nonzero(local.grad[~scored])),
            "scored_grad_nonzero": int(torch.count_nonzero(local.grad[scored])),
            "gathered_ok": bool(torch.equal(gather_logits(local.detach(), p), full))}


def run_case(name: str, base: dict, out: Path) -> dict:
    cfg = with_overrides(base, {**CASES[name], "train.out_dir": str(out / name)})
    env = WorldEnv.from_environ()
    run = resolve(cfg, env.world_size)
    trainer = Trainer(run, cfg, start(run, env))
    result = {"tp": trainer.pstate.tp_size, "dp": trainer.pstate.dp_size, "zero": run.parallel.zero_stage,
              "steps": {}}
    if trainer.pstate.tp_size > 1:
        result["masked_loss"] = masked_loss_check(trainer)
    original = trainer.train_step

    def recorded(micro_batches):
        metrics = original(micro_batches)
        result["steps"][trainer.step] = metrics["loss"]
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
    parser.add_argument("--cases", nargs="+", required=True, choices=sorted(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = json.loads(args.base.read_text())
    for name in args.cases:
        result = run_case(name, base, args.out)
        tmp = args.out / f"{name}.rank{dist.get_rank()}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out / f"{name}.rank{dist.get_rank()}.json")
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # free engines and groups before interpreter shutdown (see llama_pt.train.entry)


if __name__ == "__main__":
    main()
