"""Document masking and instruction tuning on CPU through llama_pt's trainer: step times and tokens/s.

    .venv/bin/python benchmarks/bench_sft.py [--steps 6 --warmup 2 --repeats 3 --threads 1] [--out runs/bench_sft]
        [--json PATH]

Needs the demo's outputs (`make demo`): its corpus (runs/demo/corpus) and its Hugging Face export (runs/demo/hf,
model and tokenizer). Every configuration is a Trainer built as train.py builds it (compose_config -> resolve
-> Trainer), fp32, one micro-batch of 2048 window tokens per step (8 windows of 256 + 1, or 2 of 1024 + 1).
`Trainer.train_step` is timed on batches taken from its loader beforehand, in CPU seconds of this process
(time.process_time; one torch thread by default: on a machine shared with other jobs the CPU time of a step
varies far less than its wall time) and in wall seconds. The configurations' trainers live side by side and
take turns: `--repeats` rounds (each starting one configuration further) of `--warmup` untimed and `--steps`
timed steps each; the tables give medians.

1. Pretraining, train.document_mask off and on (documents separated at EOS: a block-diagonal causal mask
   and positions restarting in every document), for the `tiny` and `demo` models, activation modes
   `selective` (the hand-written layer: the CPU flash kernel with an additive mask) and `none` (autograd: SDPA
   with a boolean mask). Data: the demo corpus (docstrings and licence texts) tokenized with the demo's
   tokenizer into shards under --out.
2. Instruction tuning (task=sft) of the demo's model on data/instruct (template alpaca, selective), windows of
   256 (the model's length) and of 1024 (model.max_seq_len=1024: RoPE's table is not a weight): packed with
   document masks, packed without, and one example per window. Window tokens/s are the same kind of work in
   all three; what differs is how many of those tokens are examples (not padding), how many are responses
   (the loss), and so how long an epoch of the data set takes.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = ("train.log_every=0", "train.eval_every=0", "train.ckpt_every=0", "logging.wandb.enabled=false",
          "train.device=cpu", "train.precision=fp32", "optim.warmup_steps=10")
STEP_TOKENS = 2048  # one micro-batch per step: 8 windows of 256 (+ 1), or 2 of 1024


def window(seq_len: int) -> list[str]:
    return [f"train.seq_len={seq_len}", f"train.global_batch_tokens={STEP_TOKENS}",
            f"train.micro_batch_size={STEP_TOKENS // seq_len}"]
SFT_DATA = [REPO / "data" / "instruct" / "alpaca_stdlib.jsonl", REPO / "data" / "instruct" / "sharegpt_stdlib.json"]


def token_shards(out: Path, tokenizer_path: Path, max_docs: int) -> Path:
    """The demo corpus as token shards (one per source) and their manifest, written once."""
    from llama_pt.data import IndexedDatasetWriter, write_manifest
    from llama_pt.tokenizer import Tokenizer
    manifest = out / "tokens" / "mixture.json"
    if manifest.is_file():
        return manifest
    tok, entries = Tokenizer(tokenizer_path), []
    for source in ("python_docs", "licenses"):
        lines = (REPO / "runs" / "demo" / "corpus" / f"{source}.jsonl").read_text().splitlines()[:max_docs]
        prefix = out / "tokens" / source / "shard_00000"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        ids = tok.encode_batch([json.loads(line)["text"] for line in lines], eos=True)
        with IndexedDatasetWriter(prefix, tok.vocab_size) as writer:
            for doc in ids:
                writer.add_document(doc)
        entries.append({"name": source, "prefixes": [prefix], "documents": len(ids),
                        "tokens": sum(map(len, ids)), "weight": 1.0, "epochs": None})
    write_manifest(manifest, entries, tokenizer_path, vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    return manifest


def build(name: str, overrides: list[str], out: Path):
    from llama_pt.config import compose_config, resolve
    from llama_pt.train.trainer import Trainer
    cfg = compose_config([*COMMON, f"train.out_dir={out / name}", *overrides])
    return Trainer(resolve(cfg), cfg)


def configurations(out: Path, max_docs: int) -> dict[str, list[str]]:
    hf = REPO / "runs" / "demo" / "hf"
    if not (hf / "tokenizer.model").is_file() or not (REPO / "runs" / "demo" / "corpus").is_dir():
        sys.exit("error: runs/demo/hf and runs/demo/corpus are missing: run `make demo` first")
    manifest = token_shards(out, hf / "tokenizer.model", max_docs)
    configs = {}
    for model in ("tiny", "demo"):
        for activation in ("selective", "none"):
            for mask in ("false", "true"):
                configs[f"pretrain {model} {activation} mask={mask}"] = [
                    f"model={model}", f"model.activation={activation}", f"train.document_mask={mask}",
                    f"data.manifest={manifest}", "data.valid_manifest=null", "model.vocab_size=1024", *window(256)]
    sft = ["task=sft", f"task.files=[{','.join(map(str, SFT_DATA))}]", "task.template=alpaca",
           f"train.init_from={hf}"]
    for seq_len in (256, 1024):
        longer = [*window(seq_len), *([f"model.max_seq_len={seq_len}"] if seq_len > 256 else [])]
        configs[f"sft {seq_len} packed, document masks"] = [*sft, *longer, "train.document_mask=true"]
        configs[f"sft {seq_len} packed, no masks"] = [*sft, *longer, "train.document_mask=false"]
        configs[f"sft {seq_len} one example per window"] = [*sft, *longer, "task.packing=false"]
    return configs


def window_counts(batch) -> dict[str, float]:
    """Pretraining windows: documents per window. Instruction windows: tokens that are examples (not padding,
    the last document when all of it is EOS) and responses, per step."""
    from llama_pt.data.batch import DOCUMENTS, SCORED, TOKENS
    if batch.dim() == 2:
        return {"documents_per_window": float((batch[:, :-1] == 2).sum(1).float().mean() + 1)}
    last = batch[:, DOCUMENTS] == batch[:, DOCUMENTS].amax(1, keepdim=True)
    padding = last & ((batch[:, TOKENS] == 2) | ~last).all(1, keepdim=True)
    return {"example_tokens": float(batch[:, TOKENS].numel() - padding.sum()),
            "response_tokens": float(batch[:, SCORED, 1:].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-docs", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_sft")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    configs = configurations(args.out, args.max_docs)
    trainers = {name: build(name.replace(" ", "_").replace(",", "").replace("=", "_"), overrides, args.out)
                for name, overrides in configs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}
    counts: dict[str, list[dict]] = {name: [] for name in trainers}
    loaders = {name: iter(t.data.loader) for name, t in trainers.items()}
    names = list(trainers)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts one further
            for step in range(args.warmup + args.steps):
                batches = next(loaders[name])
                wall, cpu = time.perf_counter(), time.process_time()
                trainers[name].train_step(batches)
                if step >= args.warmup:
                    times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                    counts[name].append(window_counts(torch.cat(batches)))
    results = {}
    for name, trainer in trainers.items():
        step = statistics.median(cpu for _, cpu in times[name])
        row = {"cpu_s": step, "wall_s": statistics.median(wall for wall, _ in times[name]),
               "window_tokens_per_cpu_s": STEP_TOKENS / step, "steps": len(times[name])}
        for key in counts[name][0]:
            row[key] = statistics.mean(c[key] for c in counts[name])
        if trainer.run.task.name == "sft":
            row["example_tokens_per_cpu_s"] = row["example_tokens"] / step
            row["response_tokens_per_cpu_s"] = row["response_tokens"] / step
            windows = len(trainer.data.loader.samples.plan(0))
            row["windows_per_epoch"] = windows
            row["epoch_cpu_s"] = windows * trainer.run.train.seq_len / STEP_TOKENS * step
        results[name] = row
        trainer.close()
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "processor": platform.processor(),
                          "threads": args.threads},
              "settings": vars(args) | {"out": str(args.out), "json": str(args.json)}, "results": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
