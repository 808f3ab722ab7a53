"""The planner: its memory terms against the layer-backward formula and measured saved bytes, its
communication against docs/parallelism.md, and its prediction for the LLaMA paper's 65B run."""
import pytest
import torch

from llama_pt.model import ConfigError, Llama, count_parameters, get_preset
from llama_pt.blocks.memory import layer_activation_bytes, measure_saved_bytes
from llama_pt.blocks import apply_activation_mode
from llama_pt.plan import activation_bytes, check_fits, format_report, get_gpu, local_parameters, make_plan
from llama_pt.plan.__main__ import compose_config, main
from llama_pt.plan.comm import dp_volume, tp_volume
from llama_pt.plan.layout import layout_from_config
from llama_pt.plan.memory import state_bytes
from llama_pt.parallel.cross_entropy import vocab_parallel_cross_entropy

# The paper's settings (Touvron et al. 2023, Sec. 2.4 and Table 2): seq 2048, 4M-token batches
# (+experiment=llama1_65b), model + sequence parallelism within a node, the hand-written backward
# that saves linear outputs (selective), optimizer state sharded over data parallelism (ZeRO-1).
PAPER_65B = ["+experiment=llama1_65b", "parallel=tp8", "parallel.sequence_parallel=true",
             "parallel.zero_stage=1", "++model.activation=selective"]


def tiny_config(*overrides):
    return compose_config(["model=tiny", "train.seq_len=16", "train.global_batch_tokens=128",
                           "train.micro_batch_size=4", *overrides])


@pytest.fixture(scope="module")
def paper_plan():
    return make_plan(compose_config(PAPER_65B), get_gpu("a100_80gb"), world_size=2048, gpus_per_node=8)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (8, True)])
def test_layer_activations_are_the_layer_backward_formula(mode, tp, sp):
    cfg = compose_config(["model=llama1_7b", "train.seq_len=2048", "train.global_batch_tokens=65536",
                          "train.micro_batch_size=2", f"parallel.tensor_parallel={tp}",
                          f"parallel.sequence_parallel={str(sp).lower()}", f"++model.activation={mode}"])
    layout = layout_from_config(cfg, world_size=16, gpus_per_node=8)
    m = get_preset("llama1_7b")
    per_layer = layer_activation_bytes(mode, seq=2048, batch=2, dim=m.dim, ffn_dim=m.ffn_hidden_dim,
                                       n_heads=m.n_heads, n_kv_heads=m.kv_heads, tp=tp, sequence_parallel=sp,
                                       overlap=True, precision="bf16_autocast")
    assert activation_bytes(layout)["layers"] == m.n_layers * per_layer


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_whole_model_activations_equal_the_measured_saved_bytes(mode):
    """Layers + token batch + final norm + head input + loss = what autograd keeps in a training forward."""
    cfg = tiny_config("train.precision=fp32", f"++model.activation={mode}")
    layout = layout_from_config(cfg, world_size=1, gpus_per_node=1, device_type="cpu")
    torch.manual_seed(0)
    model = apply_activation_mode(Llama(layout.model), mode)
    batch = torch.randint(0, layout.model.vocab_size, (layout.micro_batch, layout.seq_len + 1))
    def step():  # the trainer's forward and loss at t=1
        return vocab_parallel_cross_entropy(model(batch[:, :-1]), batch[:, 1:], None, layout.model.vocab_size)
    _, saved = measure_saved_bytes(step, model)
    parts = activation_bytes(layout)
    assert sum(v for k, v in parts.items() if k != "recompute") == saved


def test_model_states_follow_the_zero_conventions():
    cfg = tiny_config("parallel.tensor_parallel=2", "train.global_batch_tokens=256")
    layout = layout_from_config(cfg, world_size=8, gpus_per_node=8)  # dp = 4, bf16 on a GPU
    psi = local_parameters(layout.model, 2)
    assert local_parameters(layout.model, 1) == count_parameters(layout.model)
    m = layout.model  # tiny: dim 64, 4 heads, 2 kv heads (one per TP rank), ffn 192, vocab 512
    assert psi == m.n_layers * (2 * 64 * 32 + 2 * 64 * 16 + 3 * 64 * 96 + 2 * 64) + 2 * 256 * 64 + 64
    assert state_bytes(layout, 0) == {"weights": 2 * psi, "gradients": 2 * psi, "optimizer": 12 * psi}
    assert state_bytes(layout, 1)["optimizer"] == -(-12 * psi // 4)
    assert state_bytes(layout, 2)["gradients"] == -(-2 * psi // 4)
    assert state_bytes(layout, 3)["weights"] == -(-2 * psi // 4)


def test_tp_volumes_are_the_worked_example_of_docs_parallelism():
    # docs/parallelism.md: t=2, L=2, h=64, T=4*16 tokens, fp32: A = 16 384 B
    base = ["parallel.tensor_parallel=2", "train.precision=fp32", "train.global_batch_tokens=128"]
    tp = tp_volume(layout_from_config(tiny_config(*base), 2, 2))
    assert (tp.forward, tp.backward) == (82_688, 81_920)
    sp = tp_volume(layout_from_config(tiny_config(*base, "parallel.sequence_parallel=true"), 2, 2))
    assert sp.forward == 40_960 + 40_960 + 768
    assert sp.backward == 81_920 + 40_960 + 1_280


def test_dp_volumes_per_zero_stage():
    layout = layout_from_config(tiny_config("train.global_batch_tokens=512"), world_size=4, gpus_per_node=4)
    G = 2 * count_parameters(layout.model)  # bf16 gradients (and weights)
    k = layout.grad_accum
    assert dp_volume(layout, 0).total == pytest.approx(2 * 3 / 4 * G)
    assert dp_volume(layout, 1).total == pytest.approx(2 * 3 / 4 * G)
    assert dp_volume(layout, 2).total == pytest.approx((k + 1) * 3 / 4 * G)
    assert dp_volume(layout, 3).total == pytest.approx(3 * k * 3 / 4 * G)


def test_llama_65b_on_2048_a100_matches_the_paper(paper_plan):
    """Touvron et al. 2023, Sec. 2.4: ~380 tokens/s/GPU on 2048 A100-80GB; the run fits in 80 GB."""
    tm = paper_plan.time
    assert paper_plan.layout.dp == 256 and paper_plan.layout.grad_accum == 8
    assert paper_plan.fits and paper_plan.memory.peak < 80 * 1024 ** 3
    assert abs(tm.tokens_per_s_per_gpu - 380) / 380 < 0.15
    assert tm.tokens_per_s_per_gpu == pytest.approx(4 * 1024 ** 2 / (tm.step * 2048))
    assert tm.step == pytest.approx(sum(tm.seconds.values()))
    assert tm.mfu == pytest.approx(tm.tokens_per_s_per_gpu * tm.model_flops_per_gpu * 2048 / (4 * 1024 ** 2) / 312e12)
    assert paper_plan.by_zero_stage[0] > 80 * 1024 ** 3  # without sharding the optimizer state it cannot fit


def test_prediction_comes_from_the_model_not_a_constant(paper_plan):
    cfg = compose_config(PAPER_65B)
    faster_ib = make_plan(cfg, get_gpu("a100_80gb", ib_gbps=400), 2048, 8).time
    no_overlap = make_plan(compose_config(PAPER_65B + ["parallel.overlap=false"]), get_gpu("a100_80gb"), 2048, 8).time
    full = make_plan(compose_config(PAPER_65B[:-1] + ["++model.activation=full"]), get_gpu("a100_80gb"), 2048, 8).time
    base = paper_plan.time
    assert faster_ib.seconds["dp_comm_exposed"] < base.seconds["dp_comm_exposed"]
    assert no_overlap.seconds["tp_comm_exposed"] > base.seconds["tp_comm_exposed"]
    # full recomputation runs the layers' forward again: 8N instead of 6N for the layer GEMMs
    assert full.seconds["gemm"] / base.seconds["gemm"] == pytest.approx(8 / 6, rel=0.01)
    h100 = make_plan(cfg, get_gpu("h100"), 2048, 8).time
    assert h100.tokens_per_s_per_gpu > 2 * base.tokens_per_s_per_gpu


def test_report_and_refusal_carry_the_numbers(paper_plan):
    text = format_report(paper_plan, steps=333786)
    assert "fits" in text and "tokens/s/GPU" in text and "MFU" in text and "ZeRO stage" in text
    unsharded = make_plan(compose_config(PAPER_65B[:3] + ["parallel.zero_stage=0", "++model.activation=selective"]),
                          get_gpu("a100_80gb"), 2048, 8)
    assert not unsharded.fits
    line = unsharded.refusal()
    assert "\n" not in line and "GiB" in line and "parallel.zero_stage=1" in line


def test_check_fits_on_this_cpu():
    small = check_fits(tiny_config(), world_size=1, device="cpu")
    assert small.fits and small.time is None
    huge = check_fits(compose_config(["+experiment=llama1_65b"]), world_size=1, device=torch.device("cpu"))
    assert not huge.fits and "does not fit" in huge.refusal()


def test_cli(capsys):
    assert main(PAPER_65B + ["gpu=a100_80gb", "nodes=256"]) == 0
    out = capsys.readouterr().out
    assert "2048 x NVIDIA A100 SXM 80GB" in out and "-> fits" in out
    assert main(PAPER_65B[:3] + ["parallel.zero_stage=0", "gpu=a100_40gb", "nodes=256"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["gpu=tpu", "nodes=1"]) == 2
    assert "gpu='tpu' is unknown" in capsys.readouterr().err
    assert main(["parallel=tp8", "gpu=h100", "nodes=1"]) == 2  # tiny's 4 heads cannot be split 8 ways
    assert "parallel.tensor_parallel=8" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        layout_from_config(tiny_config(), world_size=3, gpus_per_node=8)
