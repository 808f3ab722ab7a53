"""The attention kernels on a CUDA GPU in bf16: output, log-sum-exp and gradients against the math reference.

The reference is the `math` kernel (llama_pt.ops.attention_kernels) run in float64 on the same bf16
inputs, which float64 holds exactly: its own error is negligible next to the bounds below.

Error model, u = 2^-8 (cuda_tolerances.U_BF16), heads-first layout, scale = d^-1/2, P the causal softmax,
D = rowsum(dO * O), dS = P (dP - D). Products of bf16 numbers are exact in float32 and the kernels
accumulate in float32 (relative error ~ n 2^-24 for n <= 256 terms, three orders below u: neglected).
What remains are roundings to bf16, each a relative change of at most u:

1. Worst case, assuming nothing about which intermediates a kernel keeps in bf16 -- each of P (before
   P V and P^T dO), O, dP, D and dS (before dS K and dS^T Q) rounded once, every result rounded once,
   the sum over a query group (grouped-query attention) rounded once -- carried through the sums with
   absolute values, bounds every element of the error:
     O  <= 2u P|V|                          dV <= 3u sum_group(P^T |dO|)
     dQ <= scale E_dS |K|                   dK <= scale sum_group(E_dS^T |Q|)
     E_dS = P (u|dP| + u|D| + dD) + 3u|dS|, dD = rowsum(|dO| * bound(O))
   The tests allow 2x (second-order terms, the neglected float32 sums). Rigorous but loose where the
   sums cancel (dS has rows that sum to zero): it catches gross errors in single elements.
2. Root-sum-square, for the roundings the flash and memory-efficient kernels make (P, the output O that
   D is computed from, dS, the results and the group sums; dP and D stay in float32): round-to-nearest
   errors are modelled as independent with variance u^2/3 relative, and their effect on each output is
   summed in quadrature, e.g. var(dO_ic) = u^2/3 (sum_j P_ij^2 V_jc^2 + O_ic^2). Over ~10^5 elements
   the norm of the error concentrates at sqrt(sum of variances) =: RSS; with the CPU kernels
   (cpu_flash, math) the measured ratio error/RSS is 0.4-1.2. The tests allow 3x RSS: room for a kernel
   that rounds one intermediate more, while RSS is ~0.5% of the reference's norm, so a wrong scale,
   mask, log-sum-exp or head grouping (an error of O(1) relative) fails by two orders of magnitude.

The log-sum-exp is computed in float32 from exact bf16 inputs: the scores err by at most
d 2^-24 scale sum|q k| (< 1e-4 for d = 128 and unit-variance inputs), the sum of s <= 256 exponentials
by s 2^-24 relative. LSE_ATOL = 1e-3 covers that tenfold and is a quarter of u: an lse rounded to bf16
(error u |lse| ~ 2e-2 here) fails, and so does a mask that lets row i see one key too many or too few
(which moves its lse by about 1/i, more than 1e-3 for every row of these sequences).
"""
from __future__ import annotations

import pytest
import torch

from cuda_tolerances import U_BF16
from llama_pt.ops.attention import xformers_available
from llama_pt.ops.attention_kernels import attention_backward, attention_forward, select_kernel

pytestmark = pytest.mark.cuda

WORST_CASE_MARGIN = 2.0
RSS_MARGIN = 3.0
LSE_ATOL = 1e-3
SEQ = 200  # not a multiple of the kernels' 32/64/128-row blocks: the ragged tail is exercised
KERNELS = ["cuda_flash", "cuda_efficient", "math", "xformers"]


def _inputs(heads: int, kv: int, head_dim: int, signed: bool):
    """q, k, v, dO in bf16 on the GPU, [2, SEQ, heads or kv, head_dim]; v and dO non-negative unless signed."""
    g = torch.Generator().manual_seed(heads * 1000 + kv * 100 + head_dim + signed)

    def make(h: int, positive: bool) -> torch.Tensor:
        x = torch.randn(2, SEQ, h, head_dim, generator=g)
        return (x.abs() if positive else x).to(torch.bfloat16).cuda()
    return make(heads, False), make(kv, False), make(kv, not signed), make(heads, not signed)


def _group_sum(x: torch.Tensor, kv: int) -> torch.Tensor:
    """[b, h, s, d] per query head -> [b, s, kv, d]: summed over each kv head's query group."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, kv, h // kv, d).sum(3)


def _error_model(q, k, v, g) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Elementwise worst-case bounds ([b, s, heads, d] like the kernels' results) and RSS norms of the
    module docstring, from float64 intermediates."""
    kv, n_rep = k.shape[2], q.shape[2] // k.shape[2]
    q, k, v, g = (t.double().transpose(1, 2) for t in (q, k, v, g))
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    u, w, scale, s = U_BF16, U_BF16 ** 2 / 3, q.shape[-1] ** -0.5, q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    pt = p.transpose(-1, -2)
    out = p @ v
    dp = g @ v.transpose(-1, -2)
    d_row = (g * out).sum(-1, keepdim=True)
    ds = p * (dp - d_row)
    dq, dk, dv = scale * (ds @ k), scale * (ds.transpose(-1, -2) @ q), pt @ g

    worst_out = 2 * u * (p @ v.abs())
    e_ds = p * (u * dp.abs() + u * d_row.abs() + (g.abs() * worst_out).sum(-1, keepdim=True)) + 3 * u * ds.abs()
    worst = {"out": worst_out.transpose(1, 2),
             "dq": (scale * (e_ds @ k.abs())).transpose(1, 2),
             "dk": _group_sum(scale * (e_ds.transpose(-1, -2) @ q.abs()), kv),
             "dv": _group_sum(3 * u * (pt @ g.abs()), kv)}

    var_out = w * ((p * p) @ (v * v) + out * out)
    var_d = (g * g * var_out).sum(-1, keepdim=True)  # D from the rounded output
    var_dq = scale ** 2 * (var_d * (p @ k) ** 2 + w * ((ds * ds) @ (k * k))) + w * dq * dq
    var_dk = scale ** 2 * ((p * p).transpose(-1, -2) @ (var_d * q * q) + w * ((ds * ds).transpose(-1, -2) @ (q * q)))
    var_dv = w * ((p * p).transpose(-1, -2) @ (g * g))
    rss = {"out": var_out.sum().sqrt().item(), "dq": var_dq.sum().sqrt().item()}
    for name, var, full in (("dk", var_dk, dk), ("dv", var_dv, dv)):  # + per-head result and group-sum roundings
        rss[name] = (_group_sum(var + w * full * full, kv).sum() + w * (_group_sum(full, kv) ** 2).sum()).sqrt().item()
    return worst, rss


def _check(name: str, got: torch.Tensor, want: torch.Tensor, worst: torch.Tensor, rss: float) -> None:
    err = got.double() - want
    ratio = (err.abs() / worst.clamp_min(1e-30)).max().item()
    assert ratio <= WORST_CASE_MARGIN, f"{name}: an element errs by {ratio:.2f} x its worst-case bf16 bound"
    norm_ratio = err.norm().item() / rss
    assert norm_ratio <= RSS_MARGIN, f"{name}: error norm is {norm_ratio:.2f} x the rounding model's RSS"


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "positive_v_do"])
@pytest.mark.parametrize("heads, kv, head_dim", [(8, 8, 64), (8, 2, 64), (8, 2, 128), (4, 1, 128)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_kernel_within_its_rounding_bounds(kernel, heads, kv, head_dim, signed):
    if kernel == "xformers" and not xformers_available():
        pytest.skip("xformers is not importable on this machine (optional: the sdpa kernels are the default path)")
    q, k, v, g = _inputs(heads, kv, head_dim, signed)
    exact = [t.double() for t in (q, k, v)]
    ref_state = attention_forward(*exact, "math")
    ref_grads = attention_backward(g.double(), *exact, ref_state)
    worst, rss = _error_model(q, k, v, g)

    state = attention_forward(q, k, v, kernel)
    assert state.out.dtype == torch.bfloat16 and state.out.shape == q.shape
    assert state.lse.dtype == torch.float32 and state.lse.shape[:2] == (2, heads) and state.lse.shape[2] >= SEQ
    lse_err = (state.lse[..., :SEQ].double() - ref_state.lse).abs().max().item()
    assert lse_err <= LSE_ATOL, f"log-sum-exp off by {lse_err:.2e} (> {LSE_ATOL})"
    _check("out", state.out, ref_state.out, worst["out"], rss["out"])

    grads = attention_backward(g, q, k, v, state)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        _check(name, got, want, worst[name], rss[name])


def test_select_kernel_on_this_gpu():
    """bf16 with LLaMA's head sizes takes the flash kernel on sm80 and newer; float32 the memory-efficient one."""
    device = torch.device("cuda")
    want_half = "cuda_flash" if torch.cuda.get_device_capability(device) >= (8, 0) else "cuda_efficient"
    assert select_kernel("sdpa", device, torch.bfloat16, 64) == want_half
    assert select_kernel("sdpa", device, torch.bfloat16, 128) == want_half
    assert select_kernel("sdpa", device, torch.float32, 64) == "cuda_efficient"
    if xformers_available():
        assert select_kernel("xformers", device, torch.bfloat16, 64) == "xformers"
    else:
        with pytest.raises(ValueError, match="xformers"):
            select_kernel("xformers", device, torch.bfloat16, 64)
