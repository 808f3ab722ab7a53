"""The lm-eval adapter against lm-eval's own Hugging Face model (transformers' LlamaForCausalLM) on our export;
local tasks through lm_eval.simple_evaluate and the eval command; task files and suites refused in one line."""
import json

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from llama_pt.evaluation.harness import LlamaPtLM
from llama_pt.evaluation.tasks import (SHIPPED_TASKS, TaskFileError, build_tasks, evaluate_tasks, load_task_file,
                                       resolve_names, task_manager)
from llama_pt.hf_interop import export_hf
from llama_pt.model import VOCAB_ROWS, Llama, ModelConfig
from llama_pt.pretrained import main
from llama_pt.pretrained.lm_eval_model import PretrainedLM

TOL = 1e-5
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
GPL = ("This program is free software: you can redistribute it and/or modify it under the terms of the GNU "
       "General Public License as published by the Free Software Foundation, either version 3 of the License, or "
       "(at your option) any later version. This program is distributed in the hope that it will be useful, but "
       "WITHOUT ANY WARRANTY; without even the implied warranty of MERCHANTABILITY or FITNESS FOR A PARTICULAR "
       "PURPOSE. See the GNU General Public License for more details.")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer_512):
    """A random model (every parameter, norms included, so that a misplaced tensor shows) as a float32 HF folder."""
    torch.manual_seed(0)
    model = Llama(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
            if name in VOCAB_ROWS:
                p[CFG.vocab_size:] = 0.0
    return export_hf(model, CFG, tmp_path_factory.mktemp("hf") / "model", tokenizer_path=tokenizer_512,
                     dtype="float32")


@pytest.fixture(scope="module")
def ours(hf_folder):
    return PretrainedLM(str(hf_folder), device="cpu", dtype="float32", batch_size=3)


@pytest.fixture(scope="module")
def reference(hf_folder):
    return HFLM(pretrained=str(hf_folder), device="cpu", dtype="float32", batch_size=3)


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


PAIRS = [("This program is free software:", " you can redistribute it"),
         ("", "The GNU General Public License"),            # empty context: BOS alone
         ("See the GNU General Public License for ", "more details."),  # trailing space moves to the continuation
         (GPL, " Copyright (C) 2007 Free Software Foundation"),  # longer than max_seq_len: left-truncated
         ("WITHOUT ANY", " WARRANTY")]


def close(a, b):
    return abs(a - b) <= TOL * max(abs(b), 1e-6)


def test_loglikelihoods_equal_transformers_on_the_export(ours, reference):
    assert len(ours.tok_encode(GPL)) > CFG.max_seq_len + 1
    got = ours.loglikelihood(requests("loglikelihood", PAIRS))
    want = reference.loglikelihood(requests("loglikelihood", PAIRS))
    assert all(close(g[0], w[0]) for g, w in zip(got, want)), (got, want)
    assert [g[1] for g in got] == [w[1] for w in want]
    # one request per batch gives the same numbers as batches of three, padded and sorted by length
    single = LlamaPtLM(ours.model, ours.tokenizer, batch_size=1).loglikelihood(requests("loglikelihood", PAIRS))
    assert all(close(s[0], g[0]) for s, g in zip(single, got))


def test_rolling_loglikelihood_scores_the_text_after_one_bos(ours, reference):
    """HFLM also scores BOS after the BOS prefix (lm-eval issue #3333); without its own BOS it computes ours."""
    texts = [GPL, "Free software.", GPL[:300]]
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    saved, reference.add_bos_token = reference.add_bos_token, False
    try:
        want = reference.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    finally:
        reference.add_bos_token = saved
    assert all(close(g, w) for g, w in zip(got, want)), (got, want)
    # by hand: log P(text | BOS) when the text fits in one window
    ids = ours.tokenizer.encode("Free software.", bos=True)
    with torch.no_grad():
        logp = torch.log_softmax(ours.model(torch.tensor([ids]))[0, :-1, :CFG.vocab_size].double(), -1)
    assert close(got[1], logp[torch.arange(len(ids) - 1), ids[1:]].sum().item())


def test_greedy_generation_equals_transformers(ours, reference):
    """Prompts of three lengths decoded together give transformers' greedy tokens for each alone, the text cut
    at the first stop string. (The tokens, not HFLM's strings: the random model emits byte pieces, which our
    SentencePiece decodes to the bytes and transformers' tokenizer to U+FFFD.)"""
    gen = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    prompts = [("This program is free", gen), ("The GNU General Public License is a", gen), ("Copyright", gen)]
    got = ours.generate_until(requests("generate_until", prompts))
    full = []
    for (prompt, _), text in zip(prompts, got):
        ids = ours.tok_encode(prompt)
        new = reference.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                       eos_token_id=CFG.vocab_size, pad_token_id=0)[0, len(ids):].tolist()
        full.append(ours.tokenizer.decode(new))
        assert text == full[-1].split("e")[0]
    assert any("e" in text for text in full)  # a stop string did cut


def test_local_tasks_run_offline_through_simple_evaluate(hf_folder, reference):
    """The registered model "llama_pt" on the shipped tasks: lm-eval's numbers are those of its HF model."""
    tasks = [load_task_file(SHIPPED_TASKS / f"{name}.yaml") for name in ("demo_hellaswag", "demo_piqa", "demo_arc")]
    local = TaskManager(include_defaults=False)  # lm-eval's own tasks are not needed: no index of them
    ours = simple_evaluate(model="llama_pt", model_args=f"pretrained={hf_folder},dtype=float32,device=cpu",
                           tasks=tasks, limit=10, log_samples=False, bootstrap_iters=0, task_manager=local)["results"]
    want = simple_evaluate(model=reference, tasks=tasks, limit=10, log_samples=False, bootstrap_iters=0,
                           task_manager=local)["results"]
    for name in ("demo_hellaswag", "demo_piqa", "demo_arc"):
        assert ours[name]["acc,none"] == want[name]["acc,none"]
        assert ours[name]["acc_norm,none"] == want[name]["acc_norm,none"]


def test_eval_command_prints_the_table_and_shots_follow_the_suite(hf_folder, capsys):
    assert main(["eval", str(hf_folder), "--tasks", f"demo_piqa,{SHIPPED_TASKS / 'demo_arc.yaml'}",
                 "--limit", "4", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if "acc" in line]
    assert [(r[0], r[4]) for r in rows] == [("demo_arc", "acc"), ("", "acc_norm"),
                                            ("demo_piqa", "acc"), ("", "acc_norm")]
    # a suite's entries run one lm_eval.simple_evaluate per shot count, each task at its count
    entries = resolve_names(["demo_piqa", "demo_arc"])
    manager = task_manager([spec for spec, _ in entries])
    piqa, arc = build_tasks([spec for spec, _ in entries], manager)
    lm = PretrainedLM(str(hf_folder), device="cpu", dtype="float32")
    results = evaluate_tasks(lm, [(piqa, 0), (arc, 2)], manager, limit=3)
    assert [r["n-shot"] for r in results] == [{"demo_piqa": 0}, {"demo_arc": 2}]


def write_task(tmp_path, items, **changes):
    """The shipped demo_piqa.yaml with `changes`, over `items` written next to it."""
    text = (SHIPPED_TASKS / "demo_piqa.yaml").read_text()
    for old, new in changes.items():
        text = text.replace(old, new)
    (tmp_path / "demo_piqa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


ITEM = {"goal": "Free software", "sol1": "is free", "sol2": "costs money", "label": 0}


def test_a_task_file_with_wrong_fields_is_one_line_before_any_work(tmp_path, capsys):
    with pytest.raises(TaskFileError, match=r"bad.yaml: unknown field 'doc_to_txt'"):
        load_task_file(write_task(tmp_path, [ITEM], doc_to_text="doc_to_txt"))
    missing = write_task(tmp_path, [ITEM, ITEM, {k: v for k, v in ITEM.items() if k != "sol2"}])
    with pytest.raises(TaskFileError,
                       match=r"demo_piqa.jsonl line 3: no field 'sol2' \(read by doc_to_choice of .*bad.yaml\)"):
        load_task_file(missing)
    arc = SHIPPED_TASKS / "demo_arc.yaml"
    (tmp_path / "demo_arc.jsonl").write_text(json.dumps({"id": "x", "question": "q", "answerKey": "A",
                                                         "choices": {"label": ["A", "B"]}}) + "\n")
    (tmp_path / "arc.yaml").write_text(arc.read_text())
    with pytest.raises(TaskFileError, match=r"demo_arc.jsonl line 1: no field 'choices.text'"):
        load_task_file(tmp_path / "arc.yaml")
    # the command stops before loading the model (which does not exist)
    assert main(["eval", str(tmp_path / "no_model"), "--tasks", str(missing)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no field 'sol2'" in err


def test_a_suite_without_its_data_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Offline with an empty datasets cache, every task of the paper's Table 3 (and MMLU, a group) is named in
    one line, before any model is loaded."""
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "datasets")
    assert main(["eval", str(tmp_path / "no_model"), "--tasks", "llama1_zero_shot", "mmlu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the data of 9 lm-eval task(s) is not available")
    for task in ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                 "mmlu"):
        assert f" {task} (" in err
    assert "boolq (aps/super_glue)" in err and "OfflineModeIsEnabled" in err
    assert resolve_names(["llama1_closed_book_qa"])[:4] == [("nq_open", 0), ("nq_open", 1), ("nq_open", 5),
                                                            ("nq_open", 64)]
    assert ("mmlu", 5) in resolve_names(["llama1"])


@pytest.mark.cuda
def test_on_a_gpu_the_device_is_chosen_and_the_scores_agree_with_the_cpu(hf_folder, ours):
    gpu = PretrainedLM(str(hf_folder), dtype="float32", batch_size=3)  # device auto: the GPU
    assert gpu.model.tok_embeddings.weight.device.type == "cuda"
    got = gpu.loglikelihood(requests("loglikelihood", PAIRS))
    want = ours.loglikelihood(requests("loglikelihood", PAIRS))
    assert all(abs(g[0] - w[0]) <= 1e-4 * abs(w[0]) for g, w in zip(got, want))
    half = PretrainedLM(str(hf_folder), batch_size=3)  # dtype auto on a GPU: bf16 weights
    assert half.model.output.weight.dtype == torch.bfloat16 and half.model.rope_cos.dtype == torch.float32
    halved = half.loglikelihood(requests("loglikelihood", PAIRS))
    assert all(abs(h[0] - w[0]) <= 0.05 * abs(w[0]) for h, w in zip(halved, want))
