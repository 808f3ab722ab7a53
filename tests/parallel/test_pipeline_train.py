"""Pipeline parallelism in the real Trainer across processes (torchrun, gloo, fp32) against one process.

Launches of tests/support/workers/train_worker.py: 2 processes (PP=2 with GPipe, 1F1B and interleaved 1F1B at
V=2; resumes of the PP=2 x TP=2 checkpoint at PP=2 x TP=1 and PP=1 x TP=2) and 4 processes (PP=2 x TP=2,
with and without sequence parallelism, which saves the checkpoints; its bitwise resume; PP=2 x DP=2 with
DeepSpeed ZeRO-1, whose gradient norm DeepSpeed sums over the "model parallel" group TP x PP). One process
(here) gives the reference losses and the PP=1 x TP=1 resume; 8 processes run all four at once (PP=2 x TP=2
with SP x DP=2 with ZeRO-1). Every case runs the selective (hand-written) layer, the config's default.
Tolerances (fp32 on CPU):
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
from support.single import single_run
from support.torchrun import torchrun_results
from support.workers import WORKERS
from support.workers.train_worker import with_overrides

STEP_TOL, TRACK_TOL = 1e-6, 1e-5
RESUME_STEP = 4
TWO = ["pp2_1f1b", "pp2_gpipe", "pp2_interleaved", "pp2_nan_on_stage0"]
FOUR = ["pp2tp2", "pp2tp2_sp", "pp2tp2_resume", "pp2dp2_z1", "pp2dp2_z1_resume"]
RESHARD = ["pp2tp1_resume", "pp1tp2_resume"]

pytestmark = pytest.mark.slow


def base_config(token_corpus) -> dict:
    return compose_config([
        "model=tiny", f"data.manifest={token_corpus['manifest']}", f"data.valid_manifest={token_corpus['valid_manifest']}",
        "train.eval_batches=3", "train.seq_len=32",
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


@pytest.mark.parametrize("case", TWO[:3])
def test_pp2_one_step_matches_single_process(two, case):
    _check_one_step(case, two[case])


@pytest.fixture(scope="module")
def single(out) -> dict:
    cfg = with_overrides(json.loads((out / "base.json").read_text()),
                         {"train.steps": 20, "train.out_dir": str(out / "single")})
    return single_run(cfg)


@pytest.fixture(scope="module")
def single_eval(out) -> dict:
    """Held-out loss after 2 steps in one process, for 2 and 4 layers."""
    base = json.loads((out / "base.json").read_text())
    losses = {}
    for layers in (2, 4):
        folder = out / f"single_eval_{layers}"
        single_run(with_overrides(base, {"train.eval_every": 2, "model.n_layers": layers,
                                         "train.out_dir": str(folder)}))
        losses[layers] = valid_losses(folder)
    return losses


def valid_losses(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["valid_loss"] for r in records if "valid_loss" in r}


def _check_tracking(case: str, ranks: list[dict], single: dict) -> None:
    ref = single["steps"]
    for rank, r in enumerate(ranks):
        assert sorted(r["steps"], key=int) == sorted(ref, key=int), case
        for step, got in r["steps"].items():
            want = ref[step]["loss"]
            assert abs(got["loss"] - want) <= TRACK_TOL * want, (case, rank, step, got["loss"], want)
            assert got["batch"] == ref[step]["batch"], (case, step)  # the same global batches


@pytest.mark.parametrize("case,layers", [("pp2_gpipe", 2), ("pp2_interleaved", 4)])
def test_held_out_loss_through_the_stages_matches_single_process(out, two, single_eval, case, layers):
    # Evaluation runs the stages forward (PipelineLogits) and gives every stage the last one's logits.
    got, want = valid_losses(out / case), single_eval[layers]
    assert list(got) == list(want) == [2], (got, want)
    assert abs(got[2] - want[2]) <= TRACK_TOL * want[2], (case, got, want)


def test_pp2_twenty_steps_track_single_process(two, single):
    _check_tracking("pp2_1f1b", two["pp2_1f1b"], single)


def expected_p2p_bytes(r: dict, cfg: dict) -> int:
    """Bytes one stage sends per step: per micro-batch and per model-chunk boundary it borders, one activation
    [micro-batch, seq (/ t under SP), dim] forward (from the chunk before the boundary) or its gradient
    backward (from the chunk after it), fp32 here; p v - 1 boundaries, m micro-batches."""
    t = cfg["train"]
    m = t["global_batch_tokens"] // t["seq_len"] // (t["micro_batch_size"] * r["dp"])
    seq = t["seq_len"] // r["tp"] if r.get("sp") and r["tp"] > 1 else t["seq_len"]
    activation = t["micro_batch_size"] * seq * 64 * 4  # model=tiny: dim 64
    p, v = r["pp"], r["virtual_stages"]
    chunks = [k for k in range(p * v) if k % p == r["pp_rank"]]
    sends = sum((k < p * v - 1) + (k > 0) for k in chunks)  # forward out of k, gradient back into k-1
    return sends * m * activation


@pytest.mark.parametrize("case", ["pp2_1f1b", "pp2_gpipe"])
def test_activation_memory_per_stage_is_in_flight_micro_batches_times_layer_bytes(out, two, case):
    # 1F1B keeps at most p - s micro-batches in flight on stage s (Narayanan et al. 2021, Sec. 2.2.1), GPipe all
    # m; each keeps, per layer of the stage, the bytes of llama_pt.blocks.memory's formula (the selective layer).
    from llama_pt.blocks.memory import layer_activation_bytes
    from llama_pt.config import get_preset
    cfg, model = json.loads((out / "base.json").read_text()), get_preset("tiny")
    t = cfg["train"]
    m = t["global_batch_tokens"] // t["seq_len"] // t["micro_batch_size"]
    per_layer = layer_activation_bytes("selective", seq=t["seq_len"], batch=t["micro_batch_size"], dim=model.dim,
                                       ffn_dim=model.ffn_hidden_dim, n_heads=model.n_heads,
                                       n_kv_heads=model.kv_heads, precision="fp32")
    for r in two[case]:
        in_flight = m if case == "pp2_gpipe" else min(r["pp"] - r["pp_rank"], m)
        want = in_flight * r["stage_layers"] * per_layer
        got = r["peak_layer_activation_bytes"]
        assert abs(got - want) <= 0.02 * want, (case, r["pp_rank"], got, want)


def test_a_nan_on_one_stage_skips_the_step_on_all(two):
    # The global norm is summed over the stages: the NaN of stage 0's gradient reaches stage 1's step too.
    for r in two["pp2_nan_on_stage0"]:
        assert r["steps"]["1"]["skipped"] is None and r["steps"]["3"]["skipped"] is None, r["pp_rank"]
        assert r["steps"]["2"]["skipped"] is not None and r["steps"]["2"]["grad_norm"] != r["steps"]["2"]["grad_norm"]
        assert r["unchanged_after_skip"], r["pp_rank"]


@pytest.mark.parametrize("case", TWO)
def test_p2p_bytes_per_step_equal_the_formula(out, two, case):
    cfg = json.loads((out / "base.json").read_text())
    for r in two[case]:
        for step, sent in r["p2p_bytes"].items():
            assert sent == expected_p2p_bytes(r, cfg), (case, r["pp_rank"], step, sent)


@pytest.fixture(scope="module")
def four(out) -> dict:
    return _launch(4, FOUR, out)


@pytest.mark.parametrize("case", ["pp2tp2", "pp2tp2_sp"])
def test_pp2_tp2_one_step_matches_single_process(four, case):
    assert {(r["tp"], r["pp"], r["sp"]) for r in four[case]} == {(2, 2, case.endswith("sp"))}
    _check_one_step(case, four[case])


def test_pp2_dp2_zero1_one_step_matches_single_process(four):
    assert {(r["tp"], r["dp"], r["pp"], r["zero"]) for r in four["pp2dp2_z1"]} == {(1, 2, 2, 1)}
    _check_one_step("pp2dp2_z1", four["pp2dp2_z1"])


@pytest.mark.parametrize("case", ["pp2tp2", "pp2dp2_z1"])
def test_pp2_with_tp2_or_zero1_dp2_twenty_steps_track_single_process(four, single, case):
    _check_tracking(case, four[case], single)


@pytest.fixture(scope="module")
def eight(out) -> dict:
    return _launch(8, ["pp2tp2dp2_z1_sp"], out)


def test_pp2_tp2_sp_dp2_zero1_together_match_single_process(eight, single):
    """All four at once (8 processes): one step to 1e-6, 20 steps tracking."""
    case = "pp2tp2dp2_z1_sp"
    assert {(r["tp"], r["dp"], r["pp"], r["zero"], r["sp"]) for r in eight[case]} == {(2, 2, 2, 1, True)}
    _check_one_step(case, eight[case])
    _check_tracking(case, eight[case], single)


def test_held_out_loss_through_pp2_tp2_sp_matches_single_process(out, four, single_eval):
    got, want = valid_losses(out / "pp2tp2_sp"), single_eval[2]
    assert list(got) == [2] and abs(got[2] - want[2]) <= TRACK_TOL * want[2], (got, want)


def test_pp2_tp2_p2p_bytes_equal_the_formula(out, four):
    cfg = json.loads((out / "base.json").read_text())
    for case in ("pp2tp2", "pp2tp2_sp", "pp2dp2_z1"):
        for r in four[case]:
            assert set(r["p2p_bytes"].values()) == {expected_p2p_bytes(r, cfg)}, case


@pytest.fixture(scope="module")
def resharded(out, four) -> dict:
    runs = _launch(2, RESHARD, out)
    checkpoint = out / "pp2tp2" / "checkpoints" / f"step_{RESUME_STEP:08d}"
    cfg = with_overrides(json.loads((out / "base.json").read_text()),
                         {"train.steps": 20, "train.exit_interval": 8, "train.resume": str(checkpoint),
                          "train.out_dir": str(out / "pp1tp1_resume")})
    runs["pp1tp1_resume"] = [single_run(cfg)]
    return runs


@pytest.mark.parametrize("case", ["pp2tp2", "pp2dp2_z1"])
def test_resume_is_bitwise_at_the_same_layout(four, case):
    straight = four[case][0]["steps"]
    for rank, r in enumerate(four[f"{case}_resume"]):
        assert r["resumed_at"] == RESUME_STEP
        assert sorted(r["steps"], key=int) == ["5", "6", "7", "8"]
        for step, got in r["steps"].items():
            assert got["loss"] == straight[step]["loss"], (rank, step)
            assert got["batch"] == straight[step]["batch"], (rank, step)


@pytest.mark.parametrize("case", ["pp2tp1_resume", "pp1tp2_resume", "pp1tp1_resume"])
def test_pp2_tp2_checkpoint_resumes_at_other_layouts(four, resharded, case):
    straight = four["pp2tp2"][0]["steps"]
    for rank, r in enumerate(resharded[case]):
        assert sorted(r["steps"], key=int) == ["5", "6", "7", "8"], case
        for step, got in r["steps"].items():
            want = straight[step]["loss"]
            assert abs(got["loss"] - want) <= TRACK_TOL * want, (case, rank, step, got["loss"], want)
            assert got["batch"] == straight[step]["batch"], (case, step)  # data order unchanged


def test_hf_export_from_a_pipeline_checkpoint(out, four, tmp_path):
    # The stages wrote their layers under global names: the checkpoint loads whole into one plain Llama (a
    # missing key would fail the load) and exports; transformers computes the same logits from the export.
    import torch
    from transformers import LlamaForCausalLM

    from llama_pt.pretrained import export_checkpoint, load_checkpoint_model
    checkpoint = out / "pp2tp2" / "checkpoints" / f"step_{RESUME_STEP:08d}"
    ours, state = load_checkpoint_model(checkpoint)
    assert state["layout"] == {"world_size": 4, "tensor_parallel": 2, "data_parallel": 1, "pipeline_parallel": 2,
                               "zero_stage": 0}
    folder = export_checkpoint(checkpoint, tmp_path / "hf", dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(tokens)[..., :512], hf(tokens).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
