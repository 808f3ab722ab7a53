"""The continued-pretraining demo (`make demo-continue`): the Chinese-LLaMA recipe (Cui et al. 2023) run on
the demo's English model, offline on CPU.

Starts from what `make demo` left in runs/demo (--demo; demo/run_demo.py is run first when it is missing):
its English tokenizer, its clean text and its Hugging Face export. Then, printing each step:
1. the tokenizer is extended with Chinese pieces learned from Debian's fortunes-zh
   (`llama-data extend-tokenizer --new-characters-only`: held-out English keeps its token ids);
2. English (the demo's clean text, split as the demo split it) and Chinese (fortunes-zh, 1 in 20 held out)
   are tokenized with it into token shards, a mixture manifest and one held-out manifest per language;
3. the demo's export is grown to the new vocabulary (new rows at subtoken_mean) and pretrained further with
   LoRA on every projection and the embedding and head trained in full (Chinese-LLaMA's settings);
4. held-out perplexity of both languages, all under the extended tokenizer: the demo's model (English
   only), the grown base, and the model after continued pretraining, which measures English forgetting;
5. the run is exported merged (`export`) and as base + peft adapter (`export-peft`); transformers and peft
   load both and continue a Chinese prompt greedily to the same tokens.

Everything goes under runs/demo_continue/ (--out), with the figures in summary.json. Re-running redoes
steps 1-2 (identical outputs) and resumes training from its last checkpoint; --fresh starts over (needed
after changing --add or --character-coverage, which change the vocabulary).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "pipeline"))  # debian_text: fortunes-zh as the pipeline tests read it

import yaml  # noqa: E402
from debian_text import fortunes  # noqa: E402

from data_pipeline.tokenize_stage import clean_files, in_valid_split, iter_clean_records  # noqa: E402
from data_pipeline.tools.extend_tokenizer import Extension, extend_tokenizer, report_lines  # noqa: E402
from demo.run_demo import banner, ensure_demo  # noqa: E402
from llama_pt.tokenizer import Tokenizer  # noqa: E402

ZH_VALID_FRACTION = 0.05      # fortunes-zh documents held out, by a hash of their text
WEIGHTS = {"zh": 0.8, "en": 0.2}  # the training mixture: mostly Chinese, some English replayed
# Chinese-LLaMA-Alpaca's run_pt.sh (its lr is 2e-4 for 7B): LoRA rank 8, alpha 32, dropout 0.05 on all seven
# projections; the embedding and the head trained in full beside them.
LORA = ("peft=lora", "peft.rank=8", "peft.alpha=32", "peft.dropout=0.05", "peft.targets=[wq,wk,wv,wo,w1,w2,w3]",
        "peft.modules_to_save=[tok_embeddings,output]")
SEQ_LEN = 128
PROMPT = "白日依山尽，"
NEW_TOKENS = 20


def english_documents(clean: Path) -> tuple[list[str], list[str]]:
    """(train, held out): the demo's clean documents, held out exactly as its tokenize stage held them out."""
    fraction = yaml.safe_load((REPO / "configs" / "prep" / "demo.yaml").read_text())["tokenize"]["valid_fraction"]
    train, valid = [], []
    for source in sorted(p.name for p in clean.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in clean_files(clean, source):
            for record in iter_clean_records(path):
                (valid if in_valid_split(source, record["id"], fraction) else train).append(record["text"])
    return train, valid


def chinese_documents() -> tuple[list[str], list[str]]:
    """(train, held out): fortunes-zh's documents, each once, held out by a hash of the text."""
    docs = list(dict.fromkeys(fortunes("zh")))
    valid = [d for d in docs if in_valid_split("fortunes_zh", d, ZH_VALID_FRACTION)]
    held = set(valid)
    return [d for d in docs if d not in held], valid


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def extend(base: Path, corpus: dict[str, Path], out: Path, add: int, coverage: float) -> Extension:
    banner(f"1. vocabulary extension: the demo's English tokenizer + Chinese pieces from fortunes-zh (--add {add})")
    counts = {name: sum(1 for _ in path.open(encoding="utf-8")) for name, path in corpus.items()}
    print(f"  Chinese: fortunes-zh (sayings, Debian tips, Tang and Song poems), {counts['zh_train']} documents to "
          f"learn from, {counts['zh_valid']} held out; English held out: the demo's {counts['en_valid']} held-out "
          "documents")
    new = out / "tokenizer" / "zh_extended.model"
    print(f"  llama-data extend-tokenizer {base} {corpus['zh_train']} --add {add} --new-characters-only "
          f"--character-coverage {coverage} --out {new} --heldout-old {corpus['en_valid']} "
          f"--heldout-new {corpus['zh_valid']}", flush=True)
    ext = extend_tokenizer(base, new, corpus=[corpus["zh_train"]], add=add, new_characters_only=True,
                           character_coverage=coverage, heldout_old=[corpus["en_valid"]],
                           heldout_new=[corpus["zh_valid"]])
    for line in report_lines(ext):
        print("  " + line)
    for name, path in (("before", base), ("after", new)):
        print(f"  {PROMPT!r} {name}: {Tokenizer(path).encode_pieces(PROMPT)}")
    return ext


def write_tokens(tokenizer: Tokenizer, docs: dict[str, list[str]], out: Path) -> dict[str, Path]:
    """Token shards of every split ("en", "zh", "valid/en", "valid/zh") under out/; the training mixture and one
    held-out manifest per language. Returns {"train", "valid_en", "valid_zh"}: manifest paths."""
    from llama_pt.data import IndexedDatasetWriter, write_manifest

    banner("2. tokenizing English + Chinese with the extended tokenizer: token shards + mixture manifest")
    sources = {}
    for split, texts in docs.items():
        prefix = out / split / "shard_00000"
        ids = tokenizer.encode_batch(texts, eos=True)
        with IndexedDatasetWriter(prefix, tokenizer.vocab_size) as writer:
            for doc in ids:
                writer.add_document(doc)
        name = split.removeprefix("valid/")
        sources[split] = {"name": name, "prefixes": [prefix], "documents": len(ids),
                          "tokens": sum(map(len, ids)), "weight": WEIGHTS[name], "epochs": None}
        print(f"  {split:<9} {len(ids):5d} documents {sources[split]['tokens']:8d} tokens  {prefix}")

    def manifest(name: str, splits: list[str]) -> Path:
        return write_manifest(out / name, [sources[s] for s in splits], tokenizer.model_path,
                              tokenizer.vocab_size, tokenizer.eos_id)
    paths = {"train": manifest("mixture.json", ["zh", "en"]), "valid_en": manifest("valid_en.json", ["valid/en"]),
             "valid_zh": manifest("valid_zh.json", ["valid/zh"])}
    print(f"  mixture {paths['train']} (weights {WEIGHTS}); held out {paths['valid_en']}, {paths['valid_zh']}")
    return paths


def continue_pretraining(hf: Path, new_tokenizer: Path, manifest: Path, out: Path, steps: int) -> tuple[Path, float]:
    """Grow the base (for the evaluation and for peft), train; returns the run folder and its wall time."""
    from llama_pt.pretrained.resize import resize_model

    banner(f"3. continued pretraining from the grown base: LoRA + trained embedding and head, {steps} steps on CPU")
    grown = out / "grown"
    print(f"  python -m llama_pt.pretrained resize {hf} {new_tokenizer} {grown}   "
          "(the base the run starts from, for evaluation and for peft)", flush=True)
    resize_model(hf, new_tokenizer, grown)
    run_dir = out / "train"
    cmd = [sys.executable, "train.py", "name=demo_continue", f"train.out_dir={run_dir}", f"hydra.run.dir={run_dir}",
           f"train.init_from={hf}", f"train.init_tokenizer={new_tokenizer}", *LORA,
           f"data.manifest={manifest}", "data.valid_manifest=null", f"train.seq_len={SEQ_LEN}",
           "train.global_batch_tokens=4096", "train.micro_batch_size=16", f"train.steps={steps}",
           "train.log_every=10", "train.eval_every=0", f"train.ckpt_every={steps}", "optim.lr=2e-3",
           "optim.warmup_steps=20"]
    print("  " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return run_dir, time.perf_counter() - start


def training_figures(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return {"first_loss": losses[0], "last_loss": losses[-1], "mean_step_time_s": sum(step_times) / len(step_times)}


def perplexities(demo_hf: Path, grown: Path, checkpoint: Path, manifests: dict[str, Path],
                 english_ids_kept: bool) -> dict[str, dict[str, float]]:
    """{model: {language: perplexity}} on the held-out manifests, all under the extended tokenizer."""
    from llama_pt.data import load_manifest
    from llama_pt.evaluation import evaluate_perplexity
    from llama_pt.pretrained import load_model

    banner("4. held-out perplexity, every text tokenized with the extended tokenizer")
    models = {"grown": (grown, ("en", "zh")), "after": (checkpoint, ("en", "zh"))}
    if english_ids_kept:  # the held-out English ids are the old tokenizer's, so the demo's model reads them too
        models = {"demo": (demo_hf, ("en",)), **models}
    result: dict[str, dict[str, float]] = {}
    for name, (path, languages) in models.items():
        model = load_model(path)
        for lang in languages:
            manifest = manifests[f"valid_{lang}"]
            print(f"  python -m llama_pt.pretrained perplexity {path} --manifest {manifest} --seq-len {SEQ_LEN} "
                  "--batch-size 16", flush=True)
            prefixes = [p for s in load_manifest(manifest)["sources"] for p in s["prefixes"]]
            result.setdefault(name, {})[lang] = evaluate_perplexity(model, prefixes, SEQ_LEN, 16)["perplexity"]
    labels = {"demo": "the demo's model (old vocabulary)", "grown": "grown base (new rows at subtoken_mean)",
              "after": "after continued pretraining"}
    print("\n  | model | English | Chinese |\n  | --- | ---: | ---: |")
    for name, ppl in result.items():
        print(f"  | {labels[name]} | {ppl['en']:.2f} | " + (f"{ppl['zh']:.1f} |" if "zh" in ppl else "— |"))
    return result


def export_and_load(checkpoint: Path, tokenizer: Tokenizer, out: Path) -> dict:
    """Both exports, loaded by transformers and peft; greedy continuations of PROMPT from each and from
    llama_pt's checkpoint model."""
    import logging
    import warnings

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llama_pt.generate import generate
    from llama_pt.pretrained import export_checkpoint, load_checkpoint_model
    from llama_pt.pretrained.loading import export_peft_checkpoint

    banner("5. exports: merged (export) and base + adapter (export-peft), loaded by transformers and peft")
    merged_dir, adapter_dir = out / "hf", out / "adapter"
    print(f"  python -m llama_pt.pretrained export {checkpoint} {merged_dir} --dtype float32", flush=True)
    export_checkpoint(checkpoint, merged_dir, dtype="float32")
    grown_base = out / "grown_base"
    print(f"  python -m llama_pt.pretrained export-peft {checkpoint} {adapter_dir} --base-out {grown_base}",
          flush=True)
    export_peft_checkpoint(checkpoint, adapter_dir, base_out=grown_base)
    print(f"  {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")
    prompt = tokenizer.encode(PROMPT, bos=True)
    ours = generate(load_checkpoint_model(checkpoint)[0], [prompt], NEW_TOKENS, temperature=0.0)[0]
    merged = LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # peft's import looks for a 4-bit CPU kernel, unused here
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft 0.21, transformers 5
        adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(grown_base, dtype=torch.float32),
                                            adapter_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(merged_dir)
    continuations = {"llama_pt (checkpoint)": ours}
    with torch.no_grad():
        for name, model in (("transformers (merged)", merged), ("transformers + peft (grown base + adapter)", adapted)):
            continuations[name] = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    for name, ids in continuations.items():
        print(f"  greedy, {name + ':':<44} {PROMPT}{hf_tok.decode(ids)!r}")
    identical = len({tuple(ids) for ids in continuations.values()}) == 1
    print(f"  identical tokens: {identical}")
    return {"prompt": PROMPT, "continuation": hf_tok.decode(continuations["transformers (merged)"]),
            "identical_tokens": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="the outputs of make demo")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo_continue")
    parser.add_argument("--add", type=int, default=3000, help="Chinese pieces to learn (extend-tokenizer --add)")
    parser.add_argument("--character-coverage", type=float, default=0.99,
                        help="of the Chinese text's characters, by the learned pieces (the rest: byte pieces); "
                             "SentencePiece accepts 0.98 to 1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args()
    demo, out = args.demo.resolve(), args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    base, clean, hf = ensure_demo(demo)
    en_train, en_valid = english_documents(clean)
    zh_train, zh_valid = chinese_documents()
    corpus = {name: write_jsonl(out / "corpus" / f"{name}.jsonl", docs)
              for name, docs in (("zh_train", zh_train), ("zh_valid", zh_valid), ("en_valid", en_valid))}
    ext = extend(base, corpus, out, args.add, args.character_coverage)
    tokenizer = Tokenizer(ext.path)
    manifests = write_tokens(tokenizer, {"zh": zh_train, "en": en_train, "valid/zh": zh_valid,
                                         "valid/en": en_valid}, out / "tokens")
    run_dir, train_s = continue_pretraining(hf, ext.path, manifests["train"], out, args.steps)
    from llama_pt.train.checkpoint import list_checkpoints
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    english_ids_kept = ext.rows[0].changed_docs == 0
    ppl = perplexities(hf, out / "grown", checkpoint, manifests, english_ids_kept)
    generation = export_and_load(checkpoint, tokenizer, out)
    total_s = time.perf_counter() - start
    summary = {"vocabulary": {"base": ext.base_size, "extended": ext.new_size},
               "tokens_per_char": {("en" if r.name == "old language" else "zh"):
                                   {"before": r.base_tokens_per_char, "after": r.new_tokens_per_char,
                                    "docs": r.docs, "chars": r.chars, "changed_docs": r.changed_docs}
                                   for r in ext.rows},
               "steps": args.steps, "training": training_figures(run_dir), "train_wall_s": train_s,
               "perplexity": ppl, "generation": generation, "total_s": total_s}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    fig = summary["training"]
    banner(f"done in {total_s:.0f} s (training {train_s:.0f} s: {args.steps} steps, loss "
           f"{fig['first_loss'][1]:.2f} -> {fig['last_loss'][1]:.2f}); everything is under {out}")
    print(f"  tokenizer {ext.path} | shards+manifests {out / 'tokens'} | grown base {out / 'grown'}\n"
          f"  run {run_dir} | merged export {out / 'hf'} | peft adapter {out / 'adapter'} | "
          f"figures {out / 'summary.json'}")


if __name__ == "__main__":
    main()
