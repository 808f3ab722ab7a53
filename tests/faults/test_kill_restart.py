"""Crash and restart: torchrun --max-restarts, a rank SIGKILLed 20 times at random moments - a third of
them while a checkpoint is being written - in a short 2-process CPU run. After every kill, when the
workers are gone, every visible checkpoint verifies (none is corrupt or half-visible); each restart
resumes from the newest complete one; the final weights are bitwise those of an uninterrupted run."""
import os
import random
import signal
import time
from pathlib import Path

from support.fault_runs import assert_bitwise_equal, final_state, heartbeat, start_torchrun, wait_for
from llama_pt.train.checkpoint import list_checkpoints, verify_checkpoint

KILLS = 20
STEPS = ("train.steps=240", "train.ckpt_every=3", "train.keep_last=2")


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def generation_pids(run: Path, restart: int):
    beats = [heartbeat(run, r) for r in (0, 1)]
    if all(b is not None and b["restart"] == restart and b["phase"] != "start-up" for b in beats):
        return [b["pid"] for b in beats]
    return None


def saving(run: Path) -> bool:
    return any((run / "checkpoints").glob(".step_*.tmp"))


def test_twenty_kills_never_corrupt_a_checkpoint_and_end_bitwise_equal(tmp_path, token_corpus):
    straight = start_torchrun(token_corpus, tmp_path / "straight", *STEPS)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]

    seed = int(os.environ.get("KILL_TEST_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    run, log = tmp_path / "killed", tmp_path / "torchrun.log"
    proc = start_torchrun(token_corpus, run, *STEPS, max_restarts=KILLS + 5, log=log)
    kills = []
    try:
        for restart in range(KILLS):
            pids = wait_for(lambda: generation_pids(run, restart), 120, f"workers of restart {restart} (seed {seed})")
            mid_save = restart % 3 == 0
            if mid_save:
                wait_for(lambda: saving(run), 60, f"a checkpoint write (seed {seed})", poll=0.001)
                time.sleep(rng.uniform(0, 0.01))
            else:
                time.sleep(rng.uniform(0, 0.8))
            victim = rng.choice(pids)
            during_write = saving(run)
            os.kill(victim, signal.SIGKILL)
            step = max((heartbeat(run, r) or {}).get("step", 0) for r in (0, 1))
            kills.append((restart, victim, step, during_write))
            wait_for(lambda: not any(alive(p) for p in pids), 60, f"restart {restart}'s workers to end (seed {seed})")
            for path in list_checkpoints(run / "checkpoints"):  # the quiet moment before the next generation
                verify_checkpoint(path)  # raises CheckpointError naming the file if anything is partial
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, f"seed {seed}: {text[-3000:]}"
    assert len(kills) == KILLS
    assert sum(during_write for *_, during_write in kills) >= 5, (seed, kills)
    assert text.count("resumed from ") >= KILLS - 3, seed  # a kill before the first checkpoint restarts from 0
    for path in list_checkpoints(run / "checkpoints"):
        verify_checkpoint(path)
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(run))
