"""Instruction tuning through the real trainer (train.py's path, task=sft): the loss over response tokens falls,
gradient accumulation equals one big batch, resume is bitwise, LoRA and unpacked windows run, document masking
also in pretraining, and the one-line refusals."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llama_pt.config import resolve
from llama_pt.train.entry import run_training
from llama_pt.train.trainer import Trainer
from support import losses, make_config
from support.instruct_data import short_records, tiny_base


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tokenizer_512) -> tuple[str, ...]:
    root = tmp_path_factory.mktemp("sft")
    base = tiny_base(root / "base", tokenizer_512)
    data = short_records(root / "short.jsonl")
    return ("task=sft", f"task.files=[{data}]", "task.template=llama2", f"train.init_from={base}",
            "train.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=4",
            "model.activation=selective", "train.document_mask=true")


def _trainer(tmp_path, token_corpus, *overrides) -> Trainer:
    cfg = OmegaConf.to_container(make_config(tmp_path, token_corpus, *overrides))
    return Trainer(resolve(cfg), cfg)


def test_sft_loss_over_responses_falls(tmp_path, token_corpus, sft, capsys):
    run_training(make_config(tmp_path, token_corpus, *sft, "train.steps=20", "optim.lr=1e-2"))
    got = list(losses(tmp_path).values())
    assert sum(got[-5:]) / 5 < 0.7 * sum(got[:3]) / 3, got
    log = capsys.readouterr().out
    assert "instruction records: 60 read, 60 kept; skipped: none" in log and "template llama2: none cut" in log


@pytest.mark.parametrize("document_mask", [True, False])
def test_sft_gradient_accumulation_equals_one_big_batch(tmp_path, token_corpus, sft, document_mask):
    """8 windows as one micro-batch or as four of two: the response tokens fall unevenly into micro-batches,
    and the loss is still their mean over the global batch."""
    results = []
    for micro in (8, 2):
        trainer = _trainer(tmp_path / str(micro), token_corpus, *sft, f"train.micro_batch_size={micro}",
                           f"train.document_mask={str(document_mask).lower()}")
        grads = {}
        trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                                       if p.grad is not None})
        batches = next(iter(trainer.data.loader))
        counts = [int(b[:, 2, 1:].sum()) for b in batches]
        results.append((trainer.train_step(batches), grads, counts))
        trainer.close()
    (one, g1, _), (four, g4, counts) = results
    assert len(set(counts)) > 1  # the micro-batches hold different numbers of response tokens
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert g1.keys() == g4.keys() and len(g1) == 21
    for name in g1:
        assert ((g4[name] - g1[name]).norm() / g1[name].norm()).item() <= 1e-5, name


def test_sft_resume_is_bitwise(tmp_path, token_corpus, sft):
    common = (*sft, "train.steps=4", "train.ckpt_every=2")
    run_training(make_config(tmp_path / "straight", token_corpus, *common))
    assert run_training(make_config(tmp_path / "resumed", token_corpus, *common, "train.exit_interval=2"))["step"] == 2
    run_training(make_config(tmp_path / "resumed", token_corpus, *common))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == 4 and resumed == straight


def test_sft_with_lora_and_one_example_per_window(tmp_path, token_corpus, sft, capsys):
    run_training(make_config(tmp_path, token_corpus, *sft, "peft=lora", "peft.rank=4", "peft.dropout=0.1",
                             "task.packing=false", "train.steps=4", "train.ckpt_every=4", "optim.lr=1e-2"))
    got = losses(tmp_path)
    assert len(got) == 4 and all(torch.isfinite(torch.tensor(v)) for v in got.values())
    log = capsys.readouterr().out
    assert "one per window: 60 windows of 129 per epoch" in log


def test_pretraining_windows_with_document_masks(tmp_path, token_corpus):
    """The same first global batch with and without train.document_mask: the EOS-separated documents no longer
    see each other, which changes the loss (every target still counts)."""
    got = {}
    for mask in ("true", "false"):
        trainer = _trainer(tmp_path / mask, token_corpus, f"train.document_mask={mask}", "model.activation=selective")
        got[mask] = trainer.train_step(next(iter(trainer.data.loader)))["loss"]
        trainer.close()
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values()) and got["true"] != got["false"]


@pytest.mark.parametrize("override, message", [
    ("task.template=chatml", "task.template='chatml' is unknown (known: alpaca, llama2, llama3, vicuna_v1.1"),
    ("task.files=[/nonexistent.jsonl]", "task.files: /nonexistent.jsonl does not exist"),
    ("train.init_from=null", "task=sft needs a tokenizer"),
])
def test_bad_sft_config_stops_with_one_line(tmp_path, token_corpus, sft, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run_training(make_config(tmp_path, token_corpus, *sft, override))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_held_out_examples_are_not_trained_on_and_score_their_responses_as_alone(tmp_path, token_corpus, sft):
    """task.valid_fraction: the examples held out (by a hash of their tokens) never reach the training windows,
    and the held-out loss is the mean NLL of their response tokens, each example run alone."""
    import torch.nn.functional as F

    from llama_pt.data.batch import DOCUMENTS, SCORED, TOKENS
    trainer = _trainer(tmp_path, token_corpus, *sft, "task.valid_fraction=0.25", "train.eval_every=2")
    try:
        held = trainer.data.valid.windows
        trained = {tuple(e.ids.tolist()) for e in trainer.data.loader.samples.examples}
        alone = []
        for window in held:
            n = int((window[DOCUMENTS] == 0).sum())
            ids, scored = window[TOKENS, :n], window[SCORED, :n].astype(bool)
            assert tuple(ids.tolist()) not in trained
            alone.append((torch.from_numpy(ids), torch.from_numpy(scored)))
        assert 5 <= len(alone) <= 30, len(alone)  # about a quarter of 60
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, scored in alone:
                logits = trainer.model(ids[None, :-1])[0, :, :trainer.run.model.vocab_size]
                total += F.cross_entropy(logits[scored[1:]], ids[1:][scored[1:]], reduction="sum").item()
                count += int(scored[1:].sum())
        got = trainer.evaluate()
        assert got["valid_loss"] == pytest.approx(total / count, rel=1e-5)
    finally:
        trainer.close()
