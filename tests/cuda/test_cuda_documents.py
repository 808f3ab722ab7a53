"""Document masks on a CUDA GPU in bf16: flash attention's variable-length kernel, the memory-efficient kernel
with an additive bias, xformers' BlockDiagonalCausalMask (each where present) and the plain model path, against
the `math` kernel in float64 on the same bf16 inputs and documents.

Tolerance: the norm of the error relative to the reference's, 2e-2 for outputs and gradients. Rounding to bf16
(u = 2^-8, RMS u / sqrt(3) = 2.3e-3 per rounding, a handful in quadrature) stays below 1e-2; a query that sees
one document too many or too few, or a wrong position in the flattened batch, errs by O(1). The log-sum-exp
(float32 from exact bf16 inputs) within 1e-3, as in test_cuda_attention.py.
"""
from __future__ import annotations

import pytest
import torch

from llama_pt.ops.attention import causal_attention, xformers_available
from llama_pt.ops.attention_kernels import attention_backward, attention_forward, select_kernel
from llama_pt.ops.documents import DocumentMask

pytestmark = pytest.mark.cuda

LENGTHS = [[37, 1, 100, 62], [200]]
REL_TOL, LSE_ATOL = 2e-2, 1e-3


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 200, h, 64, generator=g).to(torch.bfloat16).cuda() for h in (8, 2, 2, 8))
    documents = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in LENGTHS]).cuda()
    return q, k, v, grad, DocumentMask(documents)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _lse_rows(lse: torch.Tensor, b: int, s: int, heads: int) -> torch.Tensor:
    """A kernel's log-sum-exp as [b, heads, s]: from [b, heads, s'], the flattened batch's [heads, b * s], or
    xformers' [1, heads, b * s']."""
    if lse.dim() == 2:
        return lse.view(heads, b, s).transpose(0, 1)
    if lse.shape[0] == 1 and b > 1:
        return lse[0, :, :b * s].reshape(heads, b, s).transpose(0, 1)
    return lse[..., :s]


@pytest.mark.parametrize("kernel", ["cuda_flash", "cuda_efficient", "xformers"])
def test_kernels_with_documents_match_math(kernel):
    q, k, v, grad, mask = _inputs()
    if kernel == "xformers" and not xformers_available():
        pytest.skip("xformers is not importable")
    if kernel == "cuda_flash" and select_kernel("sdpa", q.device, q.dtype, 64, documents=True) != "cuda_flash":
        pytest.skip("no variable-length flash attention for this GPU and torch")
    state = attention_forward(q, k, v, kernel, mask)
    ref = attention_forward(q.double(), k.double(), v.double(), "math", mask)
    assert _rel(state.out, ref.out) <= REL_TOL
    lse = _lse_rows(state.lse, 2, 200, 8)
    assert (lse.double() - ref.lse).abs().max().item() <= LSE_ATOL
    got = attention_backward(grad, q, k, v, state)
    want = attention_backward(grad.double(), q.double(), k.double(), v.double(), ref)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and _rel(a, b) <= REL_TOL, name


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_plain_path_with_documents(backend):
    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers is not importable")
    q, k, v, grad, mask = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*leaves, backend=backend, documents=mask)
    out.backward(grad)
    ref = attention_forward(q.double(), k.double(), v.double(), "math", mask)
    assert _rel(out, ref.out) <= REL_TOL
    want = attention_backward(grad.double(), q.double(), k.double(), v.double(), ref)
    for name, leaf, b in zip("qkv", leaves, want):
        assert _rel(leaf.grad, b) <= REL_TOL, name
