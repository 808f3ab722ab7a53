"""Pipeline parallelism in the real Trainer across processes (torchrun, gloo, fp32) against one process.

Launches of tests/support/workers/train_worker.py: 2 processes (PP=2 with GPipe, 1F1B and interleaved 1F1B at
V=2; resumes of the PP=2 x TP=2 checkpoint at PP=2 x TP=1 and PP=1 x TP=2) and 4 processes (PP=2 x TP=2,
with and without sequence parallelism, which saves the checkpoints; its bitwise resume; PP=2 x DP=2 with
DeepSpeed ZeRO-1). One process (here) gives the reference losses and the PP=1 x TP=1 resume. Every case runs the
selective (hand-written) layer, the config's default. Tolerances (fp32 on CPU):
- one step, same model and global batch: loss, global gradient norm and every gradient of the stage to 1e-6
  relative (the issue's bound);
- 20 steps: every loss to relative 1e-5 of the single-process run (reduction orders differ);
- resume: bitwise at the same layout, 1e-5 elsewhere, the global batches (token hashes) unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_pt.config import compose_config
from support.torchrun import torchrun_results
from support.workers import WORKERS
from support.workers.train_worker import with_overrides

STEP_TOL, TRACK_TOL = 1e-6, 1e-5
RESUME_STEP = 4
TWO = ["pp2_1f1b", "pp2_gpipe", "pp2_interleaved"]
FOUR = ["pp2tp2", "pp2tp2_sp", "pp2tp2_resume"]
RESHARD = ["pp2tp1_resume", "pp1tp2_resume"]

pytestmark = pytest.mark.slow


def base_config(token_corpus) -> dict:
    return compose_config([
        "model=tiny", f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", "train.seq_len=32",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.log_every=0", "train.eval_every=0",
        "train.ckpt_every=0", "train.steps=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        "logging.wandb.enabled=false"])


@pytest.fixture(scope="module")
def out(tmp_path_factory, token_corpus) -> Path:
    out = tmp_path_factory.mktemp("pipeline_train")
    (out / "base.json").write_text(json.dumps(base_config(token_corpus)))
    return out


def _launch(nproc: int, cases: list[str], out: Path) -> dict[str, list[dict]]:
    checkpoint = out / "pp2tp2" / "checkpoints" / f"step_{RESUME_STEP:08d}"
    return torchrun_results(WORKERS / "train_worker.py", out, cases, "--base", out / "base.json",
                            "--resume-from", checkpoint, nproc=nproc, timeout=500)


@pytest.fixture(scope="module")
def two(out) -> dict:
    return _launch(2, TWO, out)


def _check_one_step(case: str, ranks: list[dict]) -> None:
    names = set()
    for rank, r in enumerate(ranks):
        assert r["pp"] == 2, case
        worst = max(r["grad_rel_err"], key=r["grad_rel_err"].get)
        assert r["grad_rel_err"][worst] <= STEP_TOL, (case, rank, worst, r["grad_rel_err"][worst])
        assert abs(r["loss1"] - r["ref_loss"]) <= STEP_TOL * r["ref_loss"], (case, rank, r["loss1"], r["ref_loss"])
        assert abs(r["norm1"] - r["ref_norm"]) <= STEP_TOL * r["ref_norm"], (case, rank, r["norm1"], r["ref_norm"])
        names |= set(r["grad_rel_err"])
    # The stages together hold every parameter once: 2 per layer norm pair + 7 projections, embedding, norm, head.
    n_layers = 4 if "interleaved" in case else 2
    assert len(names) == 9 * n_layers + 3, (case, sorted(names))


@pytest.mark.parametrize("case", TWO)
def test_pp2_one_step_matches_single_process(two, case):
    _check_one_step(case, two[case])
