"""Downstream accuracy during pretraining (train.downstream_every, train.downstream_task): logged at the right
steps to metrics.jsonl and wandb, drawn under the loss curve, and equal to the adapter run on the checkpoints."""
import json

import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from matplotlib.image import imread

from support import REPO, make_config
from support.torchrun import run_torchrun

from llama_pt.evaluation.tasks import SHIPPED_TASKS, load_task_file
from llama_pt.pretrained.lm_eval_model import PretrainedLM
from llama_pt.train import run_log
from llama_pt.train.checkpoint import list_checkpoints
from llama_pt.train.entry import run_training


class FakeWandb:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        pass


def test_accuracy_is_logged_at_its_steps_and_equals_the_adapter_on_the_checkpoints(tmp_path, token_corpus,
                                                                                    monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setattr(run_log, "_start_wandb", lambda out_dir, config, cfg: wandb)
    result = run_training(make_config(tmp_path, token_corpus, "train.steps=5", "train.downstream_every=2",
                                      "train.downstream_task=demo_piqa", "train.ckpt_every=2",
                                      "logging.wandb.enabled=true"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "downstream_acc" in r]
    assert [r["step"] for r in scored] == [2, 4, 5]  # every 2 steps, and the last
    assert set(scored[0]) == {"step", "downstream_acc", "downstream_acc_norm", "downstream_s"}
    assert [(s, v["downstream_acc"]) for s, v in wandb.logged if "downstream_acc" in v] == \
        [(r["step"], r["downstream_acc"]) for r in scored]
    # the same numbers from each checkpoint, through the registered model and lm_eval.simple_evaluate
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000002", "step_00000004", "step_00000005"]
    task, manager = load_task_file(SHIPPED_TASKS / "demo_piqa.yaml"), TaskManager(include_defaults=False)
    for record, checkpoint in zip(scored, checkpoints):
        lm = PretrainedLM(str(checkpoint), device="cpu", dtype="float32", batch_size=4)  # train.micro_batch_size
        got = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=False,
                              bootstrap_iters=0)["results"]["demo_piqa"]
        assert (got["acc,none"], got["acc_norm,none"]) == (record["downstream_acc"], record["downstream_acc_norm"])
    assert imread(result["loss_curve"]).shape[:2] == (720, 840)  # the accuracy panel under the loss: 7 x 6 in


def test_downstream_needs_a_task_and_a_bad_one_stops_the_run_before_a_step(tmp_path, token_corpus, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_training(make_config(tmp_path, token_corpus, "train.steps=2", "train.downstream_every=1"))
    assert stopped.value.code == 2
    assert "train.downstream_every=1 needs train.downstream_task" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text((SHIPPED_TASKS / "demo_arc.yaml").read_text().replace("doc_to_choice", "doc_to_choices"))
    with pytest.raises(SystemExit):
        run_training(make_config(tmp_path, token_corpus, "train.steps=2", "train.downstream_every=1",
                                 f"train.downstream_task={bad}"))
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: unknown field 'doc_to_choices' (not one of lm-eval's TaskConfig fields)"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensor_parallel_ranks_score_together(tmp_path, token_corpus):
    """TP=2 with sequence parallelism under torchrun: both ranks run the evaluation (logits gathered, batches
    padded to even lengths), rank 0 logs it, and it is what one process computes from the checkpoint."""
    proc = run_torchrun(REPO / "train.py", f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null",
                        f"train.out_dir={tmp_path}", f"hydra.run.dir={tmp_path}", "model=tiny", "train.seq_len=32",
                        "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.steps=1",
                        "train.ckpt_every=1", "train.eval_every=0", "logging.wandb.enabled=false",
                        "parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "train.downstream_every=1",
                        "train.downstream_task=demo_piqa", nproc=2, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "downstream_acc" in r]
    assert [r["step"] for r in scored] == [1]
    lm = PretrainedLM(str(list_checkpoints(tmp_path / "checkpoints")[-1]), device="cpu", dtype="float32", batch_size=4)
    got = simple_evaluate(model=lm, tasks=[load_task_file(SHIPPED_TASKS / "demo_piqa.yaml")], log_samples=False,
                          task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)["results"]["demo_piqa"]
    assert (got["acc,none"], got["acc_norm,none"]) == (scored[0]["downstream_acc"], scored[0]["downstream_acc_norm"])
