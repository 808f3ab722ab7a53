"""Preemption: SIGTERM / SIGUSR1 make the trainer finish the step, write a checkpoint and exit cleanly;
the next run (train.resume=auto) resumes from it and ends bitwise where an uninterrupted run ends.
The SLURM path (pre-timeout USR1 through train.sbatch, then requeue) is in tests/launch/test_slurm.py."""
import os
import signal

import pytest

from support.fault_runs import assert_bitwise_equal, final_state, heartbeat, start_torchrun, wait_for
from support import make_config
from llama_pt.train.checkpoint import list_checkpoints, verify_checkpoint
from llama_pt.train.entry import run_training
from llama_pt.train.trainer import Trainer

STEPS = ("train.steps=12", "train.ckpt_every=1000")  # a checkpoint at the end only


def test_sigusr1_in_one_process_checkpoints_exits_and_calls_the_previous_handler(tmp_path, token_corpus, monkeypatch):
    straight = run_training(make_config(tmp_path / "straight", token_corpus, *STEPS))
    assert straight["finished"]
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))  # e.g. submitit's
    original = Trainer.train_step

    def signalled_at_step_5(self, micro_batches):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives in the middle of step 5
        return original(self, micro_batches)
    monkeypatch.setattr(Trainer, "train_step", signalled_at_step_5)
    try:
        first = run_training(make_config(tmp_path / "resumed", token_corpus, *STEPS))
    finally:
        restored = signal.signal(signal.SIGUSR1, previous)
    assert first["step"] == 5 and not first["finished"] and first["stopped_by"] == "SIGUSR1"
    assert calls == [signal.SIGUSR1], "the handler found at start-up must be called after the checkpoint"
    assert restored is not None and restored is not previous  # ours was replaced by the one before it
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step_00000005"]
    monkeypatch.undo()
    second = run_training(make_config(tmp_path / "resumed", token_corpus, *STEPS))
    assert second["finished"] and second["step"] == 12
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))


@pytest.mark.parametrize("layout", [(), pytest.param(("parallel=pp2", "train.eval_every=0"), marks=pytest.mark.slow)],
                         ids=["dp2", "pp2"])
def test_sigterm_to_torchrun_checkpoints_and_the_next_run_resumes(tmp_path, token_corpus, layout):
    # pp2: the two stages agree to stop after the same step and write one checkpoint between them.
    steps = ("train.steps=150", "train.ckpt_every=1000", *layout)
    straight = start_torchrun(token_corpus, tmp_path / "straight", *steps)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]

    run = tmp_path / "resumed"
    first = start_torchrun(token_corpus, run, *steps)
    wait_for(lambda: all((heartbeat(run, r) or {}).get("step", 0) >= 20 for r in (0, 1)), 120, "step 20")
    os.kill(first.pid, signal.SIGTERM)  # the torchrun agent: it forwards SIGTERM to its workers
    out, _ = first.communicate(timeout=120)
    # The workers exit cleanly; the one traceback is torchrun's agent reporting the signal it got.
    assert out.count("Traceback (most recent call last)") == 1 and out.rstrip().endswith("got signal: 15"), out[-3000:]
    assert out.count("received SIGTERM: a checkpoint is written after this step") == 2, out[-3000:]
    saved = list_checkpoints(run / "checkpoints")
    assert len(saved) == 1, saved
    stopped_at = verify_checkpoint(saved[0])["step"]
    assert 20 <= stopped_at < 150
    assert f"exiting at step {stopped_at} (SIGTERM)" in out

    second = start_torchrun(token_corpus, run, *steps)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert f"resumed from {saved[0]} at step {stopped_at}" in out
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(run))
