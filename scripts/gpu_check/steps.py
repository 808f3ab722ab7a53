"""The check's steps, most important first, under one time budget: setup (the wheels' packages), tests
(pytest tests/cuda), bench_layer, bench_parallel and bench_documents. Each step but setup is a subprocess in
its own process group, ended at the step's limit; the report is saved as each step starts and ends.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from . import REPO, rel
from .report import describe_machine, new_report, save
from .wheels import importable, install_missing

# A step's time limit is its cap, or less: what is left of the budget after keeping the reserves of the
# steps after it. bench_layer's cap is generous because its run time depends on the host CPU (it builds
# each row's 1B-parameter model there); it gets whatever the earlier steps leave. The default budget,
# plus the grace of a last step stopped at its limit, keeps the whole check under 8 minutes. bench_documents
# (attention alone, no model to build) needs far less than its cap and writes its JSON after each kernel, so
# its reserve is the smallest.
STEP_CAPS = {"setup": 40, "tests": 165, "bench_layer": 300, "bench_parallel": 55, "bench_documents": 60}
STEP_RESERVES = {"setup": 0, "tests": 90, "bench_layer": 150, "bench_parallel": 40, "bench_documents": 30}
DEFAULT_BUDGET = 460
KILL_GRACE = 5  # seconds between SIGTERM and SIGKILL for a step past its limit
PYTEST_PER_TEST_LIMIT = 120  # pytest-timeout, when installed: one hung test fails alone


class Check:
    """One run of the steps; its report is written to <out>/gpu_check.json and to the RESULTS.md section as
    it grows."""

    def __init__(self, args: argparse.Namespace, device: str, start: float):
        """`start`: time.monotonic() when the script started; the budget counts from there."""
        self.args, self.device = args, device
        self.out: Path = args.out.resolve()
        self.site = self.out / "site"
        self.start = start
        self.deadline = self.start + args.budget
        self.report = new_report(args, device, STEP_CAPS)

    # -- bookkeeping --
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        save(self.report, self.out, self.args.results)

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
    def setup(self) -> None:
        limit, started = self.begin("setup"), time.monotonic()
        setup = self.report["setup"] = install_missing(self.site, self.args.wheelhouse, started + limit)
        for line in setup["problems"]:
            print(f"   pip ({line})", flush=True)
        if setup["missing"]:
            print(f"   missing: {', '.join(setup['missing'])}: the tests that need them skip", flush=True)
        status = "ok" if not setup["missing"] and not setup["expected_missing"] else "incomplete"
        self.end("setup", {"status": status, "seconds": round(time.monotonic() - started, 1)})

    def tests(self) -> None:
        limit = self.begin("tests")
        report_file = self.out / "tests.jsonl"
        report_file.unlink(missing_ok=True)
        report_file.touch()
        cmd = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "-p", "gpu_check.pytest_plugin"]
        if importable("pytest_timeout"):
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

    def bench_documents(self) -> None:
        limit = self.begin("bench_documents")
        out = self.out / "bench_documents.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "benchmarks/bench_documents.py", "--device", self.device, "--json", str(out)]
        if self.args.quick:
            cmd += ["--quick"]
        result = run_step(cmd, self.env(), limit, self.out / "bench_documents.log")
        self.report["bench_documents"] = json.loads(out.read_text()) if out.is_file() else None
        self.end("bench_documents", result)

    def run(self) -> int:
        """The steps in order, each skipped once the budget is spent; 0 when every step is ok, else 1."""
        self.report["machine"] = describe_machine(self.device)
        self.save()
        m = self.report["machine"]
        print(f"gpu-check on {m.get('gpu', 'cpu')}: torch {m['versions']['torch']}, Python {m['python']}; "
              f"budget {self.args.budget} s; report {rel(self.out / 'gpu_check.json')}", flush=True)
        for name, step in (("setup", self.setup), ("tests", self.tests), ("bench_layer", self.bench_layer),
                           ("bench_parallel", self.bench_parallel), ("bench_documents", self.bench_documents)):
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
              f"section written to {rel(self.args.results)}", flush=True)
        return 0 if all(s == "ok" for s in statuses.values()) else 1


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
            "log": rel(log_path), "command": shlex.join([Path(cmd[0]).name, *cmd[1:]])}


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
    """The report's "tests": counts per outcome and every case, from the plugin's lines in `report_file`."""
    cases = [json.loads(line) for line in report_file.read_text().splitlines() if line.strip()]
    counts = {key: sum(c["outcome"] == outcome for c in cases)
              for key, outcome in (("passed", "passed"), ("failed", "failed"), ("skipped", "skipped"),
                                   ("errors", "error"))}
    return {**counts, "exit_code": exit_code, "cases": cases}

