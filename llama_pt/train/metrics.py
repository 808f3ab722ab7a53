"""Throughput and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the accelerator, with model FLOPs per token from
llama_pt.model.flops_per_token (6N plus the attention term) and the peak from the data-sheet table
llama_pt.plan.hardware.DENSE_BF16_PEAKS, matched by the exact device name. No peak is known for CPUs or
for GPUs missing from the table: MFU is then omitted.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..plan.hardware import device_peak


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    peak = device_peak(torch.cuda.get_device_name(device))
    return peak.dense_bf16_flops if peak else None


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int, peak: Optional[float]) -> Optional[float]:
    if peak is None:
        return None
    return tokens_per_second * flops_per_token / (n_devices * peak)
