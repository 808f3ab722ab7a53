"""The accelerators the planner knows: peak rates from data sheets, efficiencies from published measurements.

Every number has its source next to it (docs/planner.md repeats them with links). Peaks are the
vendors' dense (not sparse) bf16 tensor-core rates in `DENSE_BF16_PEAKS`, the one table the planner and
the trainer's MFU both read; a device is found by its exact name as `torch.cuda.get_device_name` reports
it, so an L40 is never taken for an L4, nor an H100 PCIe or NVL for the SXM part. The efficiencies turn
peaks into rates a training step actually gets:

- ``gemm_eff``: the Maximum Achievable Matmul FLOPS (MAMF) measured with bf16 `torch.matmul` over
  many shapes (S. Bekman, *Machine Learning Engineering*, compute/accelerator/README.md, "Maximum
  Achievable Matmul FLOPS comparison table": A100 SXM 267.9 of 312 TFLOP/s = 85.9%, H100 SXM 792.1 of
  989 = 80.1%, CUDA 12.1). These are best shapes, so an upper bound for a model's GEMMs.
- ``attn_eff``: fused causal attention, forward + backward. A100: FlashAttention-2 reaches 50-73% of
  peak (Dao 2023, arXiv:2307.08691, abstract); we take the low end, 50%. H100/H200: FlashAttention-2
  (what PyTorch SDPA's flash kernel is) reaches 35% (Shah et al. 2024, FlashAttention-3,
  arXiv:2407.08608, abstract).
- ``hbm_eff``, ``nvlink_eff``, ``ib_eff``: assumptions, not measurements of ours: unfused elementwise
  kernels stream at ~80% of HBM bandwidth; NCCL reaches ~80% of NVLink and ~90% of the InfiniBand
  line rate as bus bandwidth (nccl-tests' busbw convention).

Interconnect: NVLink per direction per GPU from the data sheets (NVLink 3: 600 GB/s total, NVLink 4:
900 GB/s total); InfiniBand per GPU as in NVIDIA's DGX systems, one NIC per GPU (DGX A100: HDR
200 Gb/s; DGX H100/H200: NDR 400 Gb/s). Llama 2's paper (Touvron et al. 2023b, Sec. 2.2.1) states
200 Gbps per endpoint for Meta's A100 clusters. Override with ``ib_gbps=`` on the command line.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

GB = 1e9
MIB = 1024 ** 2
GIB = 1024 ** 3


@dataclass(frozen=True)
class DevicePeak:
    """A GPU model's dense bf16 tensor-core peak, the device names CUDA reports for it, and the data sheet."""
    label: str
    device_names: tuple[str, ...]
    dense_bf16_flops: float
    source: str


# NVIDIA's data sheets give bf16 tensor-core rates "with sparsity" (2:4 structured); the dense rate is half.
DENSE_BF16_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 SXM", ("NVIDIA H100 80GB HBM3",), 989e12,
               "NVIDIA H100 Tensor Core GPU data sheet: H100 SXM BF16 1,979 TFLOPS with sparsity"),
    DevicePeak("H100 PCIe", ("NVIDIA H100 PCIe",), 756e12,
               "NVIDIA H100 Tensor Core GPU data sheet (2022): H100 PCIe BF16 1,513 TFLOPS with sparsity"),
    DevicePeak("H100 NVL", ("NVIDIA H100 NVL",), 835e12,
               "NVIDIA H100 Tensor Core GPU data sheet: H100 NVL BF16 1,671 TFLOPS with sparsity"),
    DevicePeak("H200 SXM", ("NVIDIA H200",), 989e12,
               "NVIDIA H200 Tensor Core GPU data sheet: H200 SXM BF16 1,979 TFLOPS with sparsity"),
    DevicePeak("H200 NVL", ("NVIDIA H200 NVL",), 835e12,
               "NVIDIA H200 Tensor Core GPU data sheet: H200 NVL BF16 1,671 TFLOPS with sparsity"),
    DevicePeak("A100", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe",
                        "NVIDIA A100-PCIE-40GB"), 312e12,
               "NVIDIA A100 Tensor Core GPU data sheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    DevicePeak("L40S", ("NVIDIA L40S",), 362.05e12,
               "NVIDIA L40S data sheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    DevicePeak("L40", ("NVIDIA L40",), 181.05e12,
               "NVIDIA L40 data sheet: BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)"),
    DevicePeak("L4", ("NVIDIA L4",), 121e12,
               "NVIDIA L4 Tensor Core GPU data sheet: BF16 Tensor Core 242 TFLOPS with sparsity"),
    DevicePeak("A10", ("NVIDIA A10",), 125e12,
               "NVIDIA A10 Tensor Core GPU data sheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
)


def device_peak(device_name: str) -> Optional[DevicePeak]:
    """The table entry whose device names include `device_name` exactly (surrounding spaces ignored)."""
    name = device_name.strip()
    return next((p for p in DENSE_BF16_PEAKS if name in p.device_names), None)


def _peak(label: str) -> float:
    return next(p.dense_bf16_flops for p in DENSE_BF16_PEAKS if p.label == label)


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    peak_flops: Optional[float]     # dense bf16 FLOP/s (None: unknown, no timing)
    memory_bytes: int               # what the device reports (nvidia-smi's total)
    hbm_bw: Optional[float] = None  # bytes/s
    nvlink_bw: Optional[float] = None  # bytes/s per direction per GPU
    ib_bw: Optional[float] = None   # bytes/s per GPU across nodes
    gemm_eff: float = 0.0
    attn_eff: float = 0.0
    hbm_eff: float = 0.8
    nvlink_eff: float = 0.8
    ib_eff: float = 0.9
    reserve_bytes: int = 1 << 30    # CUDA context, cuBLAS/NCCL workspaces: outside PyTorch's allocator
    device_names: tuple[str, ...] = ()  # torch.cuda.get_device_name of this model, matched exactly

    @property
    def has_timing(self) -> bool:
        return bool(self.peak_flops and self.hbm_bw and self.nvlink_bw and self.ib_bw and self.gemm_eff)


_A100 = dict(peak_flops=_peak("A100"), nvlink_bw=300 * GB, ib_bw=25 * GB, gemm_eff=0.859, attn_eff=0.50)
_H100 = dict(nvlink_bw=450 * GB, ib_bw=50 * GB, gemm_eff=0.801, attn_eff=0.35)

GPUS: dict[str, Accelerator] = {a.key: a for a in (
    Accelerator("h100", "NVIDIA H100 SXM 80GB", memory_bytes=81559 * MIB, hbm_bw=3.35e12,
                peak_flops=_peak("H100 SXM"), device_names=("NVIDIA H100 80GB HBM3",), **_H100),
    Accelerator("h200", "NVIDIA H200 SXM 141GB", memory_bytes=143771 * MIB, hbm_bw=4.8e12,
                peak_flops=_peak("H200 SXM"), device_names=("NVIDIA H200",), **_H100),
    Accelerator("a100_80gb", "NVIDIA A100 SXM 80GB", memory_bytes=81920 * MIB, hbm_bw=2.039e12,
                device_names=("NVIDIA A100-SXM4-80GB",), **_A100),
    Accelerator("a100_40gb", "NVIDIA A100 SXM 40GB", memory_bytes=40960 * MIB, hbm_bw=1.555e12,
                device_names=("NVIDIA A100-SXM4-40GB",), **_A100),
    # Memory only (no step-time model): the 48 GB and 24 GB cards of QLoRA's claims (docs/planner.md, "LoRA and
    # QLoRA"), at the capacity of their data sheets (GDDR, in GiB); with ECC on, a GDDR6 card reports about
    # 1/16 less, and check_fits takes what the device reports.
    Accelerator("a6000", "NVIDIA RTX A6000 48GB", peak_flops=None, memory_bytes=48 * GIB,  # RTX A6000 data sheet
                device_names=("NVIDIA RTX A6000",)),
    Accelerator("l40s", "NVIDIA L40S 48GB", peak_flops=_peak("L40S"), memory_bytes=48 * GIB,  # L40S data sheet
                device_names=("NVIDIA L40S",)),
    Accelerator("rtx4090", "NVIDIA GeForce RTX 4090 24GB", peak_flops=None, memory_bytes=24 * GIB,  # RTX 4090 specs
                device_names=("NVIDIA GeForce RTX 4090",)),
    Accelerator("a10", "NVIDIA A10 24GB", peak_flops=_peak("A10"), memory_bytes=24 * GIB,  # A10 data sheet
                device_names=("NVIDIA A10",)),
    Accelerator("l4", "NVIDIA L4 24GB", peak_flops=_peak("L4"), memory_bytes=24 * GIB,  # L4 data sheet
                device_names=("NVIDIA L4",)),
)}
ALIASES = {"h100_sxm": "h100", "a100": "a100_80gb", "a100-80gb": "a100_80gb", "a100-40gb": "a100_40gb"}


def get_gpu(key: str, ib_gbps: Optional[float] = None) -> Accelerator:
    """The accelerator named `key` (gpu= on the command line); ib_gbps overrides its InfiniBand rate."""
    name = ALIASES.get(key.lower(), key.lower())
    if name not in GPUS:
        raise ValueError(f"gpu={key!r} is unknown (known: {', '.join(GPUS)})")
    gpu = GPUS[name]
    return gpu if ib_gbps is None else replace(gpu, ib_bw=ib_gbps * 1e9 / 8)


def gpu_from_device_name(name: str, total_memory: int) -> Accelerator:
    """The table entry for a CUDA device name (exact), with the memory the device reports; another GPU gets
    memory only (and its bf16 peak when DENSE_BF16_PEAKS knows it): no step-time prediction."""
    for gpu in GPUS.values():
        if name.strip() in gpu.device_names:
            return replace(gpu, memory_bytes=total_memory)
    peak = device_peak(name)
    return Accelerator("unknown", name, peak_flops=peak.dense_bf16_flops if peak else None,
                       memory_bytes=total_memory)


def host_memory_bytes() -> int:
    """MemTotal of this machine (/proc/meminfo), for CPU runs."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemTotal line")


def cpu_host(local_processes: int) -> Accelerator:
    """A CPU run: each local process gets an equal share of the host's memory; no timing model."""
    return Accelerator("cpu", f"CPU (1/{local_processes} of host memory)", peak_flops=None,
                       memory_bytes=host_memory_bytes() // max(1, local_processes), reserve_bytes=0)
