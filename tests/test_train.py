"""The single-process trainer end to end through the Hydra config, as `python train.py` runs it."""
import json
import subprocess
import sys

import pytest
import torch

from support import REPO, final_weights, losses, make_config
from llama_pt.train.checkpoint import list_checkpoints
from llama_pt.train.entry import run_training


def test_loss_falls_and_outputs_are_written(tmp_path, token_corpus):
    cfg = make_config(tmp_path, token_corpus, "train.steps=30", "train.eval_every=15", "train.ckpt_every=15",
                      "logging.wandb.enabled=true")
    result = run_training(cfg)
    got = losses(tmp_path)
    assert len(got) == 30
    assert sum(list(got.values())[-5:]) / 5 < 0.8 * sum(list(got.values())[:3]) / 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_ppl" in r] == [15, 30]
    assert all({"lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records if "loss" in r)
    assert result["loss_curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000015", "step_00000030"]
    assert any((tmp_path / "wandb").glob("offline-run-*")), "wandb should have logged offline"


def _first_step_gradients(tmp_path, token_corpus, micro_batch_size):
    from omegaconf import OmegaConf
    from llama_pt.config import resolve
    from llama_pt.train.trainer import Trainer
    cfg = OmegaConf.to_container(make_config(tmp_path, token_corpus, f"train.micro_batch_size={micro_batch_size}"))
    trainer = Trainer(resolve(cfg), cfg)
    grads = {}
    trainer.optimizer.step = lambda: grads.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    metrics = trainer.train_step(next(iter(trainer.data.loader)))
    return metrics, grads


def test_gradient_accumulation_equals_one_big_batch(tmp_path, token_corpus):
    one_batch, g1 = _first_step_gradients(tmp_path / "a", token_corpus, micro_batch_size=16)
    accumulated, g4 = _first_step_gradients(tmp_path / "b", token_corpus, micro_batch_size=4)
    assert accumulated["loss"] == pytest.approx(one_batch["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(one_batch["grad_norm"], rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-8)


def test_resume_gives_bitwise_identical_losses_and_weights(tmp_path, token_corpus):
    common = ("train.steps=8", "train.ckpt_every=4")
    run_training(make_config(tmp_path / "straight", token_corpus, *common))
    first = run_training(make_config(tmp_path / "resumed", token_corpus, *common, "train.exit_interval=4"))
    assert first["step"] == 4 and not first["finished"]
    second = run_training(make_config(tmp_path / "resumed", token_corpus, *common))
    assert second["step"] == 8 and second["finished"]
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert resumed == straight  # exact float equality, steps 1..8
    ws, wr = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_a_checkpoint_from_before_vocabulary_padding_loads_and_resumes(tmp_path, token_corpus):
    """Its trainer state has no model.vocab_multiple; its tables have vocab_size rows (512: a multiple of 64)."""
    import hashlib

    from llama_pt.model import get_preset
    from llama_pt.pretrained import load_checkpoint_model
    run_training(make_config(tmp_path, token_corpus, "train.steps=2", "train.ckpt_every=2"))
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["model_config"]["vocab_multiple"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["trainer_state.json"] = {"bytes": (ckpt / "trainer_state.json").stat().st_size,
                                      "sha256": hashlib.sha256((ckpt / "trainer_state.json").read_bytes()).hexdigest()}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    assert load_checkpoint_model(ckpt)[0].cfg == get_preset("tiny")
    assert run_training(make_config(tmp_path, token_corpus, "train.steps=3", f"train.resume={ckpt}"))["step"] == 3


def test_corrupt_checkpoint_is_refused_by_explicit_resume(tmp_path, token_corpus, capsys):
    run_training(make_config(tmp_path, token_corpus, "train.steps=2", "train.ckpt_every=2"))
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SystemExit) as exit_info:
        run_training(make_config(tmp_path, token_corpus, "train.steps=4", f"train.resume={ckpt}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint {ckpt} is corrupt: {shard.name} does not match its checksum"]


@pytest.mark.parametrize("override, field", [
    ("model.dim=66", "model.n_heads=4 does not divide model.dim=66"),
    ("model.n_kv_heads=3", "model.n_heads=4 is not a multiple of model.n_kv_heads=3"),
    ("train.seq_len=512", "train.seq_len=512 exceeds the RoPE table of model.max_seq_len=256"),
    ("model.preset=llama9_1t", "model.preset='llama9_1t' is unknown"),
    ("data.manifest=/nonexistent/mixture.json", "data.manifest=/nonexistent/mixture.json"),
    ("train.micro_batch_size=3", "train.micro_batch_size=3 does not divide the per-rank batch of 16"),
    ("train.global_batch_tokens=500", "train.global_batch_tokens=500 is not a multiple of train.seq_len=32"),
    ("optim.lr=-1", "optim.lr=-1"),
])
def test_bad_config_stops_at_startup_with_one_line(tmp_path, token_corpus, capsys, override, field):
    with pytest.raises(SystemExit) as exit_info:
        run_training(make_config(tmp_path, token_corpus, override))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and field in err[0], err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_train_py_command_line_and_multirun(tmp_path, token_corpus):
    args = [sys.executable, "train.py", "--multirun", f"hydra.sweep.dir={tmp_path}", "model=tiny",
            f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", "train.seq_len=32",
            "train.global_batch_tokens=256", "train.log_every=1",
            "train.micro_batch_size=8", "train.steps=2", "train.ckpt_every=0", "train.eval_every=0",
            "logging.wandb.enabled=false", "optim.warmup_steps=0", "optim.lr=1e-3,2e-3"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lrs = []
    for job in ("0", "1"):
        records = [json.loads(x) for x in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
        lrs.append(max(r["lr"] for r in records))
    assert lrs == pytest.approx([1e-3, 2e-3])


def test_continue_pretraining_from_an_exported_hugging_face_folder(tmp_path, token_corpus):
    from llama_pt.pretrained import export_checkpoint, load_hf_model
    first = run_training(make_config(tmp_path / "first", token_corpus, "train.steps=20", "train.ckpt_every=20"))
    hf_dir = export_checkpoint(list_checkpoints(first["out_dir"] / "checkpoints")[-1], tmp_path / "hf",
                               dtype="float32")
    exported = load_hf_model(hf_dir).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in final_weights(first["out_dir"]).items())
    # The model config comes from the folder: the preset named here is not used.
    cont = run_training(make_config(tmp_path / "cont", token_corpus, "train.steps=1", "model=demo",
                                    f"train.init_from={hf_dir}", "train.resume=none"))
    scratch = run_training(make_config(tmp_path / "scratch", token_corpus, "train.steps=1"))
    assert losses(cont["out_dir"])[1] < 0.8 * losses(scratch["out_dir"])[1]


def test_activation_modes_are_selected_by_config_and_agree(tmp_path, token_corpus):
    runs = {mode: losses(run_training(make_config(tmp_path / mode, token_corpus, "train.steps=3",
                                                  f"model.activation={mode}"))["out_dir"])
            for mode in ("none", "selective", "full")}
    for mode in ("selective", "full"):
        assert runs[mode] == pytest.approx(runs["none"], rel=1e-5)


def test_unknown_activation_mode_is_one_line(tmp_path, token_corpus, capsys):
    with pytest.raises(SystemExit):
        run_training(make_config(tmp_path, token_corpus, "model.activation=some"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.activation" in err[0]


def test_a_config_that_cannot_fit_is_refused_with_the_numbers(tmp_path, token_corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_training(make_config(tmp_path, token_corpus, "model=llama1_65b", "train.seq_len=2048",
                                 "train.global_batch_tokens=4096", "train.micro_batch_size=2"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB" in err[0], err
    assert not (tmp_path / "metrics.jsonl").exists()
