"""The embedded end-to-end example (`make demo`): real text -> tokenizer -> token shards -> a tiny LLaMA
trained on CPU -> held-out perplexity -> sampled text -> Hugging Face export, checked with `transformers`;
then (demo/run_demo_sft.py) instruction tuning, a chat exchange, and a q8_0 GGUF export run in llama.cpp.

Everything goes under runs/demo/ (override with --out). Re-running reuses what is complete (the data
pipeline skips finished shards; training resumes from its last checkpoint); --fresh starts over.
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

from demo.corpus import write_corpus  # noqa: E402
from llama_pt.tokenizer import Tokenizer  # noqa: E402

VOCAB = 1024
PROMPT = "The function returns"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def ensure_demo(demo: Path) -> tuple[Path, Path, Path]:
    """The demo's tokenizer, clean-text folder and Hugging Face export, running the demo first if one is missing."""
    tokenizer, clean, hf = demo / "prep" / "tokenizer" / "tokenizer.model", demo / "prep" / "clean", demo / "hf"
    if not (tokenizer.is_file() and clean.is_dir() and (hf / "config.json").is_file()):
        banner(f"0. {demo} lacks the demo's outputs: running demo/run_demo.py --out {demo} first")
        subprocess.run([sys.executable, str(Path(__file__)), "--out", str(demo), "--pretrain-only"], cwd=REPO,
                       check=True)
    return tokenizer, clean, hf


def prepare_data(out: Path) -> tuple[Path, Path, Path]:
    banner("1. corpus: Python standard-library docstrings + licence texts (already on this machine)")
    for source, path in write_corpus(out / "corpus").items():
        print(f"  {source:<12} {path.stat().st_size / 1e6:6.2f} MB  {path}")
    banner("2. data pipeline: llama-data run demo (dedup, fastText LID, tokenizer, token shards, manifest)")
    prep = out / "prep"
    cmd = ["llama-data", "run", "demo", f"output_dir={prep}", f"sources.python_docs.paths=[{out}/corpus/python_docs.jsonl]",
           f"sources.licenses.paths=[{out}/corpus/licenses.jsonl]", f"tokenizer.vocab_size={VOCAB}", "progress=false"]
    print("  " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "data_pipeline", *cmd[1:]], cwd=REPO, check=True)
    tokenizer = Tokenizer(prep / "tokenizer" / "tokenizer.model")
    print(f"  tokenizer: {tokenizer.vocab_size} pieces; 'In 2024, naïve' -> "
          f"{tokenizer.encode_pieces('In 2024, naïve')}")
    return prep / "tokens" / "mixture.json", prep / "tokens" / "valid.json", tokenizer.model_path


def train(out: Path, manifest: Path, valid: Path, steps: int) -> Path:
    banner(f"3. training a tiny LLaMA on CPU for {steps} steps: python train.py ...")
    run_dir = out / "train"
    cmd = [sys.executable, "train.py", "name=demo", "model=demo", f"train.out_dir={run_dir}",
           f"hydra.run.dir={run_dir}", f"data.manifest={manifest}", f"data.valid_manifest={valid}",
           "train.seq_len=128", "train.global_batch_tokens=4096", "train.micro_batch_size=16",
           f"train.steps={steps}", "train.log_every=5", f"train.eval_every={steps // 4}", "train.eval_batches=16",
           f"train.ckpt_every={steps // 2}", "optim.lr=3e-3", "optim.warmup_steps=20"]
    print("  " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return run_dir


def report_training(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["valid_ppl"]) for r in records if "valid_ppl" in r]
    banner("4. results")
    print(f"  training loss: step {train_losses[0][0]}: {train_losses[0][1]:.3f} -> "
          f"step {train_losses[-1][0]}: {train_losses[-1][1]:.3f}  (uniform guess: ln {VOCAB} = 6.93)")
    print("  held-out perplexity: " + ", ".join(f"step {s}: {p:.1f}" for s, p in held_out))


def sample_and_export(run_dir: Path, spm_model: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llama_pt.generate import generate, sample_text
    from llama_pt.pretrained import export_checkpoint, load_checkpoint_model
    from llama_pt.train.checkpoint import list_checkpoints

    last = list_checkpoints(run_dir / "checkpoints")[-1]
    model, _ = load_checkpoint_model(last)
    tokenizer = Tokenizer(spm_model)
    banner("5. sampling (temperature 0.8, top-p 0.95, KV cache)")
    for seed in (0, 1):
        print(f"  {sample_text(model, tokenizer, PROMPT, max_new_tokens=40, seed=seed)!r}")
    banner("6. export to Hugging Face format, reloaded with transformers")
    hf_dir = export_checkpoint(last, out / "hf", dtype="float32", tokenizer=spm_model)
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = tokenizer.encode(PROMPT, bos=True)
    ours = generate(model, [prompt], 20, temperature=0.0)[0]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    print(f"  {hf_dir}: {sorted(p.name for p in hf_dir.iterdir())}")
    print(f"  greedy continuation, llama_pt:     {tokenizer.decode(ours)!r}")
    print(f"  greedy continuation, transformers: {hf_tok.decode(theirs)!r}")
    print(f"  identical tokens: {ours[:len(theirs)] == theirs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--pretrain-only", action="store_true", help="stop after the Hugging Face export (step 6)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    start = time.perf_counter()
    manifest, valid, spm_model = prepare_data(args.out)
    run_dir = train(args.out, manifest, valid, args.steps)
    report_training(run_dir)
    sample_and_export(run_dir, spm_model, args.out)
    if not args.pretrain_only:
        from demo.run_demo_sft import run_sft_demo
        run_sft_demo(args.out, args.out / "sft", args.sft_steps)
    banner(f"done in {time.perf_counter() - start:.0f} s; everything is under {args.out}")
    print(f"  corpus {args.out / 'corpus'} | tokenizer {spm_model} | shards+manifest {manifest.parent}\n"
          f"  checkpoints {run_dir / 'checkpoints'} | metrics {run_dir / 'metrics.jsonl'} | "
          f"loss curve {run_dir / 'loss_curve.png'}\n  wandb (offline) {run_dir / 'wandb'} | "
          f"Hugging Face export {args.out / 'hf'}" +
          ("" if args.pretrain_only else f" | instruction tuning, GGUF {args.out / 'sft'}"))


if __name__ == "__main__":
    main()
