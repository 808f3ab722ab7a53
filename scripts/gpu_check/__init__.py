"""`make gpu-check` and `make gpu-wheels` (docs/gpu_check.md): `python3 scripts/gpu_check run | wheels`.

  __main__       the command line: `run` (the check on a GPU machine) and `wheels` (the wheelhouse)
  wheels         the packages the CUDA tests import beyond the GPU image: downloaded, then installed
  steps          the check's steps, each a process group under a share of one time budget
  report         the report: the machine, gpu_check.json and the RESULTS.md section, rewritten as it grows
  section        the RESULTS.md section rendered from the report, and its place between two markers
  pytest_plugin  the tests step's outcomes, one JSON line each as they finish
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parents[1]


def rel(path: Path) -> str:
    """`path` relative to the repository when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
