"""Hangs: a rank that stops participating (SIGSTOP: frozen, like a stuck driver or a swapped-out node)
makes the other fail within fault.collective_timeout_s, with a message naming the step and the
collective; the heartbeats show which rank stopped."""
import os
import re
import signal
import time

from support.fault_runs import heartbeat, start_torchrun, wait_for
from llama_pt.train.watchdog import HUNG_EXIT_STATUS, main as heartbeats_main

TIMEOUT_S = 3


def test_a_frozen_rank_makes_the_others_fail_naming_step_and_collective(tmp_path, token_corpus, capsys):
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = start_torchrun(token_corpus, run, "train.steps=100000", "train.ckpt_every=0",
                          f"fault.collective_timeout_s={TIMEOUT_S}", log=log)
    frozen = None
    try:
        beat = wait_for(lambda: (b := heartbeat(run, 1)) and b["step"] >= 10 and b, 120, "rank 1 at step 10")
        frozen = beat["pid"]
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        message = wait_for(lambda: re.search(r"error: rank 0 .*\n(.*\n)*?.*NO HEARTBEAT.*\n", log.read_text()),
                           60, "rank 0's hang report").group(0)
        reported_after = time.monotonic() - stopped_at
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGKILL)
        proc.wait(timeout=60)
    last = heartbeat(run, 1)  # what rank 1 was doing when it froze
    first_line = message.splitlines()[0]
    step = int(re.search(r" at step (\d+), phase ", first_line).group(1))
    assert step in (last["step"], last["step"] + 1), (first_line, last)
    assert re.search(r"collective \w+ over ranks 0,1 \(.*\) has not completed after [0-9.]+ s "
                     rf"\(fault.collective_timeout_s={TIMEOUT_S}\)", first_line), first_line
    assert "waiting at " in first_line and first_line.endswith("ending this process")
    assert re.search(rf"rank 1 \(\S+ pid {frozen}\): NO HEARTBEAT for [0-9.]+ s, last at step {last['step']}", message)
    assert TIMEOUT_S <= reported_after < TIMEOUT_S + 10, reported_after
    assert proc.returncode != 0
    assert f"exitcode  : {HUNG_EXIT_STATUS}" in log.read_text()
    assert heartbeat(run, 0)["hung"] == first_line.removeprefix("error: ")
    assert heartbeats_main([str(run), "--interval", "0.1"]) == 0
    assert "rank 1" in capsys.readouterr().out


def test_a_frozen_pipeline_stage_is_named_in_the_report(tmp_path, token_corpus):
    # PP=2: rank 1 holds stage 1. Frozen, it leaves stage 0 waiting in a transfer from it (or in a collective
    # of the step); the report names the phase, with the stage, and the point-to-point peer.
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = start_torchrun(token_corpus, run, "train.steps=100000", "train.ckpt_every=0", "train.eval_every=0",
                          "parallel=pp2", f"fault.collective_timeout_s={TIMEOUT_S}", log=log)
    frozen = None
    try:
        beat = wait_for(lambda: (b := heartbeat(run, 1)) and b["step"] >= 10 and b, 120, "rank 1 at step 10")
        frozen = beat["pid"]
        os.kill(frozen, signal.SIGSTOP)
        message = wait_for(lambda: re.search(r"error: rank 0 .*\n(.*\n)*?.*NO HEARTBEAT.*\n", log.read_text()),
                           60, "rank 0's hang report").group(0)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGKILL)
        proc.wait(timeout=60)
    first_line = message.splitlines()[0]
    assert heartbeat(run, 1)["phase"].startswith("pipeline stage 1: ") or "optimizer" in heartbeat(run, 1)["phase"]
    waiting = re.search(r"collective (.*?) has not completed", first_line).group(1)
    if waiting.startswith(("recv", "send", "isend", "irecv")):
        assert re.fullmatch(r"(recv from|isend to|send to|irecv from) rank 1 \(\[4, 32, 64\] float32\)", waiting)
        assert "phase 'pipeline stage 0: " in first_line, first_line
    assert proc.returncode != 0
