"""The hand-written layer (activation mode `selective`) against autograd (`none`) on a CUDA GPU.

Under bf16 autocast, the trainer's recipe on GPU, with the attention kernels the layer really selects
there (flash for bf16, xformers when importable); tolerances and their derivation in cuda_tolerances.
In float32 (no autocast; the memory-efficient kernel) both paths run the same kernels on the same
operands and differ by summation order only (~1e-6, as on CPU): FP32_RTOL = 1e-4 leaves a margin of
~100 and still sits three orders below any wrong term.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_tolerances import LAYER_GRAD_RTOL, LAYER_LOSS_RTOL, rel_err
from llama_pt.model import Llama, ModelConfig
from llama_pt.blocks import apply_activation_mode
from llama_pt.ops.attention import xformers_available
from llama_pt.blocks.selective import layer_spec

pytestmark = pytest.mark.cuda

# head_dim 64 and grouped kv heads, as in the LLaMA presets; two layers so a layer's input gradient matters.
CFG = ModelConfig(dim=512, n_heads=8, n_kv_heads=2, n_layers=2, vocab_size=1024, multiple_of=64, max_seq_len=512)
FP32_RTOL = 1e-4


def _step(mode: str, backend: str, tokens: torch.Tensor, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Llama(CFG).cuda()
    model.set_attention_backend(backend)
    apply_activation_mode(model, mode)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _tokens() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 257), generator=torch.Generator().manual_seed(2)).cuda()


def _kernel(backend: str, bf16: bool) -> str:
    block = apply_activation_mode(Llama(CFG), "selective").cuda().layers[0]
    block.attention.backend = backend
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        return layer_spec(block, torch.empty(1, device="cuda")).kernel


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_selective_matches_autograd_under_bf16_autocast(backend):
    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers is not importable on this machine (optional: sdpa is the default backend)")
    want_kernel = {"sdpa": "cuda_flash" if torch.cuda.get_device_capability() >= (8, 0) else "cuda_efficient",
                   "xformers": "xformers"}[backend]
    assert _kernel(backend, bf16=True) == want_kernel
    tokens = _tokens()
    ref_loss, ref = _step("none", backend, tokens, bf16=True)
    loss, grads = _step("selective", backend, tokens, bf16=True)
    assert abs(loss - ref_loss) <= LAYER_LOSS_RTOL * abs(ref_loss), (loss, ref_loss)
    assert sorted(grads) == sorted(ref)
    errors = {n: rel_err(grads[n], ref[n]) for n in ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= LAYER_GRAD_RTOL, f"{worst}: gradient differs by {errors[worst]:.2e} (norm-wise relative)"


def test_selective_matches_autograd_in_float32():
    assert _kernel("sdpa", bf16=False) == "cuda_efficient"
    tokens = _tokens()
    ref_loss, ref = _step("none", "sdpa", tokens, bf16=False)
    loss, grads = _step("selective", "sdpa", tokens, bf16=False)
    assert abs(loss - ref_loss) <= FP32_RTOL * abs(ref_loss), (loss, ref_loss)
    errors = {n: rel_err(grads[n], ref[n]) for n in ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FP32_RTOL, f"{worst}: gradient differs by {errors[worst]:.2e} (norm-wise relative)"
