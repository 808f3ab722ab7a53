"""One command for a GPU machine: install what the CUDA tests lack, run them, run the GPU benchmarks, and
write one JSON report and the "GPU check" section of benchmarks/RESULTS.md.

    python3 scripts/gpu_check run                          # make gpu-check, on a machine with one NVIDIA GPU
    python3 scripts/gpu_check run --device cpu --quick     # the whole script on CPU at tiny shapes (smoke run)
    python3 scripts/gpu_check wheels                       # make gpu-wheels, on a networked machine

`run` uses the Python it is started with and that Python's own CUDA torch; it never installs or replaces
torch. Its steps, most important first, each under a time limit and all under --budget seconds (460 by
default: the whole check, set-up included, ends within 8 minutes); the JSON and the RESULTS.md section
are rewritten when each step starts and ends, so whatever finished is recorded even if a later step is
cut short or the run is killed:

  setup           the packages the CUDA tests import beyond the GPU image (wheels.WHEELS) are looked up;
                  missing ones are installed with `pip install --no-deps --target <out>/site` (first on the
                  steps' PYTHONPATH) from the wheelhouse (.whl/, written by `wheels`), else from PyPI if it
                  answers quickly, else left missing: the tests that need them skip, saying why
  tests           pytest tests/cuda -m cuda, one line per outcome streamed to <out>/tests.jsonl
  bench_layer     benchmarks/bench_layer.py: llama_125m and llama_1b, batch 8 x 2048, bf16 autocast, each
                  activation mode and attention backend next to transformers' LlamaForCausalLM
  bench_parallel  benchmarks/bench_parallel.py --single: the plain loop against the parallel path at TP=1
  bench_documents benchmarks/bench_documents.py: attention forward + backward over packed documents (batch 4
                  x 2048 and 4096, 16 heads of 128, bf16) per kernel, the variable-length flash kernel among
                  them, against the same kernels' causal mask

Outputs in --out (runs/gpu_check): gpu_check.json (machine, versions, set-up, each step's status and
time, test counts and outcomes, the benchmarks' rows), a log per step, the benchmarks' own JSON files.
The section of --results sits between the markers section.BEGIN and section.END and replaces an earlier one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # started as `python3 scripts/gpu_check`: import the package from scripts/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpu_check import PACKAGE, REPO, rel  # noqa: E402
from gpu_check.steps import DEFAULT_BUDGET, Check  # noqa: E402
from gpu_check.wheels import download_wheels  # noqa: E402


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    start = time.monotonic()
    args = _parser().parse_args(argv)
    if args.command == "wheels":
        download_wheels(args.wheelhouse)
        return 0
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu-check: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA GPU "
                         f"here; a CPU smoke run of this script: {rel(PACKAGE)} run --device cpu --quick")
    return Check(args, args.device, start).run()


if __name__ == "__main__":
    sys.exit(main())
