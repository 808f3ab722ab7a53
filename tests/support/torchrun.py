"""A script under torchrun on CPU (gloo): `--standalone` (one node), N processes, from the repository root.

PYTHONPATH holds the repository and tests/ (the folder of this package), ahead of any PYTHONPATH already
set, so a worker imports `support.…` as the tests do. Arguments are passed through str(), so paths may
be given as they are. `run_torchrun` waits for the launch and captures its output, `torchrun_results`
also reads back what every rank wrote, `popen_torchrun` starts it in the background.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from support import REPO


def _command(script: Path, args: Iterable[object], nproc: int, flags: Iterable[str] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *flags,
            str(script), *map(str, args)]


def _environment(extra: Optional[dict[str, str]]) -> dict[str, str]:
    path = [str(REPO), str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(extra or {})}


def run_torchrun(script: Path, *args: object, nproc: int = 2, env: Optional[dict[str, str]] = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """The finished launch, its stdout and stderr captured as text; `env` is added to this process's
    environment; past `timeout` seconds subprocess.TimeoutExpired is raised."""
    return subprocess.run(_command(script, args, nproc), cwd=REPO, env=_environment(env), capture_output=True,
                          text=True, timeout=timeout)


def torchrun_results(script: Path, out: Path, cases: list[str], *args: object, nproc: int = 2,
                     timeout: float = 600) -> dict[str, list[dict]]:
    """Runs `script --out OUT --cases CASES... ARGS...`, which must succeed (else the assertion shows the
    ends of its output), and returns what each rank wrote for each case, OUT/<case>.rank<r>.json:
    {case: [rank 0's result, rank 1's, ...]}."""
    proc = run_torchrun(script, "--out", out, "--cases", *cases, *args, nproc=nproc, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {case: [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(nproc)] for case in cases}


def popen_torchrun(script: Path, *args: object, nproc: int = 2, flags: Iterable[str] = (),
                   env: Optional[dict[str, str]] = None, **popen) -> subprocess.Popen:
    """The launch started in the background: `flags` go to torchrun itself (before the script), `env` is
    added to this process's environment, `popen` (stdout, start_new_session, ...) to subprocess.Popen."""
    return subprocess.Popen(_command(script, args, nproc, flags), cwd=REPO, env=_environment(env), **popen)
