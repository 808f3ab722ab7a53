"""4-bit NormalFloat (NF4) weights with double quantisation, and the frozen linear layer that computes with them.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314), Sec. 3:

- **4-bit NormalFloat.** A weight matrix is flattened and cut into blocks of 64; each block is divided by its
  absolute maximum (its quantisation constant, fp32) and every value is replaced by the nearest of the 16 NF4
  levels, quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (Eq. 4; the values in Appendix E).
- **Double quantisation.** The fp32 constants c2 (one per 64 weights, 0.5 bits per parameter) are themselves
  quantised: their mean is subtracted ("since the c2 are positive, we subtract the mean ... to center the
  values around zero"), and they are cut into blocks of 256 whose values become 8-bit codes with one fp32
  constant c1 per block: 8/64 + 32/(64 * 256) = 0.127 bits per parameter instead of 0.5.
- **QLoRA** (Eq. 5, 6): storage in NF4, computation in BFloat16: W is dequantised to the compute dtype
  whenever it is used, and only the adapters get weight gradients.

The layout and the rounding are bitsandbytes' (0.50.x, bitsandbytes/functional.py `quantize_4bit` with
`compress_statistics=True`, `quant_type="nf4"`, blocksize 64; the nested `quantize_blockwise` with blocksize
256), written here in PyTorch and checked element for element against its CPU backend (tests/test_nf4.py; its
CUDA kernels were not available to compare):

- codes are packed two per byte, the first element of each pair in the high nibble; an odd element count
  is padded with one zero code. The last block of 64 may be short and has its own absolute maximum.
- a value x of a block with absolute maximum m gets code bucketize(x * (1/m), midpoints) (x / m for the
  short last block), the midpoints being the float32 averages of adjacent NF4 levels; a value exactly on
  a midpoint takes the lower level (bitsandbytes' default 4-bit kernel, which its CPU backend runs).
- the 8-bit codes of the nested constants index bitsandbytes' signed dynamic map (`create_dynamic_map`:
  256 values, the paper's "8-bit Floats"); bitsandbytes' CPU kernel rounds through a 65536-entry table over
  [-1, 1] (csrc/cpu_ops.cpp, `quantize_cpu_impl`): the scaled value v selects entry
  trunc((v + 1) / 2 * 65535 + 0.5), which holds the level nearest to that entry's grid point. That is not
  always the level nearest to v itself (the dynamic map's levels near zero are closer together than
  the grid), and it is what `double_quantize` reproduces; a block of 256 whose maximum is 0 gets code 0.
- dequantisation: level * constant in float32, then one rounding to the output dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_BLOCK = 64          # weights per fp32 quantisation constant c2 (QLoRA Sec. 3, "blocksize of 64 for W")
ABSMAX_BLOCK = 256      # constants c2 per second-level constant c1 ("a blocksize of 256 for c2")
DEQUANTIZE_CHUNK = 1 << 20  # elements dequantised at a time: float32 temporaries of at most 16 MiB

# The 16 NF4 levels (QLoRA Appendix E), as bitsandbytes' get_4bit_type("nf4") holds them in float32.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2

# Storage per parameter of a large matrix: the 4-bit code, one 8-bit c2 per 64 weights, one fp32 c1 per
# 64 * 256 weights (QLoRA Sec. 3: 4 + 8/64 + 32/(64*256) = 4.127 bits = 0.515869140625 bytes).
NF4_BYTES_PER_PARAMETER = 1 / 2 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * ABSMAX_BLOCK)


def nf4_storage_bytes(numel: int) -> int:
    """Bytes a matrix of `numel` weights occupies in NF4 with double quantisation, padding included:
    ceil(n/2) packed codes (two per byte, an odd count padded), ceil(n/64) 8-bit constants c2 (a short last
    block has its own), 4 ceil(ceil(n/64)/256) bytes of fp32 constants c1, and the fp32 mean offset of c2."""
    blocks = -(-numel // NF4_BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // ABSMAX_BLOCK) + 4


def dequantize_bytes(numel: int, element_bytes: int) -> int:
    """Memory `dequantize_nf4` allocates for a matrix of `numel` weights, at most: the result (element_bytes
    each), and the temporaries counted from its code: per element of one chunk of DEQUANTIZE_CHUNK the
    unpacked codes (1 B), their int32 indices (4 B, freed once looked up), the looked-up levels (4 B), their
    block-padded copy (4 B) and the scaled float32 values (4 B), at most 16 B alive; per block constant
    the codes' int32 indices, the looked-up, padded and scaled float32 values and the result (20 B)."""
    return numel * element_bytes + 16 * min(numel, DEQUANTIZE_CHUNK) + 20 * -(-numel // NF4_BLOCK)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)`, with its own float32 arithmetic: for e = 0..6, the midpoints of 2^e + 1 points evenly
    spaced in [0.1, 1], times +-10^(e-6); plus 0 and 1; sorted (256 values in [-0.993, 1])."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


def _dynamic_map_table() -> torch.Tensor:
    """For each of the 65536 grid points -1 + 2i/65535, the index of the dynamic-map level nearest to it
    (the number of level midpoints below it): bitsandbytes' CPU `build_quantize_lut`."""
    midpoints = 0.5 * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


DYNAMIC_MAP_TABLE = _dynamic_map_table()


class NF4Weight(NamedTuple):
    """A matrix in NF4 with double quantisation (what bitsandbytes keeps in `quant_state` plus the data)."""
    packed: torch.Tensor          # uint8 [ceil(n/2)]: two 4-bit codes per byte, the first in the high nibble
    absmax_codes: torch.Tensor    # uint8 [ceil(n/64)]: the constants c2 - offset, as dynamic-map codes
    absmax_scales: torch.Tensor   # float32 [ceil(ceil(n/64)/256)]: c1, the absolute maximum of each 256 block
    absmax_offset: torch.Tensor   # float32 []: the mean of c2, subtracted before the second quantisation
    shape: torch.Size


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: (packed NF4 codes, the fp32 absolute maximum of each block of 64), as bitsandbytes'
    `quantize_4bit` kernel computes them (see the module docstring for the rounding)."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % NF4_BLOCK
    blocks = flat[:full].view(-1, NF4_BLOCK)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, NF4_MIDPOINTS.to(scaled.device), out_int32=True).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level: (8-bit codes of absmax - mean, the fp32 absolute maximum of each block of 256, the mean),
    rounded as bitsandbytes' CPU `quantize_blockwise` kernel does (see the module docstring)."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    padded = F.pad(centred, (0, -n % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    scales = padded.abs().max(dim=-1)[0]
    inverse = torch.where(scales == 0, 0.0, 1.0 / scales).view(-1, 1)
    scaled = torch.clamp(padded * inverse, -1.0, 1.0)
    grid_index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)
    codes = DYNAMIC_MAP_TABLE.to(grid_index.device)[grid_index]
    codes = torch.where(scales.view(-1, 1) == 0, torch.zeros_like(codes), codes)
    return codes.view(-1)[:n].clone(), scales, offset


def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    """The constants c2 back in float32: dynamic-map level * c1, plus the offset (QLoRA Eq. 6, inner dequant)."""
    n = q.absmax_codes.numel()
    levels = DYNAMIC_MAP.to(q.absmax_codes.device)[q.absmax_codes.int()]
    padded = F.pad(levels, (0, -n % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    return (padded * q.absmax_scales.view(-1, 1)).view(-1)[:n] + q.absmax_offset


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """`weight` (any shape, float32/bfloat16/float16) in NF4 with double quantisation."""
    packed, absmax = quantize_blocks(weight)
    codes, scales, offset = double_quantize(absmax)
    return NF4Weight(packed, codes, scales, offset, weight.shape)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight back in `dtype` (QLoRA Eq. 6: doubleDequant), DEQUANTIZE_CHUNK elements at a time so that
    the float32 temporaries stay small beside the result."""
    absmax = dequantize_absmax(q)
    levels = NF4_LEVELS.to(q.packed.device)
    n = q.shape.numel()
    out = torch.empty(n, dtype=dtype, device=q.packed.device)
    for start in range(0, n, DEQUANTIZE_CHUNK):  # DEQUANTIZE_CHUNK is a multiple of the block and even
        stop = min(start + DEQUANTIZE_CHUNK, n)
        byte = q.packed[start // 2:(stop + 1) // 2]
        codes = torch.stack((byte >> 4, byte & 0xF), dim=-1).view(-1)
        values = levels[codes.int()]
        values = F.pad(values, (0, -values.numel() % NF4_BLOCK)).view(-1, NF4_BLOCK)
        scaled = values * absmax[start // NF4_BLOCK:start // NF4_BLOCK + values.shape[0]].view(-1, 1)
        out[start:stop] = scaled.view(-1)[:stop - start]
    return out.view(q.shape)


class _FrozenNF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantised on use, in forward and again in backward, and never a gradient for W:
    nothing is saved for backward (the input gradient needs only W, and W has no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(layer.compute_dtype(x)))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out.matmul(ctx.layer.dequantize(grad_out.dtype)), None


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer stored in NF4 with double quantisation (QLoRA Sec. 3, Eq. 5 without
    the adapter term): forward is F.linear(x, W) with W dequantised to the compute dtype (x's dtype, or
    autocast's), and the layer has no parameters, so no gradient and no optimizer state for W.

    The quantised data are buffers (state_dict, .to(device)); the fp32 constants are kept as their int32
    bit patterns so that Module.to(dtype), which casts floating-point buffers, cannot round them.
    `adapter`: an optional low-rank update added to the output (QLoRA Eq. 5: the LoRA term, llama_pt.adapters.lora).
    """

    def __init__(self, q: NF4Weight):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax_codes", q.absmax_codes)
        self.register_buffer("absmax_scale_bits", q.absmax_scales.view(torch.int32))
        self.register_buffer("absmax_offset_bits", q.absmax_offset.view(1).view(torch.int32))
        self.adapter: Optional[nn.Module] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        if linear.bias is not None:
            raise ValueError("NF4Linear.from_linear: the layer has a bias (LLaMA's linear layers have none)")
        return cls(quantize_nf4(linear.weight))

    def quantized(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax_codes, self.absmax_scale_bits.view(torch.float32),
                         self.absmax_offset_bits.view(torch.float32)[0], torch.Size((self.out_features,
                                                                                      self.in_features)))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), dtype)

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        kind = x.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype

    def storage_bytes(self) -> int:
        """Bytes of the quantised data this layer holds (what nf4_storage_bytes predicts)."""
        return sum(b.untyped_storage().nbytes() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenNF4Matmul.apply(x, self)
        return y if self.adapter is None else y + self.adapter.up(self.adapter.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 double-quantised"
