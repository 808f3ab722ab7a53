"""Real multi-process runs (torchrun, gloo): TP / TP+SP / kv replication / TP x DP against one process.

Two launches (2 and 4 processes) run every case of tests/support/workers/dist_worker.py; the tests
below check what they wrote.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from support.torchrun import torchrun_results
from support.workers import WORKERS

TWO = ["tp2", "tp2_no_overlap", "tp2_sp", "tp2_sp_no_overlap", "tp2_kv1", "tp2_sp_kv1", "tp2_sp_bf16", "tp2_vocab500"]
FOUR = ["tp2", "tp2_sp", "tp4_sp_kv2"]  # with 4 processes tp2 is TP=2 x DP=2
FP32_REL_TOL, FP64_ABS_TOL = 1e-5, 1e-12
# bf16 autocast against one bf16 process: each TP rank rounds its partial products to bf16 (unit
# roundoff u = 2^-8, relative RMS u / sqrt(3) = 2.3e-3 per rounding) before the sum over TP, so a few
# more independent roundings than in one process add in quadrature. Measured worst (tp2_sp_bf16): loss
# 1.4e-6, logits 3.1e-3, gradient 8.0e-3. A wrong shard errs by O(1).
BF16_REL_TOL = {"loss": 2e-4, "logits": 1e-2, "grad": 2e-2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[tuple[str, int, dict]]:
    """(case, global rank, result) for every rank of both launches."""
    out = []
    for nproc, cases in ((2, TWO), (4, FOUR)):
        results = torchrun_results(WORKERS / "dist_worker.py", tmp_path_factory.mktemp(f"np{nproc}"), cases,
                                   nproc=nproc, timeout=300)
        for rank in range(nproc):
            out.extend((f"{case}@{nproc}", rank, results[case][rank]) for case in cases)
    return out


def test_loss_and_every_gradient_match_single_process(runs):
    assert {(r["tp"], r["dp"], r["sp"], r["kv_replicas"]) for _, _, r in runs} >= {
        (2, 1, False, 1), (2, 1, True, 1), (2, 1, False, 2), (2, 2, False, 1), (2, 2, True, 1), (4, 1, True, 2)}
    # A padded vocabulary (500 -> 512): the vocab-parallel loss equals F.cross_entropy over the first 500 logits.
    assert {(r["vocab"], r["padded_vocab"]) for _, _, r in runs} == {(512, 512), (500, 512)}
    for case, rank, r in runs:
        tol = BF16_REL_TOL if r["bf16"] else dict.fromkeys(BF16_REL_TOL, FP32_REL_TOL)
        assert r["grad_names_match"], case
        assert r["loss_rel_err"] <= tol["loss"], (case, rank, r["loss"], r["ref_loss"])
        assert r["logits_rel_err"] <= tol["logits"], (case, rank)
        assert len(r["grad_rel_err"]) == 3 + 9 * r["n_layers"]
        worst = max(r["grad_rel_err"], key=r["grad_rel_err"].get)
        assert r["grad_rel_err"][worst] <= tol["grad"], (case, rank, worst, r["grad_rel_err"][worst])


def test_process_groups_follow_the_megatron_layout(runs):
    for case, rank, r in runs:
        t, world = r["tp"], r["tp"] * r["dp"]
        first = rank - rank % t
        rep = r["kv_replicas"]
        kv_first = rank - rank % rep
        assert r["mpu"] == {
            "tp_rank": rank % t, "dp_rank": rank // t, "tp_size": t, "dp_size": r["dp"],
            "dp_ranks": list(range(rank % t, world, t)), "src": first,
            "tp_members": list(range(first, first + t)), "dp_members": list(range(rank % t, world, t)),
            "kv_members": list(range(kv_first, kv_first + rep))}, case


def test_float64_forward_matches_single_process(runs):
    for case, rank, r in runs:
        assert r["fp64_logits_max_abs_err"] <= FP64_ABS_TOL, (case, rank, r["fp64_logits_max_abs_err"])
        assert r["fp64_loss_abs_err"] <= FP64_ABS_TOL, (case, rank, r["fp64_loss_abs_err"])


def test_shards_are_slices_and_state_dicts_round_trip(runs):
    for case, rank, r in runs:
        assert r["state_dict_exact"] and r["load_roundtrip_exact"], case
        t, d, hd = r["tp"], r["dim"], r["head_dim"]
        shapes, marks = r["local_shapes"], r["marks"]
        kv_local = (r["kv"] // t if r["kv"] >= t else 1) * hd  # whole heads; one replicated head if kv < t
        assert shapes["tok_embeddings.weight"] == [512 // t, d] and shapes["output.weight"] == [512 // t, d]
        assert shapes["layers.0.attention.wq.weight"] == [d // t, d]
        assert shapes["layers.0.attention.wk.weight"] == [kv_local, d]
        assert shapes["layers.0.attention.wo.weight"] == [d, d // t]
        assert shapes["layers.0.feed_forward.w1.weight"] == [r["ffn_hidden"] // t, d]
        assert shapes["layers.0.feed_forward.w2.weight"] == [d, r["ffn_hidden"] // t]
        tp_rank = rank % t
        leader = tp_rank % r["kv_replicas"] == 0
        for name, (model_parallel, seq_parallel, kv_replicated) in marks.items():
            is_kv = name.endswith(("wk.weight", "wv.weight"))
            is_norm = name.endswith("norm.weight")
            assert kv_replicated == (is_kv and r["kv_replicas"] > 1), (case, name)
            assert seq_parallel == (is_norm and r["sp"]), (case, name)
            assert model_parallel == (not is_norm and (leader if kv_replicated else True)), (case, name)


def expected_comm(r: dict) -> dict[str, dict]:
    """The analytic per-rank count of docs/parallelism.md, "Communication per step"."""
    t, n_layers, f32 = r["tp"], r["n_layers"], 4
    e = 2 if r["bf16"] else 4                   # linear inputs/outputs: the autocast dtype
    tokens = r["batch"] * r["seq"]
    act = tokens * r["dim"]                     # elements of one [b, s, h] activation
    ring_ar, ring_ag = Fraction(2 * (t - 1), t), Fraction(t - 1, t)
    column_groups = 2 * n_layers + 1            # qkv and w1/w3 per layer, plus the output head
    rows = 2 * n_layers                         # wo and w2 per layer (the embedding reduces float32)
    out: dict[str, list] = {}

    def add(key, calls, payload, factor):
        c, b = out.setdefault(key, [0, Fraction(0)])
        out[key] = [c + calls, b + calls * payload * factor]

    add("all_reduce.fwd", 1, tokens * f32, ring_ar)        # loss: max
    add("all_reduce.fwd", 1, 2 * tokens * f32, ring_ar)    # loss: sum-exp and target logit
    if r["sp"]:
        add("all_gather.fwd", column_groups, act * e, ring_ag)
        add("reduce_scatter.fwd", rows, act * e, ring_ag)
        add("reduce_scatter.fwd", 1, act * f32, ring_ag)   # embedding
        add("all_gather.bwd", rows, act * e, ring_ag)
        add("all_gather.bwd", 1, act * f32, ring_ag)       # embedding
        if r["overlap"]:
            add("all_gather.bwd", column_groups, act * e, ring_ag)  # input re-gathered in backward
        add("reduce_scatter.bwd", column_groups, act * e, ring_ag)
        add("all_reduce.bwd", 2 * n_layers + 1, r["dim"] * f32, ring_ar)  # norm weights
    else:
        add("all_reduce.fwd", rows, act * e, ring_ar)
        add("all_reduce.fwd", 1, act * f32, ring_ar)       # embedding
        add("all_reduce.bwd", column_groups, act * e, ring_ar)
    rep = r["kv_replicas"]
    if rep > 1:  # wk and wv gradients summed over the replicas of their kv head
        add("all_reduce.bwd", 2 * n_layers, r["head_dim"] * r["dim"] * f32, Fraction(2 * (rep - 1), rep))
    return {k: {"calls": c, "bytes": b} for k, (c, b) in out.items()}


def test_communication_bytes_equal_the_analytic_count(runs):
    for case, rank, r in runs:
        measured = {k: {"calls": v["calls"], "bytes": Fraction(v["bytes"])} for k, v in r["comm"].items()}
        assert measured == expected_comm(r), (case, rank)
    # Korthikanti et al. 2022, Sec. 4.2.2: SP moves the same forward bytes as plain TP.
    by_case = {case: r for case, rank, r in runs if rank == 0}
    fwd = {c: sum(Fraction(v["bytes"]) for k, v in by_case[c]["comm"].items() if k.endswith(".fwd"))
           for c in ("tp2@2", "tp2_sp@2")}
    assert fwd["tp2@2"] == fwd["tp2_sp@2"]


def _matmul_spans(events: list[dict]) -> list[tuple[dict, dict, dict | None]]:
    """(matmul start, end, the collective issued just before it or None) for each backward matmul."""
    by_seq: dict[int, dict[str, dict]] = {}
    for e in events:
        by_seq.setdefault(e["seq"], {})[e["kind"]] = e
    spans = []
    for i, e in enumerate(events):
        if e["kind"] == "start":
            before = events[i - 1]
            spans.append((e, by_seq[e["seq"]]["end"], by_seq[before["seq"]] if before["kind"] == "issue" else None))
    return spans


def test_overlap_timeline_collectives_in_flight_during_backward_matmuls(runs):
    checked = 0
    for case, rank, r in runs:
        events = json.loads(Path(r["timeline"]).read_text())["events"]
        spans = _matmul_spans(events)
        if not r["overlap"]:
            assert spans == [], case
            issues = [i for i, e in enumerate(events) if e["kind"] == "issue"]
            assert all(events[i + 1]["kind"] == "wait_start" and events[i + 1]["seq"] == events[i]["seq"]
                       for i in issues), f"{case}: a collective overlapped something with overlap off"
            continue
        groups = 2 * r["n_layers"] + 1  # column-parallel groups: qkv, w1/w3 per layer, output head
        # SP: all-gather of the input during dgrad, reduce-scatter of dgrad during wgrad;
        # plain TP: no collective during dgrad, all-reduce of dgrad during wgrad.
        want = {"dgrad": "all_gather" if r["sp"] else None, "wgrad": "reduce_scatter" if r["sp"] else "all_reduce"}
        assert sorted(s[0]["name"] for s in spans) == ["dgrad"] * groups + ["wgrad"] * groups, case
        for start, end, coll in spans:
            assert (coll and coll["issue"]["name"]) == want[start["name"]], (case, start["name"], coll)
            if coll is not None:
                # In flight during the whole matmul: issued before it started, waited for after it ended.
                assert (coll["issue"]["time_ns"] <= start["time_ns"] <= end["time_ns"]
                        <= coll["wait_start"]["time_ns"] <= coll["wait_end"]["time_ns"]), (case, start["name"])
                checked += 1
    assert checked > 0
