"""The instruction-tuning part of the embedded example (`make demo` runs it after pretraining; `make demo-sft`
alone): the demo's model tuned on data/instruct, a chat exchange, and the result running in llama.cpp.

Starts from the demo's Hugging Face export (runs/demo/hf; demo/run_demo.py is run first when it is missing).
Then, printing each step:
7. `python train.py task=sft`: Alpaca-template instruction tuning on data/instruct (381 Alpaca records, 51
   ShareGPT conversations), examples packed into windows with document masks, the loss on response tokens,
   5% of the examples held out and scored every 50 steps;
8. one exchange with the chat command (`python -m llama_pt.pretrained chat ... --template alpaca`, greedy),
   the same question asked of the model before tuning;
9. `python -m llama_pt.pretrained export-gguf ... --type q8_0`, loaded by llama.cpp (the xllamacpp wheel,
   in-process): its greedy continuation of an Alpaca prompt printed next to ours.

Everything goes under runs/demo/sft/ (--out), with the figures in summary.json. Re-running resumes training from
its last checkpoint; --fresh starts over.
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

from demo.run_demo import banner, ensure_demo  # noqa: E402

# Tuning: 200 steps of 8 windows of 257 tokens, about 4 epochs of data/instruct with packing.
SFT = ("task=sft", "task.template=alpaca", "train.document_mask=true", "train.seq_len=256",
       "train.global_batch_tokens=2048", "train.micro_batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=20",
       "train.log_every=10", "task.valid_fraction=0.05", "train.eval_every=50", "train.ckpt_every=100")
QUESTION = "What does the function `json.dumps` do?"
NEW_TOKENS = 24


def tune(hf: Path, out: Path, steps: int, model: str = "demo") -> Path:
    banner(f"7. instruction tuning the demo's model for {steps} steps: python train.py task=sft ...")
    run_dir = out / "train"
    cmd = [sys.executable, "train.py", "name=demo_sft", f"model={model}", f"train.init_from={hf}", *SFT,
           f"train.steps={steps}", f"train.out_dir={run_dir}", f"hydra.run.dir={run_dir}"]
    print("  " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return run_dir


def response_losses(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of the training loss or the held-out loss ("valid_loss") over response tokens."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def chat(model: Path, label: str) -> str:
    """One exchange through the chat command, its input piped; returns the reply."""
    cmd = [sys.executable, "-m", "llama_pt.pretrained", "chat", str(model), "--template", "alpaca",
           "--temperature", "0", "--max-new-tokens", "60"]
    shown = " ".join(str(c) for c in cmd[1:]).replace(str(REPO) + "/", "")
    print(f"  [{label}] {shown}", flush=True)
    done = subprocess.run(cmd, cwd=REPO, input=f"{QUESTION}\n/exit\n", capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    for line in lines:
        print("    " + line)
    reply = next((line for line in lines if "assistant> " in line), "")
    return reply.split("assistant> ", 1)[-1]


def export_and_run_in_llamacpp(checkpoint: Path, out: Path) -> dict:
    from llama_pt.generate import generate
    from llama_pt.gguf_export.llamacpp import LlamaCpp
    from llama_pt.instruct.records import Conversation
    from llama_pt.instruct.templates import encode, load_template
    from llama_pt.pretrained.loading import load_model_and_tokenizer
    from llama_pt.tokenizer import Tokenizer

    banner("9. export to llama.cpp (GGUF, q8_0) and the same prompt in llama.cpp and in llama_pt")
    gguf_file = out / "demo_sft-q8_0.gguf"
    cmd = [sys.executable, "-m", "llama_pt.pretrained", "export-gguf", str(checkpoint), str(gguf_file), "--type", "q8_0"]
    print("  " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"  {gguf_file}: {gguf_file.stat().st_size / 1e6:.2f} MB", flush=True)
    model, tokenizer_path = load_model_and_tokenizer(checkpoint)
    tokenizer = Tokenizer(tokenizer_path)
    question = "What is the Python module `json` for?"
    ids, _ = encode(Conversation((("user", question),)), load_template("alpaca"), tokenizer)
    prompt = ids.tolist()
    ours = generate(model, [prompt], NEW_TOKENS, temperature=0.0, eos_id=tokenizer.eos_id)[0]
    theirs = LlamaCpp(gguf_file).greedy(prompt, NEW_TOKENS)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"  prompt (Alpaca template): {question!r}")
    print(f"  greedy to EOS, llama_pt (float32): {tokenizer.decode(ours)!r}")
    print(f"  greedy to EOS, llama.cpp (q8_0):   {tokenizer.decode(theirs)!r}")
    print(f"  identical tokens: {ours == theirs} ({same} agree, {len(ours)} and {len(theirs)} generated)")
    if ours != theirs and same < min(len(ours), len(theirs)):  # why: q8_0's rounding of the weights
        import torch
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:same]]))[0, -1].float()
        print(f"  at token {same + 1} our logits: {tokenizer.decode([ours[same]])!r} {logits[ours[same]]:.4f}, "
              f"llama.cpp's choice {tokenizer.decode([theirs[same]])!r} {logits[theirs[same]]:.4f}: a near tie "
              "that q8_0's rounding of the weights tips over")
    return {"gguf": str(gguf_file), "ours": ours, "llamacpp": theirs, "tokens_agreeing": same,
            "identical": ours == theirs}


def run_sft_demo(demo: Path, out: Path, steps: int, model: str = "demo") -> dict:
    from llama_pt.train.checkpoint import list_checkpoints

    _, _, hf = ensure_demo(demo)
    run_dir = tune(hf, out, steps, model)
    losses = response_losses(run_dir)
    held_out = response_losses(run_dir, "valid_loss")
    print(f"  loss over response tokens: step {losses[0][0]}: {losses[0][1]:.3f} -> "
          f"step {losses[-1][0]}: {losses[-1][1]:.3f}; held-out examples (5%): "
          + ", ".join(f"step {step}: {value:.3f}" for step, value in held_out))
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    banner("8. one chat exchange (greedy), before and after instruction tuning")
    before = chat(hf, "before tuning")
    after = chat(last, "after tuning")
    summary = {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "held_out_loss": held_out,
               "question": QUESTION,
               "reply_before": before, "reply_after": after, **export_and_run_in_llamacpp(last, out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="the pretraining demo's outputs")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo" / "sft")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default="demo", help="the model preset of the demo's export")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    start = time.perf_counter()
    run_sft_demo(args.demo, args.out, args.steps, args.model)
    banner(f"instruction tuning, chat and llama.cpp done in {time.perf_counter() - start:.0f} s; under {args.out}")


if __name__ == "__main__":
    main()
