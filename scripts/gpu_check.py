"""One command for a GPU machine: install what the CUDA tests lack, run them, run the GPU benchmarks, and
write one JSON report and the "GPU check" section of benchmarks/RESULTS.md.

    python3 scripts/gpu_check.py run                          # make gpu-check, on a machine with one NVIDIA GPU
    python3 scripts/gpu_check.py run --device cpu --quick     # the whole script on CPU at tiny shapes (smoke run)
    python3 scripts/gpu_check.py wheels                       # make gpu-wheels, on a networked machine

`run` uses the Python it is started with and that Python's own CUDA torch; it never installs or replaces
torch. Its steps, most important first, each under a time limit and all under --budget seconds (460 by
default: the whole check, set-up included, ends within 8 minutes); the JSON and the RESULTS.md section
are rewritten when each step starts and ends, so whatever finished is recorded even if a later step is
cut short or the run is killed:

  setup           the packages the CUDA tests import beyond the GPU image (WHEELS) are looked up; missing
                  ones are installed with `pip install --no-deps --target <out>/site` (first on the steps'
                  PYTHONPATH) from the wheelhouse (.whl/, written by `wheels`), else from PyPI if it
                  answers quickly, else left missing: the tests that need them skip, saying why
  tests           pytest tests/cuda -m cuda, one line per outcome streamed to <out>/tests.jsonl
  bench_layer     benchmarks/bench_layer.py: llama_125m and llama_1b, batch 8 x 2048, bf16 autocast, each
                  activation mode and attention backend next to transformers' LlamaForCausalLM
  bench_parallel  benchmarks/bench_parallel.py --single: the plain loop against the parallel path at TP=1

Outputs in --out (runs/gpu_check): gpu_check.json (machine, versions, set-up, each step's status and
time, test counts and outcomes, the benchmarks' rows), a log per step, the benchmarks' own JSON files.
The section of --results sits between the markers BEGIN and END below and replaces an earlier one.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN gpu-check (scripts/gpu_check.py) -->"
END = "<!-- END gpu-check -->"

# The GPU machines' Python and the platform tags their pip accepts (for `wheels`).
GPU_PYTHON = "3.12"
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
WHEELHOUSE_LIMIT_MB = 30

# A step's time limit is its cap, or less: what is left of the budget after keeping the reserves of the
# steps after it. bench_layer's cap is generous because its run time depends on the host CPU (it builds
# each row's 1B-parameter model there); it gets whatever the earlier steps leave. The default budget,
# plus the grace of a last step stopped at its limit, keeps the whole check under 8 minutes.
STEP_CAPS = {"setup": 40, "tests": 165, "bench_layer": 300, "bench_parallel": 55}
STEP_RESERVES = {"setup": 0, "tests": 90, "bench_layer": 150, "bench_parallel": 40}
DEFAULT_BUDGET = 460
KILL_GRACE = 5  # seconds between SIGTERM and SIGKILL for a step past its limit
PYTEST_PER_TEST_LIMIT = 120  # pytest-timeout, when installed: one hung test fails alone
PYPI_TIMEOUT = 5  # pip's network timeout when the wheelhouse lacks a package

# What the CUDA tests and benchmarks use from the GPU image (distribution -> module): reported when
# missing, never installed (torch above all: the image's own CUDA build is the one to test).
IMAGE = {"torch": "torch", "transformers": "transformers", "sentencepiece": "sentencepiece",
         "safetensors": "safetensors", "numpy": "numpy", "pyyaml": "yaml", "pytest": "pytest", "tqdm": "tqdm",
         "matplotlib": "matplotlib", "packaging": "packaging"}
REPORTED_VERSIONS = ("torch", "transformers", "triton", "xformers", "sentencepiece", "safetensors", "numpy",
                     "pytest", "pytest-timeout")


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


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
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


# ---- wheels: the wheelhouse, on a networked machine ----------------------------------------------------------

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
        print(f"{p.stat().st_size / 1e6:8.2f} MB  {_rel(p)}")
    print(f"{total / 1e6:8.2f} MB  in all, {len(files)} wheels")
    if total > WHEELHOUSE_LIMIT_MB * 1e6:
        raise SystemExit(f"gpu_check wheels: {total / 1e6:.1f} MB is over the {WHEELHOUSE_LIMIT_MB} MB meant to travel")


# ---- run: the check on the GPU machine -------------------------------------------------------------------

class Check:
    """The report of one run, written to <out>/gpu_check.json and to the RESULTS.md section as it grows."""

    def __init__(self, args: argparse.Namespace, device: str, start: float):
        """`start`: time.monotonic() when the script started; the budget counts from there."""
        self.args, self.device = args, device
        self.out: Path = args.out.resolve()
        self.site = self.out / "site"
        self.start = start
        self.deadline = self.start + args.budget
        self.report: dict = {
            "device": device, "quick": args.quick, "budget_s": args.budget,
            "command": shlex.join([Path(sys.executable).name, _rel(Path(__file__)), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "elapsed_s": 0.0, "machine": {}, "setup": {},
            "steps": {name: {"status": "pending", "limit_s": cap} for name, cap in STEP_CAPS.items()},
            "tests": None, "bench_layer": None, "bench_parallel": None}

    # -- bookkeeping --
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "gpu_check.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1))
        tmp.replace(path)
        results: Path = self.args.results
        text = results.read_text(encoding="utf-8") if results.is_file() else "# Benchmark results\n"
        tmp = results.with_name(results.name + ".tmp")
        tmp.write_text(insert_section(text, render_section(self.report, _rel(path))), encoding="utf-8")
        tmp.replace(results)

    def limit(self, name: str) -> float:
        """The step's time limit now; the reserves shrink in proportion to a budget below the default."""
        later = list(STEP_CAPS)[list(STEP_CAPS).index(name) + 1:]
        scale = min(1.0, self.args.budget / DEFAULT_BUDGET)
        left = self.deadline - time.monotonic() - scale * sum(STEP_RESERVES[step] for step in later)
        return max(0.0, min(STEP_CAPS[name], left))

    def begin(self, name: str) -> float:
        limit = self.limit(name)
        self.report["steps"][name].update(status="running", limit_s=round(limit))
        self.save()
        print(f"== [{name}] starts at +{self.elapsed():.0f} s, limit {limit:.0f} s", flush=True)
        return limit

    def end(self, name: str, result: dict) -> None:
        self.report["steps"][name].update(result)
        self.save()
        print(f"== [{name}] {result['status']} in {result['seconds']:.1f} s (total {self.elapsed():.0f} s)", flush=True)

    def env(self) -> dict[str, str]:
        path = [str(self.site), str(REPO), str(REPO / "scripts")]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1",
                "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}

    # -- steps --
    def machine(self) -> None:
        import torch
        info = {"python": platform.python_version(), "python_executable": sys.executable,
                "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_cuda": torch.version.cuda,
                "versions": {dist: _version(dist) for dist in REPORTED_VERSIONS}}
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
            info.update(nvidia_smi())
        self.report["machine"] = info

    def setup(self) -> None:
        limit, started = self.begin("setup"), time.monotonic()
        sys.path.insert(0, str(self.site))
        wheelhouse: Path = self.args.wheelhouse
        missing = [w for w in WHEELS if not _importable(w.module)]
        installed, problems = [], []
        local = [w for w in missing if list(wheelhouse.glob(f"{w.file_prefix}*.whl"))]
        remote = [w for w in missing if w not in local]
        common = ["install", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--quiet",
                  "--target", str(self.site)]
        sources = ((local, f"wheelhouse {_rel(wheelhouse)}", ["--no-index", "--find-links", str(wheelhouse)]),
                   (remote, "PyPI", ["--timeout", str(PYPI_TIMEOUT), "--retries", "0"]))
        for group, source, extra in sources:
            if not group:
                continue
            ok, last = _pip(common + extra + [w.spec for w in group], limit - (time.monotonic() - started))
            if ok:
                installed += [{"package": w.spec, "source": source} for w in group]
            else:
                problems.append(f"{source}: {last}")
        still = [w.spec for w in WHEELS if not _importable(w.module)]
        self.report["setup"] = {
            "site": _rel(self.site), "wheelhouse": _rel(wheelhouse), "needed": [w.spec for w in WHEELS],
            "installed": installed, "missing": still, "problems": problems,
            "expected_missing": [d for d, m in IMAGE.items() if not _importable(m)]}
        for line in problems:
            print(f"   pip ({line})", flush=True)
        if still:
            print(f"   missing: {', '.join(still)}: the tests that need them skip", flush=True)
        status = "ok" if not still and not self.report["setup"]["expected_missing"] else "incomplete"
        self.end("setup", {"status": status, "seconds": round(time.monotonic() - started, 1)})

    def tests(self) -> None:
        limit = self.begin("tests")
        report_file = self.out / "tests.jsonl"
        report_file.unlink(missing_ok=True)
        report_file.touch()
        cmd = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "-p", "gpu_check_report"]
        if _importable("pytest_timeout"):
            cmd += [f"--timeout={PYTEST_PER_TEST_LIMIT}"]
        result = run_step(cmd, {**self.env(), "GPU_CHECK_REPORT": str(report_file)}, limit, self.out / "tests.log")
        self.report["tests"] = summarize_tests(report_file, result["exit_code"])
        self.end("tests", result)

    def bench_layer(self) -> None:
        limit = self.begin("bench_layer")
        out = self.out / "bench_layer.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "benchmarks/bench_layer.py", "--device", self.device, "--json", str(out)]
        if self.args.quick:
            cmd += ["--presets", "tiny", "--seq", "32", "--batch", "2", "--steps", "1", "--warmup", "1"]
        elif self.device == "cuda":
            cmd += ["--presets", "llama_125m", "llama_1b", "--seq", "2048", "--precision", "bf16"]
        result = run_step(cmd, self.env(), limit, self.out / "bench_layer.log")
        self.report["bench_layer"] = json.loads(out.read_text()) if out.is_file() else None
        self.end("bench_layer", result)

    def bench_parallel(self) -> None:
        limit = self.begin("bench_parallel")
        out = self.out / "bench_parallel.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "benchmarks/bench_parallel.py", "--single", "--device", self.device, "--json", str(out)]
        if self.args.quick:
            cmd += ["--model", "tiny", "--seq", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
        result = run_step(cmd, self.env(), limit, self.out / "bench_parallel.log")
        self.report["bench_parallel"] = json.loads(out.read_text()) if out.is_file() else None
        self.end("bench_parallel", result)

    def run(self) -> int:
        self.machine()
        self.save()
        m = self.report["machine"]
        print(f"gpu-check on {m.get('gpu', 'cpu')}: torch {m['versions']['torch']}, Python {m['python']}; "
              f"budget {self.args.budget} s; report {_rel(self.out / 'gpu_check.json')}", flush=True)
        for name, step in (("setup", self.setup), ("tests", self.tests), ("bench_layer", self.bench_layer),
                           ("bench_parallel", self.bench_parallel)):
            if self.limit(name) < 1:
                self.report["steps"][name].update(status="not run: time budget spent", limit_s=0)
                self.save()
                continue
            step()
        self.save()
        statuses = {name: s["status"] for name, s in self.report["steps"].items()}
        tests = self.report["tests"] or {}
        print(f"gpu-check done in {self.elapsed():.0f} s: {statuses}; tests {tests.get('passed', 0)} passed, "
              f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped; "
              f"section written to {_rel(self.args.results)}", flush=True)
        return 0 if all(s == "ok" for s in statuses.values()) else 1


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


def run_step(cmd: list[str], env: dict[str, str], limit: float, log_path: Path) -> dict:
    """Run `cmd` in the repository with output to the console and `log_path`; its process group is ended at `limit`."""
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write("   " + line)
                sys.stdout.flush()
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: Optional[int] = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
            _end_group(proc)
        reader.join(timeout=10)
    return {"status": status, "exit_code": code, "seconds": round(time.monotonic() - started, 1),
            "log": _rel(log_path), "command": shlex.join([Path(cmd[0]).name, *cmd[1:]])}


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, then SIGKILL to whatever is left of it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass


def summarize_tests(report_file: Path, exit_code: Optional[int]) -> dict:
    cases = [json.loads(line) for line in report_file.read_text().splitlines() if line.strip()]
    counts = {key: sum(c["outcome"] == outcome for c in cases)
              for key, outcome in (("passed", "passed"), ("failed", "failed"), ("skipped", "skipped"),
                                   ("errors", "error"))}
    return {**counts, "exit_code": exit_code, "cases": cases}


# ---- the RESULTS.md section ------------------------------------------------------------------------------

def insert_section(text: str, section: str) -> str:
    """`text` with its gpu-check section (BEGIN..END) replaced by `section`, or `section` appended."""
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        return text[:start] + section + text[end + len(END):]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_section(report: dict, json_path: str) -> str:
    m, steps = report["machine"], report["steps"]
    versions = m.get("versions", {})
    if report["device"] == "cuda":
        title = m.get("gpu", "cuda")
        where = (f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, compute capability {m.get('compute_capability')}, "
                 f"{m.get('multiprocessors')} SMs; {m.get('gpu_count')} visible), driver {m.get('driver')} "
                 f"(CUDA {m.get('driver_cuda')}), {m.get('cpu_count')} CPU cores")
    else:
        title = "cpu"
        where = f"CPU only ({m.get('cpu_count')} cores; `--device cpu`: the CUDA tests skip)"
    if report["quick"]:
        title += " (quick smoke run: tiny shapes, not reference figures)"
    lines = [BEGIN, f"## GPU check — {title} — {report['date']}", "",
             f"Command: `{report['command']}`, {report['elapsed_s']:.0f} s in all (budget "
             f"{report['budget_s']} s), started {report['started_utc']}; every figure below is in `{json_path}`. "
             f"Machine: {where}. Versions: Python {m.get('python')}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
             + (f" (torch built for CUDA {m['torch_cuda']})" if m.get("torch_cuda") else "")
             + "; not installed: " + (", ".join(k for k, v in versions.items() if not v) or "none") + ".", ""]
    setup = report.get("setup") or {}
    if setup:
        parts = [f"needed {', '.join(setup['needed'])}"]
        if setup["installed"]:
            parts.append("installed " + ", ".join(f"{i['package']} from {i['source']}" for i in setup["installed"]))
        if setup["missing"]:
            parts.append(f"missing {', '.join(setup['missing'])} (the tests that need them skip)")
        elif not setup["installed"]:
            parts.append("all present")
        if setup["expected_missing"]:
            parts.append(f"absent from the image: {', '.join(setup['expected_missing'])}")
        lines += ["Set-up: " + "; ".join(parts) + ".", ""]
    lines += ["| step | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {name} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | {s.get('limit_s')} |"
              for name, s in steps.items()]
    lines += _tests_lines(report.get("tests"), steps["tests"])
    lines += _bench_layer_lines(report.get("bench_layer"), steps["bench_layer"])
    lines += _bench_parallel_lines(report.get("bench_parallel"), steps["bench_parallel"])
    return "\n".join(lines + ["", END])


def _tests_lines(tests: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### CUDA tests (`pytest tests/cuda -m cuda`)", ""]
    if tests is None:
        return lines + [f"Not run ({step['status']})."]
    ended = "stopped at its time limit" if tests["exit_code"] is None else f"pytest exit code {tests['exit_code']}"
    lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} "
                 f"skipped ({ended}).")
    per_file: dict[str, dict[str, int]] = {}
    for case in tests["cases"]:
        counts = per_file.setdefault(case["test"].split("::")[0], {"passed": 0, "failed": 0, "skipped": 0, "error": 0})
        counts[case["outcome"]] += 1
    if per_file:
        lines += ["", "| file | passed | failed | skipped | errors |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {f} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['error']} |"
                  for f, c in per_file.items()]
    bad = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
    if bad:
        lines += ["", "Failures:"] + [f"- `{c['test']}` ({c['when']}): {c['message']}" for c in bad]
    reasons: dict[str, int] = {}
    for c in tests["cases"]:
        if c["outcome"] == "skipped":
            reasons[c["message"]] = reasons.get(c["message"], 0) + 1
    if reasons:
        lines += ["", "Skipped:"] + [f"- {n} x {reason}" for reason, n in reasons.items()]
    return lines


def _bench_layer_lines(bench: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### Training step per activation mode and attention backend, next to transformers "
                 "(`benchmarks/bench_layer.py`)", ""]
    if not bench:
        return lines + [f"No rows ({step['status']})."]
    args = bench["args"]
    lines += [f"`{step.get('command', '')}`: {args['steps']} timed steps after {args['warmup']} warm-up, precision "
              f"{args['precision']}; step {step['status']}.", "",
              "| preset | implementation | activation | attention | batch x seq | step ms | tokens/s | MFU | peak GiB "
              "| first loss |", "| --- " * 4 + "| ---: " * 6 + "|"]
    for r in bench["rows"]:
        head = f"| {r['preset']} | {r['impl']} | {r['mode']} | {r['attention']} | {r['batch']}x{r['seq']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | |")
            continue
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{head} {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {_fmt(r.get('peak_gib'), '.2f')} "
                     f"| {r['first_loss']:.4f} |")
    for preset in dict.fromkeys(r["preset"] for r in bench["rows"]):
        rows = [r for r in bench["rows"] if r["preset"] == preset and "error" not in r]
        ours = [r for r in rows if r["impl"] == "llama_pt" and r["mode"] == "selective"]
        hf = [r for r in rows if r["impl"] == "transformers"]
        if ours and hf:
            best = max(ours, key=lambda r: r["tokens_per_s"])
            mfu = "" if best.get("mfu") is None else f", MFU {100 * best['mfu']:.1f}%"
            ratio = best["tokens_per_s"] / hf[0]["tokens_per_s"]
            lines.append(f"\n{preset}: `selective` ({best['attention']}) runs at {ratio:.2f}x "
                         f"the tokens/s of transformers{mfu} (targets in the layer section: >= 1.3x, and >= 55% MFU "
                         f"for the ~1B model).")
    return lines


def _bench_parallel_lines(bench: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### One device: plain loop against the parallel path at TP=1 "
                 "(`benchmarks/bench_parallel.py --single`)", ""]
    if not bench:
        return lines + [f"No rows ({step['status']})."]
    args = bench["args"]
    lines += [f"`{step.get('command', '')}`: {args['model']}, {args['micro_batch']} x {args['seq']} tokens x "
              f"{args['grad_accum']} micro-batch(es), median of {args['steps']} steps; step {step['status']}.", "",
              "| path | median step s | min step s | tokens/s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['path']} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['tokens_per_s']:.0f} |"
              for r in bench["results"]]
    by_path = {r["path"]: r for r in bench["results"]}
    if {"plain", "parallel_tp1"} <= set(by_path):
        ratio = by_path["parallel_tp1"]["tokens_per_s"] / by_path["plain"]["tokens_per_s"]
        lines.append(f"\nparallel_tp1 / plain tokens/s: {ratio:.3f}.")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the check (make gpu-check)")
    run.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                     help="cpu: a smoke run of the script (the CUDA tests skip); default cuda")
    run.add_argument("--quick", action="store_true", help="tiny benchmark shapes (a smoke run of the script)")
    run.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="seconds for the whole check")
    run.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    run.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    run.add_argument("--wheelhouse", type=Path, default=REPO / ".whl")
    wheels = sub.add_parser("wheels", help="download the wheels `run` installs (make gpu-wheels)")
    wheels.add_argument("--wheelhouse", type=Path, default=REPO / ".whl")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        download_wheels(args.wheelhouse)
        return 0
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu-check: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA GPU "
                         f"here; a CPU smoke run of this script: {_rel(Path(__file__))} run --device cpu --quick")
    return Check(args, args.device, start).run()


if __name__ == "__main__":
    sys.exit(main())
