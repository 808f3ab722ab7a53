"""The hand-written layer at TP=2 and TP=2+SP (torchrun, gloo): gradients, memory, communication, overlap.

One 2-process launch runs every case of tests/support/workers/layer_dist_worker.py; the tests below
check what it wrote.
"""
from __future__ import annotations

from fractions import Fraction

import pytest

from support.torchrun import torchrun_results
from support.workers import WORKERS

CASES = ["tp2", "tp2_sp", "tp2_sp_gqa", "tp2_sp_kv1", "tp2_kv1_no_overlap", "tp2_sp_no_overlap", "tp2_sp_bf16"]
FP32_REL_TOL = 1e-5
# bf16 autocast against the one-process bf16 run: besides the roundings both sides share, each TP rank
# rounds its partial products to bf16 before they are summed over TP, so more independent roundings
# (relative RMS u / sqrt(3) = 2.3e-3 each, u = 2^-8) add in quadrature than in one process (1.5e-2 there,
# tests/ops/test_layer_backward.py). Measured worst: loss 1.8e-5, gradient 1.13e-2, selective against
# none 6.2e-3; with LoRA (tp2_sp_lora_bf16): loss 2.3e-5, gradient 1.49e-2 (the q and k adapters of the
# last layer, through the attention scores, in every mode alike), selective against none 9.9e-3. A wrong
# shard or a wrong backward term errs by O(1/sqrt(dim)) = 6e-2 or more.
BF16_REL_TOL = {"loss": 2e-4, "grad": 2e-2}
N_LAYERS, SEQ, BATCH, DIM = 2, 64, 2, 256

pytestmark = pytest.mark.slow


# With LoRA (rank 8, all seven projections, nonzero B; the base frozen unless the name says otherwise).
LORA_CASES = ["tp2_lora", "tp2_sp_lora", "tp2_sp_kv1_lora", "tp2_kv1_lora_no_overlap", "tp2_sp_lora_trained_base",
              "tp2_sp_lora_dropout", "tp2_sp_lora_bf16"]
LORA_RANK, HEAD_DIM = 8, 32


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("layer_dist")
    return torchrun_results(WORKERS / "layer_dist_worker.py", out, CASES + LORA_CASES, nproc=2, timeout=600)


@pytest.fixture(scope="module")
def runs(results) -> list[tuple[str, int, dict]]:
    return [(case, rank, results[case][rank]) for rank in range(2) for case in CASES]


@pytest.fixture(scope="module")
def lora_runs(results) -> list[tuple[str, int, dict]]:
    return [(case, rank, results[case][rank]) for rank in range(2) for case in LORA_CASES]


def test_every_mode_matches_one_process_and_selective_matches_autograd(runs):
    for case, rank, r in runs:
        tol = BF16_REL_TOL if r["bf16"] else dict.fromkeys(BF16_REL_TOL, FP32_REL_TOL)
        for mode, m in r["modes"].items():
            assert m["grad_names_match"] and len(m["grad_rel_err_vs_ref"]) == 3 + 9 * N_LAYERS, (case, mode)
            assert m["loss_rel_err"] <= tol["loss"], (case, rank, mode)
            worst = max(m["grad_rel_err_vs_ref"], key=m["grad_rel_err_vs_ref"].get)
            assert m["grad_rel_err_vs_ref"][worst] <= tol["grad"], (case, rank, mode, worst)
        worst = max(r["selective_vs_none"], key=r["selective_vs_none"].get)
        assert r["selective_vs_none"][worst] <= tol["grad"], (case, rank, worst)


def test_saved_bytes_per_layer_equal_the_formula(runs):
    for case, rank, r in runs:
        for mode, m in r["modes"].items():
            assert abs(m["saved_bytes"] - m["formula_bytes"]) <= 0.02 * m["formula_bytes"], (case, mode, m)
        if r["sp"]:
            assert r["modes"]["full"]["saved_bytes"] == BATCH * SEQ // 2 * DIM * 4  # the float32 input shard


def _comm(m: dict) -> dict[str, tuple[int, Fraction]]:
    return {k: (calls, Fraction(b)) for k, (calls, b) in m["comm"].items()}


def test_communication_of_each_mode(runs):
    """selective issues exactly the collectives of the overlapped autograd path (plain TP: all-reduces;
    SP: the forward's all-gather and reduce-scatter, their duals, the input re-gathered in backward and the
    input gradient reduce-scattered). Without overlap it still saves only the shard, so it re-gathers where
    autograd's blocking path had kept the gathered input: 2L extra all-gathers. full recomputes each layer's
    forward in backward up to the last op whose result backward needs (torch's checkpoint stops early):
    the repeated forward collectives are every layer's all-gathers and its attention reduction."""
    for case, rank, r in runs:
        none, selective, full = (_comm(r["modes"][m]) for m in ("none", "selective", "full"))
        act = BATCH * SEQ * DIM * (2 if r["bf16"] else 4)  # one [b, s, h] activation in the matmul dtype
        if r["overlap"] or not r["sp"]:
            assert selective == none, case
        else:
            calls, nbytes = none["all_gather.bwd"]
            assert selective == {**none, "all_gather.bwd": (calls + 2 * N_LAYERS, nbytes + 2 * N_LAYERS * act / 2)}
        assert {k: v for k, v in full.items() if k.endswith(".bwd")} == {k: v for k, v in none.items()
                                                                         if k.endswith(".bwd")}, case
        repeated = {"all_gather.fwd": (2, act / 2), "reduce_scatter.fwd": (1, act / 2)} if r["sp"] else \
            {"all_reduce.fwd": (1, act)}
        for key, (per_layer, nbytes) in repeated.items():
            assert full[key] == (none[key][0] + per_layer * N_LAYERS,
                                 none[key][1] + per_layer * N_LAYERS * nbytes), (case, key)


def _spans(events: list[dict]) -> tuple[list[tuple[str, int, int]], list[dict]]:
    """Matmul spans (name, start, end) and collectives {name, issue, wait_start} from a timeline."""
    by_seq: dict[int, dict[str, dict]] = {}
    for e in events:
        by_seq.setdefault(e["seq"], {})[e["kind"]] = e
    spans = [(k["start"]["name"], k["start"]["t"], k["end"]["t"]) for k in by_seq.values() if "start" in k]
    colls = [{"name": k["issue"]["name"], "issue": k["issue"]["t"], "wait": k["wait_start"]["t"]}
             for k in by_seq.values() if "issue" in k]
    return spans, colls


def test_selective_backward_overlaps_collectives_with_matmuls(runs):
    """With overlap: the re-gather of the normalised input (SP) is in flight during every input-gradient
    matmul and the reduction of the input gradient during every weight-gradient matmul; without it,
    no collective is in flight during any matmul."""
    checked = 0
    for case, rank, r in runs:
        spans, colls = _spans(r["modes"]["selective"]["timeline"])
        # dgrad/wgrad: 2 per layer (qkv, w1/w3), and the output head's column-parallel layer with overlap.
        groups = 2 * N_LAYERS + r["overlap"]
        assert sorted(s[0] for s in spans) == ["dgrad"] * groups + ["wgrad"] * groups, case
        want = {"dgrad": "all_gather" if r["sp"] else None, "wgrad": "reduce_scatter" if r["sp"] else "all_reduce"}
        for name, start, end in spans:
            in_flight = [c["name"] for c in colls if c["issue"] <= start and end <= c["wait"]]
            if not r["overlap"]:
                assert in_flight == [], (case, name)
            elif want[name] is not None:
                assert want[name] in in_flight, (case, rank, name, in_flight)
                checked += 1
    assert checked > 0


def test_lora_in_every_mode_matches_one_process(lora_runs):
    """A and B gradients (gathered with their shard specs: B of column-parallel layers by rows, A of wo / w2
    by columns; kv heads replicated in the kv1 cases) and the loss equal one process's; with dropout too,
    as every layout draws the same masks from the same random state."""
    for case, rank, r in lora_runs:
        tol = BF16_REL_TOL if r["bf16"] else dict.fromkeys(BF16_REL_TOL, FP32_REL_TOL)
        trained = 2 * 7 * N_LAYERS + (3 + 9 * N_LAYERS if r["lora"]["trained_base"] else 0)
        for mode, m in r["modes"].items():
            assert m["grad_names_match"] and len(m["grad_rel_err_vs_ref"]) == trained, (case, mode)
            assert m["loss_rel_err"] <= tol["loss"], (case, rank, mode, m["loss_rel_err"])
            worst = max(m["grad_rel_err_vs_ref"], key=m["grad_rel_err_vs_ref"].get)
            assert m["grad_rel_err_vs_ref"][worst] <= tol["grad"], (case, rank, mode, worst)
        worst = max(r["selective_vs_none"], key=r["selective_vs_none"].get)
        assert r["selective_vs_none"][worst] <= tol["grad"], (case, rank, worst)


def test_lora_saved_bytes_equal_the_formula(lora_runs):
    for case, rank, r in lora_runs:
        for mode, m in r["modes"].items():
            assert m["saved_bytes"] == m["formula_bytes"], (case, rank, mode, m["saved_bytes"], m["formula_bytes"])


def test_lora_communication_of_selective(results, lora_runs):
    """The hand-written layer's adapters add, to the collectives of the same layout without them, one
    forward all-reduce of u [b, s, r] per row-parallel adapter (wo, w2) and nothing on the data path of
    backward: the input gradients of the updates join the projections' own reductions. The rest of the
    difference is parameter hooks: A of every column-parallel adapter summed over TP, B of replicated kv
    heads over their replicas; a frozen base loses its own (SP norm weights, replicated kv weights) and,
    under SP, the frozen embedding's backward all-gather."""
    L, e_f32 = N_LAYERS, 4
    for case, rank, r in lora_runs:
        base = next(results[c][rank] for c in CASES
                    if all(results[c][rank][k] == r[k] for k in ("sp", "overlap", "kv", "bf16")))
        want = {k: list(v) for k, v in _comm(base["modes"]["selective"]).items()}

        def add(key, calls, nbytes):
            entry = want.setdefault(key, [0, Fraction(0)])
            entry[0] += calls
            entry[1] += nbytes

        e = 2 if r["bf16"] else 4
        add("all_reduce.fwd", 2 * L, 2 * L * BATCH * SEQ * LORA_RANK * e)  # all-reduce bytes: 2(t-1)/t N = N
        add("all_reduce.bwd", 5 * L, 5 * L * LORA_RANK * DIM * e_f32)
        kv_replicated = r["kv"] < 2
        if kv_replicated:
            add("all_reduce.bwd", 2 * L, 2 * L * HEAD_DIM * LORA_RANK * e_f32)
        if not r["lora"]["trained_base"]:
            if r["sp"]:
                add("all_reduce.bwd", -(2 * L + 1), -(2 * L + 1) * DIM * e_f32)
                add("all_gather.bwd", -1, -Fraction(BATCH * SEQ * DIM * e_f32, 2))
            if kv_replicated:
                add("all_reduce.bwd", -2 * L, -2 * L * HEAD_DIM * DIM * e_f32)
        assert _comm(r["modes"]["selective"]) == {k: tuple(v) for k, v in want.items() if v[0]}, (case, rank)
