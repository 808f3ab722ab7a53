"""Perplexity of a model's GGUF exports in llama.cpp (f32, f16, q8_0, q4_0 by default) next to ours, on held-out
token shards: what quantisation costs once the model runs in llama.cpp.

    .venv/bin/python benchmarks/bench_gguf.py MODEL --manifest HELD_OUT.json [--tokens 4096 --window 256]

MODEL is a checkpoint or a Hugging Face folder; `make demo` leaves one in runs/demo/train/checkpoints with its
held-out shards in runs/demo/prep/tokens/valid.json. Each type is written by `python -m llama_pt.pretrained
export-gguf` into --out (default runs/bench_gguf) and scored by llama.cpp in-process (the xllamacpp wheel;
llama_pt.gguf_export.llamacpp: log-probabilities from its logits, its default settings: f16 KV cache, flash
attention on). The windows are the held-out windows of `python -m llama_pt.pretrained perplexity` (each target
once, `--window` tokens of context at most): the first `--tokens` targets of the manifest's shards in order, in
whole windows. Ours is the model in float32 on the same windows. Prints a Markdown table; --json writes the
figures.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_pt.data import load_manifest  # noqa: E402
from llama_pt.data.packing import SequentialWindows  # noqa: E402
from llama_pt.gguf_export.llamacpp import LlamaCpp  # noqa: E402
from llama_pt.pretrained import load_model, main as pretrained_main  # noqa: E402


def our_perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(torch.tensor([window]))[0, :-1, :model.cfg.vocab_size].double()
            nll -= torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None]).sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--manifest", required=True, help="held-out mixture manifest (token shards)")
    parser.add_argument("--tokens", type=int, default=4096, help="targets scored")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (context of llama.cpp)")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0", "q4_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_gguf"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    prefixes = [p for source in load_manifest(args.manifest)["sources"] for p in source["prefixes"]]
    held_out = SequentialWindows(prefixes, args.window - 1)
    windows = [held_out[k].tolist() for k in range(min(len(held_out), -(-args.tokens // (args.window - 1))))]
    model = load_model(args.model)
    rows = [{"type": "ours (float32, PyTorch)", "perplexity": our_perplexity(model, windows)}]
    out = Path(args.out)
    for kind in args.types:
        path = out / f"{Path(args.model).resolve().name}-{kind}.gguf"
        start = time.perf_counter()
        if pretrained_main(["export-gguf", args.model, str(path), "--type", kind]) != 0:
            raise SystemExit(f"export-gguf --type {kind} failed")
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = LlamaCpp(path, n_ctx=args.window, threads=args.threads).perplexity(windows)
        rows.append({"type": f"llama.cpp {kind}", "perplexity": ppl, "file_mib": path.stat().st_size / 2**20,
                     "export_s": export_s, "score_s": time.perf_counter() - start})
    reference = next(r["perplexity"] for r in rows if r["type"] == "llama.cpp f16") if "f16" in args.types else None
    targets = sum(len(w) - 1 for w in windows)
    print(f"\n{targets} targets in {len(windows)} windows of up to {args.window} tokens; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| model | perplexity | vs llama.cpp f16 | file MiB | export s | llama.cpp scoring s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        change = f"{100 * (r['perplexity'] / reference - 1):+.3f}%" if reference else "-"
        extra = (f"{r['file_mib']:.2f} | {r['export_s']:.1f} | {r['score_s']:.1f}" if "file_mib" in r else "- | - | -")
        print(f"| {r['type']} | {r['perplexity']:.4f} | {change} | {extra} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"targets": targets, "windows": len(windows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
