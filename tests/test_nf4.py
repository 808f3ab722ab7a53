"""NF4 with double quantisation (llama_pt.adapters.nf4) against bitsandbytes, element for element; the frozen
NF4Linear under autograd; the storage bytes of a model's frozen base against the formula."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama_pt.adapters.nf4 import (DYNAMIC_MAP, NF4_BYTES_PER_PARAMETER, NF4_LEVELS, NF4_MIDPOINTS, NF4Linear,
                                   dequantize_absmax, dequantize_nf4, double_quantize, nf4_storage_bytes,
                                   quantize_blocks, quantize_nf4)
from llama_pt.model import Llama, get_preset
from llama_pt.model.module_plan import apply_module_plan

bnb = pytest.importorskip("bitsandbytes.functional")


def bnb_nf4(weight):
    """bitsandbytes' NF4 with double quantisation (QLoRA's setting) and its dequantisation."""
    packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed, state, bnb.dequantize_4bit(packed, state, quant_type="nf4")


def realistic(shape, seed):
    """A weight as trained LLMs have them: heavy-tailed (Student-t, 3 degrees of freedom), rows of different
    scale, a few outlier input features 20x larger (Dettmers et al. 2022, LLM.int8()), one zero block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample(shape) * 0.01
    w *= torch.rand(shape[0], 1, generator=g) + 0.5
    w[:, torch.randint(0, shape[1], (3,), generator=g)] *= 20
    w.view(-1)[64:128] = 0
    return w


# Row lengths that are whole blocks, shapes with a short last block (numel % 64 != 0), odd element counts.
SHAPES = [(768, 768), (2048, 768), (256, 2048), (33, 65), (7, 13), (100, 3), (3, 100), (1, 64), (5, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "realistic"])
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_dequantised_weights_equal_bitsandbytes(shape, kind, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02 if kind == "normal" else realistic(shape, seed=1)).to(dtype)
    packed, state, theirs = bnb_nf4(w)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax_codes, state.absmax)
    assert torch.equal(q.absmax_scales, state.state2.absmax)
    assert torch.equal(q.absmax_offset, state.offset)
    ours = dequantize_nf4(q, dtype)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_rows_of_partial_blocks_equal_bitsandbytes_portable_kernel():
    """(96, 80): rows of 80 are not whole blocks. The codes equal bitsandbytes'; its AVX-512 CPU dequantisation
    indexes the block constants per row (absmax[row * (80 // 64) + column // 64]), which is right only for
    rows of whole blocks, so the reference here is bitsandbytes' portable kernel, which its CPU backend runs
    for odd rows and other CPUs run for all."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    w = torch.randn(96, 80) * 0.02
    packed, state, _ = bnb_nf4(w)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax_codes, state.absmax)
    absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    theirs = _dequantize_4bit_compute(packed.view(-1), absmax, NF4_LEVELS, 64, (96, 80), torch.float32)
    assert torch.equal(dequantize_nf4(q, torch.float32), theirs)


def test_tables_are_bitsandbytes_tables_and_the_normal_quantiles():
    assert torch.equal(NF4_LEVELS, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP, bnb.create_dynamic_map())
    # QLoRA Sec. 3 / bitsandbytes create_normal_map(offset=0.9677083): 8 positive and 7 negative quantiles of
    # N(0, 1) at probabilities evenly spaced from the offset to 1/2, normalised to [-1, 1], and an exact zero.
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    torch.testing.assert_close(NF4_LEVELS.double(), levels / levels.max(), rtol=0, atol=1e-6)


def test_wrong_variants_differ_from_bitsandbytes():
    """The parity above is sharp: each plausible deviation from bitsandbytes' rules gives other numbers."""
    w = realistic((512, 1024), seed=2)
    _, _, theirs = bnb_nf4(w)
    packed, absmax = quantize_blocks(w)
    codes, scales, offset = double_quantize(absmax)
    q = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(q, torch.float32), theirs)
    # (1) no double quantisation: the fp32 constants themselves.
    single = NF4_LEVELS[torch.stack((packed >> 4, packed & 15), -1).view(-1).long()].view(-1, 64) * absmax[:, None]
    assert not torch.equal(single.view(w.shape), theirs)
    # (2) the nested constants rounded to the nearest dynamic-map level instead of through bitsandbytes' table.
    centred = (absmax - offset).view(-1, 256)
    nearest = torch.bucketize(centred / scales[:, None], (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2).to(torch.uint8)
    assert not torch.equal(nearest.view(-1), codes)
    assert not torch.equal(dequantize_nf4(q._replace(absmax_codes=nearest.view(-1)), torch.float32), theirs)
    # (3) a value exactly on a midpoint between two levels rounded up instead of down.
    ties = torch.cat([NF4_MIDPOINTS, torch.ones(1)]).repeat(4)[:64].view(1, 64)  # absmax 1: scaled == value
    tie_codes = bnb_nf4(ties)[0]
    assert torch.equal(quantize_nf4(ties).packed, tie_codes.view(-1))
    up = torch.bucketize(ties.view(-1), NF4_MIDPOINTS, right=True).to(torch.uint8)
    assert not torch.equal((up[0::2] << 4) | up[1::2], tie_codes.view(-1))


def test_nested_constants_round_trip():
    w = realistic((256, 512), seed=3)
    _, absmax = quantize_blocks(w)
    q = quantize_nf4(w)
    assert (dequantize_absmax(q) - absmax).abs().max() <= q.absmax_scales.max() / 100  # 8-bit dynamic map


def test_nf4_linear_forward_is_linear_with_the_dequantised_weight():
    torch.manual_seed(0)
    linear = nn.Linear(192, 96, bias=False)
    layer = NF4Linear.from_linear(linear)
    _, _, w = bnb_nf4(linear.weight.detach())
    x = torch.randn(2, 5, 192)
    assert torch.equal(layer(x), F.linear(x, w))
    assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x.bfloat16(), w.bfloat16()))
    with pytest.raises(ValueError, match="bias"):
        NF4Linear.from_linear(nn.Linear(4, 4))


def test_nf4_linear_keeps_no_gradient_for_w_and_saves_nothing_for_backward():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    w = layer.dequantize(torch.float32)
    assert list(layer.parameters()) == []             # nothing for an optimizer, nothing to get a .grad
    assert not any(b.requires_grad for b in layer.buffers())
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []                                # dL/dx = g W re-dequantises W; W itself has no gradient
    # the graph leads from y to x alone
    (node, _), = [(n, i) for n, i in y.grad_fn.next_functions if n is not None]
    assert node.variable is x
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g @ w)
    # what a plain frozen linear with the dequantised weight would keep: the weight itself (not x)
    frozen = w.clone()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.linear(x, frozen)
    assert [t.untyped_storage().data_ptr() for t in saved] == [frozen.untyped_storage().data_ptr()]


def test_dtype_casts_leave_the_quantised_weight_exact():
    layer = NF4Linear.from_linear(nn.Linear(64, 320, bias=False))
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(torch.float32), before)
    clone = NF4Linear(quantize_nf4(torch.zeros(320, 64)))
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.dequantize(torch.float32), before)


def test_frozen_base_bytes_of_llama_125m_equal_the_formula():
    """Every projection of llama_125m's 12 layers (85M weights) in NF4: the bytes of the tensors held equal
    sum nf4_storage_bytes(n) exactly, and per weight 0.5 + 1/64 + 4/(64*256) bytes within 1%."""
    cfg = get_preset("llama_125m")
    torch.manual_seed(0)
    model = Llama(cfg)
    names = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    numels = [model.get_submodule(f"layers.0.{n}").weight.numel() for n in names] * cfg.n_layers
    apply_module_plan(model, [(f"layers.*.{n}", lambda _, m: NF4Linear.from_linear(m)) for n in names])
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 7 * cfg.n_layers
    measured = sum(m.storage_bytes() for m in layers)
    assert measured == sum(nf4_storage_bytes(n) for n in numels)
    per_weight = measured / sum(numels)
    assert abs(per_weight / NF4_BYTES_PER_PARAMETER - 1) < 0.01
    assert NF4_BYTES_PER_PARAMETER * 8 == pytest.approx(4.127, abs=5e-4)  # QLoRA Sec. 3: 4 + 0.127 bits
    logits = model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("numel", [1, 2, 63, 64, 65, 64 * 256, 64 * 256 + 1, 768 * 768, 4096 * 1100 + 7, 33 * 65])
def test_storage_formula_counts_the_padding(numel):
    q = quantize_nf4(torch.randn(numel))
    held = sum(t.untyped_storage().nbytes() for t in (q.packed, q.absmax_codes, q.absmax_scales, q.absmax_offset))
    assert held == nf4_storage_bytes(numel)
