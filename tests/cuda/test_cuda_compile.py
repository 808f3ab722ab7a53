"""torch.compile of the hand-written layer's elementwise pieces (RMSNorm, RoPE, SwiGLU, forward and
backward: llama_pt.blocks.selective.compile_elementwise) on a CUDA GPU: compiled equals eager.

Tolerance for bf16 inputs, u = 2^-8: eager rounds every intermediate bf16 result, while a fused kernel
evaluates the chain in float32 and rounds once when it stores. Each piece has at most two bf16
intermediates before its result (swiglu: silu(a), then the product; rms_norm_backward: dy * weight,
then dx), each a relative change of at most u, and these functions are well conditioned on random data
(measured: evaluating them without the intermediate roundings moves the results by <= 0.74u norm-wise),
so compiled and eager agree to COMPILE_RTOL = 2u norm-wise. The compiled layer inside a training step
is held to the layer's own tolerances (cuda_tolerances).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_tolerances import LAYER_GRAD_RTOL, LAYER_LOSS_RTOL, U_BF16, rel_err
from llama_pt.model import Llama, ModelConfig
from llama_pt.model.llama import rope_tables
from llama_pt.blocks import selective as layer_backward
from llama_pt.blocks import apply_activation_mode

pytestmark = pytest.mark.cuda

COMPILE_RTOL = 2 * U_BF16
CFG = ModelConfig(dim=512, n_heads=8, n_kv_heads=2, n_layers=2, vocab_size=1024, multiple_of=64, max_seq_len=512)


def _arguments(name: str) -> tuple:
    """bf16 activations and float32 parameters/tables, as the layer passes them under autocast."""
    g = torch.Generator().manual_seed(0)
    b, s, heads, head_dim, dim, ffn = 2, 256, 8, 64, 512, 1536

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).cuda()
    x, weight, dy = rand(b, s, dim), 1 + 0.1 * rand(dim, dtype=torch.float32), rand(b, s, dim)
    cos, sin = (t[:s].cuda() for t in rope_tables(head_dim, s, 10000.0))
    a, up, dp = rand(b, s, ffn), rand(b, s, ffn), rand(b, s, ffn)
    if name == "rms_norm":
        return x, weight, 1e-6
    if name == "rms_norm_backward":
        _, normed, rstd = layer_backward.rms_norm(x, weight, 1e-6)
        return dy, x, normed, rstd, weight, True
    if name in ("apply_rope", "rope_backward"):
        return rand(b, s, heads, head_dim), cos, sin
    return (a, up) if name == "swiglu" else (dp, a, up)


@pytest.mark.parametrize("name", layer_backward._ELEMENTWISE)
def test_compiled_piece_equals_eager(name):
    eager = getattr(layer_backward, name)
    assert name not in layer_backward._COMPILED, "another test left compiled pieces installed"
    args = _arguments(name)
    want = eager(*args)
    got = torch.compile(eager, dynamic=False)(*args)
    want, got = (w if isinstance(w, tuple) else (w,) for w in (want, got))
    assert len(got) == len(want)
    for i, (g_, w_) in enumerate(zip(got, want)):
        if w_ is None:
            assert g_ is None
            continue
        assert g_.dtype == w_.dtype and g_.shape == w_.shape, (name, i)
        assert rel_err(g_, w_) <= COMPILE_RTOL, f"{name} result {i}: {rel_err(g_, w_):.2e} norm-wise relative"


def _selective_step(tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = apply_activation_mode(Llama(CFG).cuda(), "selective")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_compile_elementwise_training_step_equals_eager(monkeypatch):
    """compile_elementwise() swaps the module's functions process-wide; monkeypatch puts the eager ones back."""
    tokens = torch.randint(0, CFG.vocab_size, (2, 257), generator=torch.Generator().manual_seed(2)).cuda()
    ref_loss, ref = _selective_step(tokens)
    for name in layer_backward._ELEMENTWISE:
        monkeypatch.setattr(layer_backward, name, getattr(layer_backward, name))
    monkeypatch.setattr(layer_backward, "_COMPILED", {})
    layer_backward.compile_elementwise()
    assert all(getattr(layer_backward, n) is layer_backward._COMPILED[n] for n in layer_backward._ELEMENTWISE)
    loss, grads = _selective_step(tokens)
    assert abs(loss - ref_loss) <= LAYER_LOSS_RTOL * abs(ref_loss), (loss, ref_loss)
    errors = {n: rel_err(grads[n], ref[n]) for n in ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= LAYER_GRAD_RTOL, f"{worst}: gradient differs by {errors[worst]:.2e} (norm-wise relative)"
