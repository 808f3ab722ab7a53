"""Adapters on a frozen base model (QLoRA, Dettmers et al. 2023): the NF4 storage of the frozen linear layers.

- nf4.py   NF4 quantisation with double quantisation (bitsandbytes' layout and rounding, in PyTorch),
           its storage bytes, and NF4Linear, the frozen layer that dequantises W to the compute dtype
"""
from .nf4 import (NF4_BYTES_PER_PARAMETER, NF4Linear, NF4Weight, dequantize_nf4, nf4_storage_bytes,
                  quantize_nf4)

__all__ = ["NF4Linear", "NF4Weight", "NF4_BYTES_PER_PARAMETER", "dequantize_nf4", "nf4_storage_bytes",
           "quantize_nf4"]
