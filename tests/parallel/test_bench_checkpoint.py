"""benchmarks/bench_checkpoint.py runs (tiny model, 2 processes, one repeat), so it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_checkpoint_benchmark_runs_both_paths(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_checkpoint.py"), "--model", "tiny",
                           "--seq", "16", "--repeats", "1", "--dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"fragments", "full"} and all(r["bytes"] > 0 for r in results.values())
    assert "all_reduce" not in results["fragments"]["save_calls"]
    assert results["full"]["save_calls"]["all_reduce"] == results["full"]["tensors"] == 63
    assert "| fragments |" in proc.stdout
