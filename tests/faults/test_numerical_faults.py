"""Numerical faults, injected as bad batches into the real trainer (one process; the multi-rank cases
are in test_numerical_faults_dist.py): a NaN loss, a non-finite gradient norm and a loss spike each
skip the step - the weights, the AdamW moments and its step count are bitwise unchanged - and are
logged; K bad steps in a row roll the run back to the last checkpoint and go on with later data."""
import json
import math
from contextlib import closing

import pytest
import torch
from omegaconf import OmegaConf

from support.injection import InjectingLoader, bitwise_equal, poison_embedding, poisoned, random_tokens, snapshot
from support import make_config
from llama_pt.train.checkpoint import list_checkpoints, load_checkpoint
from llama_pt.config import resolve
from llama_pt.train.step_guard import TrainingDiverged
from llama_pt.train.trainer import Trainer

GUARD = ("fault.spike_window=8", "fault.spike_zscore=3", "fault.heartbeat_every_s=0.5")


def build(tmp_path, token_corpus, bad, *overrides):
    cfg = OmegaConf.to_container(make_config(tmp_path, token_corpus, *GUARD, *overrides), resolve=True)
    trainer = Trainer(resolve(cfg), cfg)
    poison_embedding(trainer)
    trainer.data.loader = InjectingLoader(trainer.data.loader, bad)
    return trainer


def record_steps(trainer):
    """Wrap train_step: {step: (state before, state after, metrics)} for every step run."""
    seen = {}
    original = trainer.train_step

    def wrapped(micro_batches):
        before = snapshot(trainer)
        metrics = original(micro_batches)
        seen.setdefault(trainer.step, []).append((before, snapshot(trainer), dict(metrics)))
        return metrics
    trainer.train_step = wrapped
    return seen


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_spike_and_nonfinite_norm_skip_the_update(tmp_path, token_corpus):
    with closing(build(tmp_path, token_corpus, {5: poisoned, 14: random_tokens}, "train.steps=16")) as trainer:
        weight = trainer.model.layers[0].attention.wq.weight
        weight.register_hook(lambda g: g * math.inf if trainer.step == 9 else g)  # step 10's gradient
        seen = record_steps(trainer)
        result = trainer.fit()
    assert result["finished"] and result["step"] == 16
    skipped = {step: runs[0][2]["skipped"] for step, runs in seen.items() if runs[0][2]["skipped"]}
    assert set(skipped) == {5, 10, 14}, skipped
    assert skipped[5] == "non-finite loss (nan)"
    assert skipped[10].startswith("non-finite gradient norm")
    assert skipped[14].startswith("loss spike (") and "fault.spike_zscore=3" in skipped[14]
    for step in (5, 10, 14):
        before, after, _ = seen[step][0]
        assert bitwise_equal(before, after), f"step {step} changed the weights or the optimizer state"
    for step in (4, 6, 15):
        before, after, _ = seen[step][0]
        assert not bitwise_equal(before, after), f"step {step} should have updated"
    logged = {r["step"]: r["skipped"] for r in records(tmp_path) if "skipped" in r}
    assert logged == skipped
    assert trainer.guard.bad_in_row == 0 and len(trainer.guard.window) == 8


def test_bad_steps_in_a_row_roll_back_to_the_last_checkpoint(tmp_path, token_corpus):
    bad = {position: poisoned for position in (7, 8, 9)}
    overrides = ("train.steps=12", "train.ckpt_every=5", "fault.max_bad_steps=3", "train.keep_last=0")
    with closing(build(tmp_path, token_corpus, bad, *overrides)) as trainer:
        seen = record_steps(trainer)
        result = trainer.fit()
    assert result["finished"] and result["step"] == 12
    # Data positions: 1..9 (7, 8, 9 bad) then the roll-back to step 5, and steps 6..12 take positions 10..16.
    assert trainer.data.loader.positions == list(range(1, 17))
    rollback = [r for r in records(tmp_path) if "rolled_back_to" in r]
    assert rollback == [{"step": 5, "rolled_back_from": 9, "rolled_back_to": "step_00000005"}]
    # Right after the roll-back, the state is the checkpoint's, bitwise: step 6 starts from it.
    ckpt = list_checkpoints(tmp_path / "checkpoints")[0]
    saved = snapshot(trainer)  # the same nesting to load into
    tensors = {"model": {k[6:]: v for k, v in saved.items() if k.startswith("model.")}}
    load_checkpoint(ckpt, {"model": tensors["model"]})
    second_step6_before = seen[6][1][0]
    assert all(torch.equal(second_step6_before[f"model.{k}"].nan_to_num(), v.nan_to_num())
               for k, v in tensors["model"].items())
    assert not bitwise_equal(seen[6][0][1], second_step6_before)  # the first step 6 had moved on
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000005", "step_00000010",
                                                                              "step_00000012"]


def test_bad_again_right_after_a_roll_back_stops_the_run(tmp_path, token_corpus):
    bad = {position: poisoned for position in range(5, 40)}
    overrides = ("train.steps=30", "train.ckpt_every=3", "fault.max_bad_steps=2")
    with closing(build(tmp_path, token_corpus, bad, *overrides)) as trainer:
        with pytest.raises(TrainingDiverged, match=r"2 bad steps in a row again right after rolling back"):
            trainer.fit()
    assert [r["rolled_back_to"] for r in records(tmp_path) if "rolled_back_to" in r] == ["step_00000003"]


def test_bad_steps_without_a_checkpoint_stop_the_run(tmp_path, token_corpus):
    bad = {3: poisoned, 4: poisoned}
    with closing(build(tmp_path, token_corpus, bad, "train.steps=8", "fault.max_bad_steps=2")) as trainer:
        with pytest.raises(TrainingDiverged, match=r"2 bad steps in a row up to step 4 .* no checkpoint in"):
            trainer.fit()


def test_resume_restores_the_spike_window(tmp_path, token_corpus):
    """The guard's window is in the checkpoint: a resumed run skips exactly what the straight one skips."""
    bad = {14: random_tokens}
    with closing(build(tmp_path / "straight", token_corpus, bad, "train.steps=16")) as straight:
        straight.fit()
    with closing(build(tmp_path / "resumed", token_corpus, bad, "train.steps=16", "train.exit_interval=9")) as first:
        assert not first.fit()["finished"]
    with closing(build(tmp_path / "resumed", token_corpus, bad, "train.steps=16")) as second:
        second.restore(second.resume_from)
        assert list(second.guard.window) == list(first.guard.window)
        second.fit()
    skipped = [(r["step"], r["skipped"]) for r in records(tmp_path / "straight") if "skipped" in r]
    assert [s for s, _ in skipped] == [14]
    assert [(r["step"], r["skipped"]) for r in records(tmp_path / "resumed") if "skipped" in r] == skipped
    losses = lambda d: [(r["step"], r["loss"]) for r in records(d) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
