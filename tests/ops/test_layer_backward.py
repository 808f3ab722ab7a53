"""The hand-written layer in one process: gradcheck, autograd agreement, the activation modes, training."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from llama_pt.model import ConfigError, Llama, ModelConfig
from llama_pt.model.llama import TransformerBlock, rope_tables
from llama_pt.blocks import CheckpointedBlock, apply_activation_mode
from llama_pt.blocks.selective import LayerSpec, LowRankSpec, SelectiveBlock, _AttentionHalf, _MLPHalf

REALISTIC = ModelConfig(dim=256, n_heads=8, n_kv_heads=2, n_layers=2, vocab_size=512, multiple_of=64, max_seq_len=128)
TINY = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=256, multiple_of=32, max_seq_len=64)
FP32_REL_TOL = 1e-5
# bf16 autocast, hand-written layer against autograd: both round matmul outputs and activations to bf16
# (unit roundoff u = 2^-8; a rounding's relative RMS error is about u / sqrt(3) = 2.3e-3) at the same
# places except inside RoPE's backward, which the hand-written layer keeps in float32. A handful of
# independent roundings in quadrature gives a few 1e-3 (measured: 5.4e-3 worst over all gradients); a
# wrong term errs by O(1/sqrt(dim)) or more (a dropped RMSNorm projection term: 8e-2).
BF16_GRAD_REL_TOL = 1.5e-2


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread per test process is faster and deterministic in timing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(kernel: str, head_dim: int) -> LayerSpec:
    return LayerSpec(eps=1e-6, head_dim=head_dim, kernel=kernel, group=None, sequence_parallel=False, overlap=True,
                     compute_dtype=torch.float64)


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_gradcheck_attention_half_float64(kernel):
    g = torch.Generator().manual_seed(0)
    dim, heads, kv, hd, s = 8, 2, 1, 4, 5
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, norm_w = rand(2, s, dim), rand(dim)
    wq, wk, wv, wo = rand(heads * hd, dim), rand(kv * hd, dim), rand(kv * hd, dim), rand(dim, heads * hd)
    cos, sin = (t[:s].double() for t in rope_tables(hd, s, 10000.0))
    spec = _spec(kernel, hd)
    assert torch.autograd.gradcheck(lambda *a: _AttentionHalf.apply(*a, cos, sin, spec),
                                    (x, norm_w, wq, wk, wv, wo), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_mlp_half_float64():
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    h, norm_w, w1, w3, w2 = rand(2, 5, 8), rand(8), rand(12, 8), rand(12, 8), rand(8, 12)
    spec = _spec("cpu_flash", 4)
    assert torch.autograd.gradcheck(lambda *a: _MLPHalf.apply(*a, spec), (h, norm_w, w1, w3, w2),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_halves_with_low_rank_updates_float64(dropout):
    """Both halves with LoRA updates on some projections (wk and w3 left plain): the hand-written gradients
    of x, the weights, and every A and B, including the dropout masks (the seed is reset before each call,
    so every evaluation draws the same masks). atol 1e-7: with outputs up to ~40, the central differences
    (eps 1e-6) carry rounding errors of up to ~1e-8 (measured 8.7e-9); a wrong term errs by O(1e-1) or more."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    dim, heads, kv, hd, s, f, r = 8, 2, 1, 4, 5, 12, 3
    low = LowRankSpec(scale=1.5, dropout=dropout, columns=None)
    spec = _spec("cpu_flash", hd)
    cos, sin = (t[:s].double() for t in rope_tables(hd, s, 10000.0))

    def seeded(fn):
        def call(*args):
            torch.manual_seed(0)
            return fn(*args)
        return call

    x, norm_w = rand(2, s, dim), rand(dim)
    wq, wk, wv, wo = rand(heads * hd, dim), rand(kv * hd, dim), rand(kv * hd, dim), rand(dim, heads * hd)
    small = lambda *shape: (0.5 * rand(*shape)).detach().requires_grad_()  # noqa: E731  (A, B: updates ~ W)
    aq, bq, av, bv, ao, bo = small(r, dim), small(heads * hd, r), small(r, dim), small(kv * hd, r), \
        small(r, heads * hd), small(dim, r)
    attention = seeded(lambda x, n, wq, wk, wv, wo, aq, bq, av, bv, ao, bo: _AttentionHalf.apply(
        x, n, wq, wk, wv, wo, cos, sin, spec, (low, None, low, low), aq, bq, None, None, av, bv, ao, bo))
    assert torch.autograd.gradcheck(attention, (x, norm_w, wq, wk, wv, wo, aq, bq, av, bv, ao, bo),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    h, norm_w, w1, w3, w2 = rand(2, s, dim), rand(dim), rand(f, dim), rand(f, dim), rand(dim, f)
    a1, b1, a2, b2 = small(r, dim), small(f, r), small(r, f), small(dim, r)
    mlp = seeded(lambda h, n, w1, w3, w2, a1, b1, a2, b2: _MLPHalf.apply(
        h, n, w1, w3, w2, spec, (low, None, low), a1, b1, None, None, a2, b2))
    assert torch.autograd.gradcheck(mlp, (h, norm_w, w1, w3, w2, a1, b1, a2, b2), eps=1e-6, atol=1e-7, rtol=1e-6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _step(cfg: ModelConfig, mode: str, tokens: torch.Tensor, autocast: bool = False):
    torch.manual_seed(0)
    model = apply_activation_mode(Llama(cfg), mode)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _worst_gradient_error(cfg: ModelConfig, mode: str, tokens: torch.Tensor, autocast: bool):
    """(mode's loss, autograd's loss, worst relative gradient error of `mode` against autograd, its name)."""
    ref_loss, ref = _step(cfg, "none", tokens, autocast)
    loss, grads = _step(cfg, mode, tokens, autocast)
    assert sorted(grads) == sorted(ref)
    errors = {n: rel_err(grads[n], ref[n]) for n in ref}
    worst = max(errors, key=errors.get)
    return loss, ref_loss, errors[worst], worst


def _fp32_case():
    return REALISTIC, torch.randint(0, REALISTIC.vocab_size, (2, 129), generator=torch.Generator().manual_seed(2))


def _bf16_case():
    return TINY, torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))


def test_selective_and_full_match_autograd_float32_realistic_shapes():
    cfg, tokens = _fp32_case()
    for mode in ("selective", "full"):
        loss, ref_loss, error, worst = _worst_gradient_error(cfg, mode, tokens, autocast=False)
        assert abs(loss - ref_loss) <= FP32_REL_TOL * abs(ref_loss), mode
        assert error <= FP32_REL_TOL, (mode, worst, error)


def test_selective_under_bf16_autocast_tracks_autograd():
    cfg, tokens = _bf16_case()
    loss, ref_loss, error, worst = _worst_gradient_error(cfg, "selective", tokens, autocast=True)
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    assert error <= BF16_GRAD_REL_TOL, (worst, error)


def _rms_norm_backward_without_projection(dy, x, normed, rstd, weight, need_weight_grad):
    """A plausible bug: dx = rstd * dn, dropping the term -rstd * n * mean(dn * n) that keeps dx orthogonal
    to the normalised input."""
    dy = dy.to(torch.promote_types(normed.dtype, weight.dtype))
    dweight = (dy * normed).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype) if need_weight_grad else None
    dn = (dy * weight).to(normed.dtype).float()
    return (rstd * dn).to(x.dtype), dweight


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_wrong_rms_norm_backward_fails_the_comparisons(monkeypatch, precision):
    """The tolerances above catch a wrong backward: the layer module's RMSNorm backward (looked up as a
    module global, as compile_elementwise replaces it) is swapped for one without its projection term."""
    import llama_pt.blocks.selective as layer_backward
    monkeypatch.setattr(layer_backward, "rms_norm_backward", _rms_norm_backward_without_projection)
    cfg, tokens = _fp32_case() if precision == "fp32" else _bf16_case()
    _, _, error, worst = _worst_gradient_error(cfg, "selective", tokens, autocast=precision == "bf16")
    assert error > (FP32_REL_TOL if precision == "fp32" else BF16_GRAD_REL_TOL) * 3, (worst, error)


def test_modes_switch_block_classes_and_validate():
    model = Llama(TINY)
    assert all(type(layer) is SelectiveBlock for layer in apply_activation_mode(model, "selective").layers)
    assert all(type(layer) is CheckpointedBlock for layer in apply_activation_mode(model, "full").layers)
    assert all(type(layer) is TransformerBlock for layer in apply_activation_mode(model, "none").layers)
    with pytest.raises(ConfigError, match="model.activation='some'"):
        apply_activation_mode(model, "some")
    with pytest.raises(ValueError, match="call parallelize"):
        apply_activation_mode(model, "selective", types.SimpleNamespace(tp_size=2))


def test_inference_and_kv_cache_paths_equal_the_plain_block():
    from llama_pt.generate import generate
    tokens = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    plain = Llama(TINY)
    with torch.no_grad():
        want_logits = plain(tokens)
    want = generate(plain, [tokens[0].tolist()], max_new_tokens=5, temperature=0.0)
    for mode in ("selective", "full"):
        apply_activation_mode(plain, mode)
        with torch.no_grad():
            assert torch.equal(plain(tokens), want_logits)
        assert generate(plain, [tokens[0].tolist()], max_new_tokens=5, temperature=0.0) == want
        apply_activation_mode(plain, "none")


def _train(mode: str, steps: int = 50) -> list[float]:
    torch.manual_seed(0)
    model = apply_activation_mode(Llama(TINY), mode)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 33), generator=data)  # 64 of the 256 ids: learnable
        loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def test_fifty_training_steps_selective_and_full_follow_none():
    """Same losses at every step to 1e-5 relative (fp32; measured: selective ~2e-7, full bitwise equal),
    and the model learns."""
    none, selective, full = _train("none"), _train("selective"), _train("full")
    assert none[-1] < none[0] - 1.0
    for step, (a, b, c) in enumerate(zip(none, selective, full)):
        assert abs(a - b) <= 1e-5 * abs(a) and abs(a - c) <= 1e-5 * abs(a), (step, a, b, c)
