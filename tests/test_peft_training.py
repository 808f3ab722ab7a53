"""Adapter training through the real trainer (train.py's path): LoRA and QLoRA on a base from train.init_from,
checkpoints that hold only what trains, bitwise resume, merged and peft exports, and the one-line refusals."""
import json
import subprocess
import sys

import pytest
import torch

from support import REPO, final_weights, losses, make_config
from llama_pt.train.checkpoint import SafeFileSystemReader, list_checkpoints
from llama_pt.train.entry import run_training

LORA = ("peft=lora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0.0",
        "peft.targets=[wq,wk,wv,wo,w1,w2,w3]", "peft.modules_to_save=[output]")


@pytest.fixture(scope="module")
def base(tmp_path_factory, token_corpus):
    """A Hugging Face folder of a tiny model trained for a few steps (the base the adapters start from)."""
    root = tmp_path_factory.mktemp("peft_base")
    run_training(make_config(root / "run", token_corpus, "train.steps=20", "train.ckpt_every=20"))
    from llama_pt.pretrained import export_checkpoint
    return export_checkpoint(list_checkpoints(root / "run" / "checkpoints")[-1], root / "hf", dtype="float32")


def _checkpoint_keys(path) -> set[str]:
    return set(SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata)


def test_lora_trains_and_checkpoints_hold_only_what_trains(tmp_path, token_corpus, base):
    run_training(make_config(tmp_path, token_corpus, *LORA, f"train.init_from={base}", "train.steps=30",
                             "train.ckpt_every=30", "optim.lr=1e-2"))
    got = list(losses(tmp_path).values())
    assert sum(got[-5:]) / 5 < sum(got[:3]) / 3 - 0.05, got
    keys = {k.removeprefix("model.") for k in _checkpoint_keys(list_checkpoints(tmp_path / "checkpoints")[-1])
            if k.startswith("model.")}
    assert keys == {"output.weight"} | {f"layers.{i}.{m}.{w}.adapter.lora_{x}" for i in range(2)
                                       for m, ws in (("attention", "wq wk wv wo"), ("feed_forward", "w1 w2 w3"))
                                       for w in ws.split() for x in "AB"}


def test_lora_resume_is_bitwise(tmp_path, token_corpus, base):
    common = (*LORA, f"train.init_from={base}", "train.steps=8", "train.ckpt_every=4")
    run_training(make_config(tmp_path / "straight", token_corpus, *common))
    first = run_training(make_config(tmp_path / "resumed", token_corpus, *common, "train.exit_interval=4"))
    assert first["step"] == 4
    run_training(make_config(tmp_path / "resumed", token_corpus, *common))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exports_merge_into_the_base_and_load_in_peft(tmp_path, token_corpus, base):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run_training(make_config(tmp_path / "run", token_corpus, *LORA, f"train.init_from={base}", "train.steps=6",
                             "train.ckpt_every=6", "optim.lr=1e-2"))
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    from llama_pt.pretrained import load_checkpoint_model, main
    assert main(["export", str(ckpt), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert main(["export-peft", str(ckpt), str(tmp_path / "adapter")]) == 0
    ours, _ = load_checkpoint_model(ckpt)
    tokens = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens)[..., :512]
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
        hf_base = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        for logits in (merged(tokens).logits, adapted(tokens).logits):
            assert ((logits.double() - want.double()).norm() / want.double().norm()).item() <= 1e-5
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]


def test_qlora_trains_on_cpu(tmp_path, token_corpus, base):
    run_training(make_config(tmp_path, token_corpus, "peft=qlora", "peft.rank=4", "peft.alpha=8",
                             "peft.dropout=0.0", "peft.modules_to_save=[output]", f"train.init_from={base}",
                             "++model.activation=full", "train.steps=30", "optim.lr=1e-2"))
    got = list(losses(tmp_path).values())
    assert sum(got[-5:]) / 5 < sum(got[:3]) / 3 - 0.05, got


@pytest.mark.parametrize("overrides, message", [
    (("peft=lora",), "peft.method=lora needs train.init_from"),
    (("peft=qlora", "train.init_from={base}"), "peft.method=qlora needs model.activation=full or none"),
    (("peft=lora", "peft.rank=0", "train.init_from={base}"), "peft.rank=0 must be a positive integer"),
    (("peft=lora", "peft.targets=[wq,wz]", "train.init_from={base}"), "peft.targets: 'wz' is not one of"),
    (("peft=qlora", "parallel.tensor_parallel=2", "++model.activation=full", "train.init_from={base}"),
     "peft.method=qlora with parallel.tensor_parallel=2 is unsupported"),
])
def test_bad_peft_settings_are_one_line_before_any_work(tmp_path, token_corpus, base, overrides, message):
    overrides = [o.format(base=base) for o in overrides]
    cmd = [sys.executable, "-m", "llama_pt.train.check", "--world-size", "2", f"data.manifest={token_corpus['manifest']}",
           "model=tiny", "train.seq_len=32", "train.global_batch_tokens=512", "train.micro_batch_size=4",
           f"train.out_dir={tmp_path}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def _torchrun_train(tmp_path, token_corpus, base, *overrides, peft=LORA):
    from support.torchrun import run_torchrun
    args = [f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", f"train.out_dir={tmp_path}",
            "model=tiny", "train.seq_len=32", "train.global_batch_tokens=512", "train.micro_batch_size=4",
            "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2", "optim.lr=1e-2",
            "logging.wandb.enabled=false", f"train.init_from={base}", *peft, *overrides]
    done = run_torchrun(REPO / "train.py", *args, nproc=2, env={"OMP_NUM_THREADS": "1"}, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("parallel.tensor_parallel=2",),
                                    ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true"),
                                    ("parallel.zero_stage=1",), ("parallel.zero_stage=2",)])
def test_lora_at_tp2_and_under_zero_tracks_one_process(tmp_path, token_corpus, base, layout):
    """Two gloo processes: TP=2 (with and without SP) shards the adapters with their layers; ZeRO-1/2 over
    DP=2 partitions the adapters' optimizer state. Every loss of 10 steps within fp32 rounding (1e-5
    relative) of one process, and a resume at the same layout is bitwise."""
    common = ("train.steps=10", "train.ckpt_every=5")
    run_training(make_config(tmp_path / "one", token_corpus, *LORA, f"train.init_from={base}", *common,
                             "optim.lr=1e-2"))
    _torchrun_train(tmp_path / "two", token_corpus, base, *layout, *common)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * one[step], (step, one[step], two[step])
    _torchrun_train(tmp_path / "resumed", token_corpus, base, *layout, *common, "train.exit_interval=5")
    _torchrun_train(tmp_path / "resumed", token_corpus, base, *layout, *common)
    assert losses(tmp_path / "resumed") == two


@pytest.mark.slow
def test_qlora_under_zero_tracks_one_process(tmp_path, token_corpus, base):
    """QLoRA over DP=2 with ZeRO-1 (the NF4 base is replicated; only the adapters' optimizer state is
    partitioned): every loss within 1e-5 of one process."""
    qlora = ("peft=qlora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0.0", "peft.modules_to_save=[output]",
             "++model.activation=full", "train.steps=6")
    run_training(make_config(tmp_path / "one", token_corpus, *qlora, f"train.init_from={base}", "optim.lr=1e-2"))
    _torchrun_train(tmp_path / "two", token_corpus, base, "parallel.zero_stage=1", peft=qlora)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * one[step], (step, one[step], two[step])
