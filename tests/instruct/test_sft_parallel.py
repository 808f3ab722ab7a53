"""Instruction tuning across processes (torchrun, gloo): TP=2 with sequence parallelism, and DP=2 with DeepSpeed
ZeRO-1, against one process: packed windows with document masks through the selective layer, the loss over the
response tokens of the global batch (which fall unevenly on the data-parallel ranks). fp32 on CPU: every
step's loss within relative 1e-5 of the single-process run's."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from llama_pt.config import compose_config, resolve
from llama_pt.train.trainer import Trainer
from support import REPO
from support.instruct_data import short_records, tiny_base
from support.torchrun import torchrun_results
from support.workers import WORKERS

TOL = 1e-5
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_512) -> dict:
    out = tmp_path_factory.mktemp("sft_parallel")
    base = compose_config([
        "model=tiny", "task=sft", f"task.files=[{short_records(out / 'short.jsonl')}]", "task.template=llama2",
        f"train.init_from={tiny_base(out / 'base', tokenizer_512)}", "train.seq_len=128",
        "train.global_batch_tokens=1024", "train.micro_batch_size=2", "train.steps=6", "train.log_every=0",
        "train.eval_every=0", "train.ckpt_every=0", "optim.warmup_steps=2", "optim.lr=3e-3",
        "model.activation=selective", "train.document_mask=true", "logging.wandb.enabled=false",
        f"data.manifest={REPO}/unused.json", "parallel.bucket_size=40000"])
    (out / "base.json").write_text(json.dumps(base))
    results = torchrun_results(WORKERS / "sft_worker.py", out, ["tp2_sp", "dp2_z1"], "--base", out / "base.json",
                               nproc=2, timeout=300)
    cfg = {**base, "train": {**base["train"], "out_dir": str(out / "single")}}
    trainer = Trainer(resolve(cfg), OmegaConf.create(cfg))
    steps, original = {}, trainer.train_step

    def recorded(micro_batches):
        metrics = original(micro_batches)
        steps[str(trainer.step)] = metrics["loss"]
        return metrics
    trainer.train_step = recorded
    try:
        trainer.fit()
    finally:
        trainer.close()
    return {**results, "single": steps}


def test_sft_losses_track_one_process(runs):
    single = runs["single"]
    assert len(single) == 6
    for case in ("tp2_sp", "dp2_z1"):
        for rank, result in enumerate(runs[case]):
            assert result["steps"].keys() == single.keys(), case
            for step, loss in result["steps"].items():
                assert abs(loss - single[step]) <= TOL * single[step], (case, rank, step, loss, single[step])
    assert (runs["tp2_sp"][0]["tp"], runs["dp2_z1"][0]["dp"], runs["dp2_z1"][0]["zero"]) == (2, 2, 1)


def test_vocab_parallel_loss_with_a_loss_mask(runs):
    for check in (r["masked_loss"] for r in runs["tp2_sp"]):
        assert check["gathered_ok"] and check["loss_err"] <= 1e-6 and check["same_for_other_targets"]
        assert check["unscored_grad_nonzero"] == 0 and check["scored_grad_nonzero"] > 0
