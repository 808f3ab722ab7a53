"""train.py under torchrun for the fault tests: start a run, watch its heartbeats, compare final weights."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from llama_pt.train.checkpoint import list_checkpoints
from support import REPO
from support.torchrun import popen_torchrun


def overrides(token_corpus, out_dir: Path, *extra: str) -> list[str]:
    return [f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", f"train.out_dir={out_dir}",
            "model=tiny", "train.seq_len=32", "train.global_batch_tokens=512", "train.micro_batch_size=4",
            "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2", "optim.lr=3e-3",
            "logging.wandb.enabled=false", "fault.heartbeat_every_s=0.1", *extra]


def start_torchrun(token_corpus, out_dir: Path, *extra: str, nproc: int = 2, max_restarts: int = 0,
                   log: Optional[Path] = None) -> subprocess.Popen:
    """torchrun --standalone train.py in its own session (so a test can signal the agent alone)."""
    sink = open(log, "w") if log is not None else subprocess.PIPE
    return popen_torchrun(REPO / "train.py", *overrides(token_corpus, out_dir, *extra), nproc=nproc,
                          flags=[f"--max-restarts={max_restarts}", "--monitor-interval=0.1"],
                          env={"OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10"},
                          stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def heartbeat(out_dir: Path, rank: int) -> Optional[dict]:
    try:
        return json.loads((out_dir / "heartbeats" / f"rank_{rank:05d}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def wait_for(predicate: Callable[[], Optional[object]], timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    """Model weights of the newest checkpoint, as saved (full tensors: the DCP files of every rank)."""
    from llama_pt.pretrained import load_checkpoint_model
    model, _ = load_checkpoint_model(list_checkpoints(out_dir / "checkpoints")[-1])
    return model.state_dict()


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"
