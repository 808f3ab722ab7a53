"""Which arithmetic a run uses: bf16 autocast over fp32 master weights, or plain fp32 (train.precision).

``auto`` means bf16 on a CUDA GPU that has bf16 tensor cores (compute capability 8.0 and later: A100,
H100, L4, ...) and fp32 everywhere else, with the reason when a GPU falls back. ``bf16`` is refused on a
GPU without native bf16 (e.g. V100), where PyTorch would only emulate it; on CPU it runs bf16 autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError


@dataclass(frozen=True)
class Precision:
    bf16: bool
    note: Optional[str] = None  # why `auto` chose fp32 on a GPU

    @property
    def name(self) -> str:
        return "bf16 autocast, fp32 master weights" if self.bf16 else "fp32"


def resolve_precision(device: torch.device, precision: str) -> Precision:
    """train.precision (auto | bf16 | fp32, validated by the config) on `device`."""
    if device.type != "cuda":
        return Precision(bf16=precision == "bf16")
    if precision == "fp32":
        return Precision(bf16=False)
    if torch.cuda.is_bf16_supported(including_emulation=False):  # the current device
        return Precision(bf16=True)
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if precision == "bf16":
        raise ConfigError(f"train.precision=bf16: {gpu} has no native bf16; use train.precision=auto or fp32")
    return Precision(bf16=False, note=f"train.precision=auto chose fp32: {gpu} has no native bf16")
