"""The trainer across processes (torchrun, gloo): TP x DP with all-reduce and DeepSpeed ZeRO-1/2 against one process.

Two launches of tests/support/workers/train_worker.py run the real Trainer: 4 processes (TP=2 x DP=2,
with and without sequence parallelism; it also saves the checkpoints) and then 2 processes (DP=2 per
ZeRO stage and overlap setting; resumes of the 4-process checkpoint at TP=1 x DP=2 and TP=2 x DP=1).
One process (here) gives the reference losses and the TP=1 x DP=1 resume. Tolerances (fp32 on CPU):
- one step, same model and global batch: loss, global gradient norm and every gradient to relative 1e-5;
- 20 training steps: every loss to relative 1e-5 of the single-process loss (measured: <= 1e-6);
- resume of the TP=2 x DP=2 checkpoint: at the same layout bitwise equal to the uninterrupted run;
  at other layouts (reduction order differs) every loss to relative 1e-5 (measured: <= 1e-6);
  at every layout the global batches (hash of the tokens) are those of the original run.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from llama_pt.config import compose_config
from support.single import single_run
from support.torchrun import torchrun_results
from support.workers import WORKERS
from support.workers.train_worker import with_overrides

FOUR = ["tp2dp2_z1", "tp2dp2_sp_z2", "tp2dp2_z0", "tp2dp2_z1_resume"]
TWO = ["dp2_z1", "dp2_z2", "dp2_z1_no_overlap", "dp2_z2_no_overlap", "dp2_z0", "dp2_z0_no_overlap", "dp2_z2_bf16",
       "tp1dp2_z2_resume", "tp2dp1_z0_resume", "tp1dp2_z1_corrupt"]
STEP_TOL, TRACK_TOL, RESHARD_TOL = 1e-5, 1e-5, 1e-5
# DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights) against the fp32 reference:
# every weight, activation and matmul output rounded once to bf16 (unit roundoff u = 2^-8, relative
# RMS u / sqrt(3) = 2.3e-3 each), a few such roundings in quadrature per gradient. Measured (dp2_z2_bf16):
# loss 5.8e-6, gradient norm 2.1e-4, worst gradient 8.8e-3. A wrong reduction errs by O(1).
BF16_TOL = {"loss": 2e-4, "norm": 2e-3, "grad": 2e-2}
BUCKET = 40_000  # parallel.bucket_size: smaller than the model, so DeepSpeed reduces in several buckets
RESUME_STEP = 4

pytestmark = pytest.mark.slow


def base_config(token_corpus) -> dict:
    return compose_config([
        "model=tiny", f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", "train.seq_len=32",
        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.log_every=0", "train.eval_every=0",
        "train.ckpt_every=0", "train.steps=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        "logging.wandb.enabled=false", f"parallel.bucket_size={BUCKET}"])


def _launch(nproc: int, cases: list[str], out: Path, base: Path, resume_from: Path) -> dict[str, list[dict]]:
    return torchrun_results(WORKERS / "train_worker.py", out, cases, "--base", base, "--resume-from", resume_from,
                            nproc=nproc, timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_corpus) -> dict:
    out = tmp_path_factory.mktemp("parallel_train")
    base = base_config(token_corpus)
    (out / "base.json").write_text(json.dumps(base))
    checkpoint = out / "tp2dp2_z1" / "checkpoints" / f"step_{RESUME_STEP:08d}"
    results = _launch(4, FOUR, out, out / "base.json", checkpoint)
    results.update(_launch(2, TWO, out, out / "base.json", checkpoint))
    single = with_overrides(base, {"train.steps": 20, "train.out_dir": str(out / "single")})
    results["single"] = [single_run(single)]
    resumed = with_overrides(base, {"train.steps": 20, "train.exit_interval": 8, "train.resume": str(checkpoint),
                                    "train.out_dir": str(out / "tp1dp1_resume")})
    results["tp1dp1_resume"] = [single_run(resumed)]
    return results


def _with(key: str, runs: dict):
    return [(c, r, res) for c, ranks in runs.items() for r, res in enumerate(ranks) if key in res]


def test_one_step_loss_norm_and_every_gradient_match_single_process(runs):
    checked = [(c, rank, r) for c, rank, r in _with("grad_rel_err", runs) if "bf16" not in c]
    assert {(r["tp"], r["dp"], r["sp"], r["zero"]) for _, _, r in checked} >= {
        (1, 2, False, 1), (1, 2, False, 2), (1, 2, False, 0), (2, 2, False, 1), (2, 2, True, 2), (2, 2, False, 0)}
    for case, rank, r in checked:
        assert len(r["grad_rel_err"]) == r["n_params"] == 21, case
        worst = max(r["grad_rel_err"], key=r["grad_rel_err"].get)
        assert r["grad_rel_err"][worst] <= STEP_TOL, (case, rank, worst, r["grad_rel_err"][worst])
        assert abs(r["loss1"] - r["ref_loss"]) <= STEP_TOL * r["ref_loss"], (case, rank)
        # The clipping norm is the norm of the full model's gradient, over TP and DP (DeepSpeed's with our
        # mpu for ZeRO, global_grad_norm for all-reduce).
        assert abs(r["norm1"] - r["ref_norm"]) <= STEP_TOL * r["ref_norm"], (case, rank, r["norm1"], r["ref_norm"])


def test_bf16_with_fp32_master_weights(runs):
    for case, rank, r in [(c, rank, r) for c, rank, r in _with("grad_rel_err", runs) if "bf16" in c]:
        assert r["param_dtypes"] == ["torch.bfloat16"] and r["master_dtypes"] == ["torch.float32"], case
        assert abs(r["loss1"] - r["ref_loss"]) <= BF16_TOL["loss"] * r["ref_loss"], (case, r["loss1"], r["ref_loss"])
        assert abs(r["norm1"] - r["ref_norm"]) <= BF16_TOL["norm"] * r["ref_norm"], (case, r["norm1"], r["ref_norm"])
        assert max(r["grad_rel_err"].values()) <= BF16_TOL["grad"], case
    for case, rank, r in _with("master_dtypes", runs):
        if "bf16" not in case:
            assert r["param_dtypes"] == r["master_dtypes"] == ["torch.float32"], case


def test_twenty_steps_track_single_process(runs):
    ref = runs["single"][0]["steps"]
    assert len(ref) == 20
    curves = [(c, r, res) for c, ranks in runs.items() for r, res in enumerate(ranks)
              if len(res.get("steps", ())) == 20 and c != "single"]
    assert {c for c, _, _ in curves} == {"tp2dp2_z1", "tp2dp2_sp_z2", "dp2_z1", "dp2_z2"}
    for case, rank, r in curves:
        for step, got in r["steps"].items():
            want = ref[step]["loss"]
            assert abs(got["loss"] - want) <= TRACK_TOL * want, (case, rank, step, got["loss"], want)
            assert got["batch"] == ref[step]["batch"], (case, step)  # the same global batches


def expected_dp_comm(r: dict) -> dict:
    """Bytes each rank sends over its DP group per optimizer step (docs/parallelism.md, "Data parallelism")."""
    d, e = r["dp"], 4                        # fp32 gradients and weights
    n = sum(r["group_numel"])                # this rank's (TP shard's) trainable elements
    ring_ar, ring_ag = Fraction(2 * (d - 1), d), Fraction(d - 1, d)
    scalars, calls = 1, 1                    # the trainer's mean-loss all-reduce
    if r["tp"] == 1:                         # its step agreement (2 flags) is over the world = this DP group
        scalars, calls = scalars + 2, calls + 1
    if r["zero"] == 0:                       # one all-reduce per parameter, once per step
        return {"all_reduce": {"calls": r["n_params"] + calls, "elements": n + scalars,
                               "bytes": ring_ar * e * (n + scalars)}}
    reductions = r["gas"] if r["zero"] == 2 else 1  # ZeRO-2: in every micro-batch's backward
    scalars += len(r["group_numel"])         # DeepSpeed's per-group squared-norm all-reduce
    padded = [-(-g // (2 * d)) * 2 * d for g in r["group_numel"]]  # flat groups aligned to 2 * d elements
    return {"all_reduce": {"elements": reductions * n + scalars, "bytes": ring_ar * e * (reductions * n + scalars)},
            "all_gather": {"calls": len(padded), "elements": sum(padded), "bytes": ring_ag * e * sum(padded)}}


def test_dp_gradient_reduction_bytes_equal_the_formula(runs):
    checked = _with("comm_dp", runs)
    assert {(r["zero"], r["overlap"]) for _, _, r in checked} == {(z, o) for z in (0, 1, 2) for o in (True, False)}
    for case, rank, r in checked:
        want = expected_dp_comm(r)
        got = {op: {**v, "bytes": Fraction(v["bytes"])} for op, v in r["comm_dp"].items()}
        assert set(got) == set(want), (case, got.keys())
        for op, fields in want.items():
            for key, value in fields.items():
                assert got[op][key] == value, (case, rank, op, key, got[op][key], value)
        if r["zero"]:  # bucketed (every parameter here is smaller than a bucket)
            sizes = [s for s in got["all_reduce"]["sizes"] if s > 1]
            reductions = r["gas"] if r["zero"] == 2 else 1
            assert max(sizes) <= BUCKET and len(sizes) >= reductions * -(-sum(r["group_numel"]) // BUCKET), case


def test_dp_reduction_overlaps_the_backward_pass(runs):
    for case, rank, r in _with("dp_grad_reductions_in_backward", runs):
        inside = r["dp_grad_reductions_in_backward"]
        if r["zero"] == 2 or r["overlap"]:
            # Issued from gradient hooks while autograd runs; DeepSpeed reduces the last bucket of each
            # reduction (stage 2: every micro-batch) after it.
            after = (r["gas"] if r["zero"] == 2 else 1) if r["zero"] else 0
            assert sum(inside) >= len(inside) - after and sum(inside) > 0, (case, inside)
        else:
            assert not any(inside), (case, inside)  # after the backward pass


def test_resharded_resume_matches_the_original_layout(runs):
    straight = runs["tp2dp2_z1"][0]["steps"]
    same = runs["tp2dp2_z1_resume"][0]
    assert same["resumed_at"] == RESUME_STEP
    for step in ("5", "6", "7", "8"):
        assert same["steps"][step]["loss"] == straight[step]["loss"], step  # bitwise at the same layout
    for case in ("tp1dp2_z2_resume", "tp2dp1_z0_resume", "tp1dp1_resume"):
        for rank, r in enumerate(runs[case]):
            assert sorted(r["steps"], key=int) == ["5", "6", "7", "8"], case
            for step, got in r["steps"].items():
                want = straight[step]["loss"]
                assert abs(got["loss"] - want) <= RESHARD_TOL * want, (case, rank, step, got["loss"], want)
                assert got["batch"] == straight[step]["batch"], (case, step)  # data order unchanged


def test_corrupt_checkpoint_is_refused_by_every_rank_before_loading(runs):
    # Rank 0 verifies the SHA-256 manifest and sends its verdict to all ranks, which all refuse.
    refusals = [r["refused"] for r in runs["tp1dp2_z1_corrupt"]]
    assert refusals[0] is not None and refusals[0] == refusals[1]
    checkpoint = runs["tp1dp2_z1_corrupt"][0]["checkpoint"]
    assert refusals[0].startswith(f"checkpoint {checkpoint} is corrupt: __") and "does not match its checksum" in refusals[0]
