"""The report of one check, a dict: started by `new_report`, given the machine's description
(`describe_machine`), filled in by the steps, and written by `save` as <out>/gpu_check.json and as the
section of RESULTS.md (.section), each file replaced whole so that a run stopped at any point leaves both
readable.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from . import PACKAGE, rel
from .section import insert_section, render_section

REPORTED_VERSIONS = ("torch", "transformers", "triton", "xformers", "sentencepiece", "safetensors", "numpy",
                     "pytest", "pytest-timeout")


def new_report(args: argparse.Namespace, device: str, caps: dict[str, int]) -> dict:
    """The report before any step ran: each step of `caps` pending, with its cap as its limit."""
    return {
        "device": device, "quick": args.quick, "budget_s": args.budget,
        "command": shlex.join([Path(sys.executable).name, rel(PACKAGE), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": 0.0, "machine": {}, "setup": {},
        "steps": {name: {"status": "pending", "limit_s": cap} for name, cap in caps.items()},
        "tests": None, "bench_layer": None, "bench_parallel": None, "bench_documents": None}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine(device: str) -> dict:
    """Python, platform, the versions of REPORTED_VERSIONS, and on `cuda` the GPU and its driver."""
    import torch
    info = {"python": platform.python_version(), "python_executable": sys.executable,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_cuda": torch.version.cuda,
            "versions": {dist: _version(dist) for dist in REPORTED_VERSIONS}}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        info.update(nvidia_smi())
    return info


def nvidia_smi() -> dict:
    """Driver version and the driver's CUDA version, from nvidia-smi (empty when it is missing)."""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=15)
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner.stdout)
    return {"driver": query.stdout.strip().splitlines()[0] if query.stdout.strip() else None,
            "driver_cuda": cuda.group(1) if cuda else None}


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def save(report: dict, out: Path, results: Path) -> None:
    """`report` as `out`/gpu_check.json and as the section of `results` (created when missing)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    _replace(path, json.dumps(report, indent=1))
    text = results.read_text(encoding="utf-8") if results.is_file() else "# Benchmark results\n"
    _replace(results, insert_section(text, render_section(report, rel(path))))
