"""The packages the CUDA tests and the benchmarks import beyond the GPU image (WHEELS): their wheels,
downloaded into a wheelhouse on a networked machine (`download_wheels`), and installed on the GPU machine
into the check's own site folder, from the wheelhouse or else from PyPI (`install_missing`).
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import REPO, rel

# The GPU machines' Python and the platform tags their pip accepts (for `wheels`).
GPU_PYTHON = "3.12"
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
WHEELHOUSE_LIMIT_MB = 30
PYPI_TIMEOUT = 5  # pip's network timeout when the wheelhouse lacks a package

# What the CUDA tests and benchmarks use from the GPU image (distribution -> module): reported when
# missing, never installed (torch above all: the image's own CUDA build is the one to test).
IMAGE = {"torch": "torch", "transformers": "transformers", "sentencepiece": "sentencepiece",
         "safetensors": "safetensors", "numpy": "numpy", "pyyaml": "yaml", "pytest": "pytest", "tqdm": "tqdm",
         "matplotlib": "matplotlib", "packaging": "packaging"}


@dataclass(frozen=True)
class Wheel:
    dist: str     # the distribution's name on PyPI
    module: str   # the top-level module the tests import
    version: str

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def file_prefix(self) -> str:
        """Wheel file names start with the normalised name and the version."""
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}-"


def _pinned(dist: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if name.lower() == dist and version:
            return version
    raise SystemExit(f"gpu_check: requirements.txt pins no version of {dist}")


# What the CUDA tests and the benchmarks import beyond the GPU image (IMAGE): Hydra and OmegaConf,
# which compose the trainer's config (tests/support.make_config, llama_pt.train.entry), the parser runtime
# OmegaConf 2.3 needs (4.9.*; PyPI has it only as a source package, so `wheels` builds its pure-Python
# wheel), and fasteners (llama_pt.data's file locks, imported with the trainer). All pure Python, <1 MB.
# The rest of requirements.txt is not imported on these paths (tests/test_gpu_check_script.py checks it
# with those packages hidden): deepspeed (ZeRO stages only), wandb (logging.wandb.enabled, off in the
# tests), xformers (an optional kernel: its tests skip without it), and the data pipeline's packages.
WHEELS = (Wheel("hydra-core", "hydra", _pinned("hydra-core")),
          Wheel("omegaconf", "omegaconf", _pinned("omegaconf")),
          Wheel("antlr4-python3-runtime", "antlr4", "4.9.3"),
          Wheel("fasteners", "fasteners", _pinned("fasteners")))


def importable(module: str) -> bool:
    importlib.invalidate_caches()
    return importlib.util.find_spec(module) is not None


def _pip(args: list[str], timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return False, f"pip timed out after {timeout:.0f} s"
    output = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, output[-1] if output else ""


def download_wheels(wheelhouse: Path) -> None:
    """One wheel per package of WHEELS, for the GPU machines' Python, into `wheelhouse` (other versions removed)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in GPU_PLATFORMS for arg in ("--platform", p)]
    for wheel in WHEELS:
        stem = wheel.file_prefix.split("-")[0] + "-"
        for old in wheelhouse.glob(f"{stem}*.whl"):
            if not old.name.startswith(wheel.file_prefix):
                old.unlink()
        if list(wheelhouse.glob(f"{wheel.file_prefix}*.whl")):
            continue
        ok, last = _pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON,
                         "--implementation", "cp", *platforms, "-d", str(wheelhouse), wheel.spec], 300)
        if not ok:  # a package published only as source: build its wheel here, pure Python or refused below
            ok, last = _pip(["wheel", "--no-deps", "-w", str(wheelhouse), wheel.spec], 300)
        built = list(wheelhouse.glob(f"{wheel.file_prefix}*.whl"))
        if not ok or not built:
            raise SystemExit(f"gpu_check wheels: no wheel of {wheel.spec}: {last}")
        if not (built[0].name.endswith("-py3-none-any.whl") or f"cp{GPU_PYTHON.replace('.', '')}" in built[0].name):
            raise SystemExit(f"gpu_check wheels: {built[0].name} is neither pure Python nor for CPython {GPU_PYTHON}")
    files = sorted(p for w in WHEELS for p in wheelhouse.glob(f"{w.file_prefix}*.whl"))
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size / 1e6:8.2f} MB  {rel(p)}")
    print(f"{total / 1e6:8.2f} MB  in all, {len(files)} wheels")
    if total > WHEELHOUSE_LIMIT_MB * 1e6:
        raise SystemExit(f"gpu_check wheels: {total / 1e6:.1f} MB is over the {WHEELHOUSE_LIMIT_MB} MB meant to travel")


def install_missing(site: Path, wheelhouse: Path, deadline: float) -> dict:
    """Install the packages of WHEELS that this Python cannot import into `site` with `pip --no-deps --target`,
    from `wheelhouse` where it holds them, else from PyPI, pip stopped at `deadline` (time.monotonic()).
    `site` goes first on this process's sys.path, so that what it already holds counts as present.
    Returns the report's "setup": what was needed, installed (and from where), still missing, pip's complaints,
    and which packages of the image (IMAGE) are absent."""
    sys.path.insert(0, str(site))
    missing = [w for w in WHEELS if not importable(w.module)]
    installed, problems = [], []
    local = [w for w in missing if list(wheelhouse.glob(f"{w.file_prefix}*.whl"))]
    remote = [w for w in missing if w not in local]
    common = ["install", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--quiet", "--target", str(site)]
    sources = ((local, f"wheelhouse {rel(wheelhouse)}", ["--no-index", "--find-links", str(wheelhouse)]),
               (remote, "PyPI", ["--timeout", str(PYPI_TIMEOUT), "--retries", "0"]))
    for group, source, extra in sources:
        if not group:
            continue
        ok, last = _pip(common + extra + [w.spec for w in group], deadline - time.monotonic())
        if ok:
            installed += [{"package": w.spec, "source": source} for w in group]
        else:
            problems.append(f"{source}: {last}")
    return {"site": rel(site), "wheelhouse": rel(wheelhouse), "needed": [w.spec for w in WHEELS],
            "installed": installed, "missing": [w.spec for w in WHEELS if not importable(w.module)],
            "problems": problems, "expected_missing": [d for d, m in IMAGE.items() if not importable(m)]}
