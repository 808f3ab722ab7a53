"""Attention forward + backward over packed documents, per kernel: document masks against the causal mask.

    python benchmarks/bench_documents.py --device cuda            # bf16; batch 4 x 2048 and 4096, 16 heads of 128
    python benchmarks/bench_documents.py --device cpu --quick     # fp32 at small shapes: a smoke run of seconds
    python benchmarks/bench_documents.py --device cpu             # fp32; batch 2 x 1024 and 2048, 8 heads of 64

Document masking (Llama 3, Dubey et al. 2024, Sec. 3.2: "an attention mask that prevents self-attention
between different documents within the same sequence") lets instruction examples be packed into full windows
instead of one padded example per window. What it costs depends on the kernel: FlashAttention-2's
variable-length kernel (Dao 2023; the batch flattened, the documents' cumulative lengths in place of a mask)
computes only the blocks inside each document, skipping the others as it skips the blocks above the diagonal
of a causal mask (Sec. 3.1), so packed short documents can cost less than causal attention over the whole
row; kernels given an s x s mask (an additive bias, a boolean mask) read it and skip no block of it.

Each row of the table is one kernel (llama_pt.ops.attention_kernels, through `KernelAttention`, the
autograd function of the plain model path; `sdpa` is the plain path's own SDPA call) under one mask, on
random bf16 (CUDA) or float32 (CPU) q, k, v [batch, seq, heads, head_dim] and output gradient:
- CUDA: `cuda_flash` (documents: the variable-length kernel; where this torch, GPU and dtype have none the
  row is skipped, saying so), `xformers` when importable (documents: BlockDiagonalCausalMask over the
  flattened batch), `cuda_efficient` (documents: the additive -inf bias), `sdpa` (documents: the boolean
  block-diagonal causal mask, what the plain path runs where no variable-length kernel is);
- CPU: `cpu_flash` (documents: the additive mask), `math` (explicit scores, the boolean mask), `sdpa`.
Masks, per kernel and sequence length, on the same inputs:
- `causal`: no documents, the kernel's own causal mask (the baseline);
- `packed`: documents with log-normal lengths (mean --doc-mean, 300 tokens by default, like instruction
  examples; sigma --doc-sigma; fixed --seed) one after another in each row, the last cut at the row's end;
- `one_per_row`: the document path with a single document per row: the same visible pairs as causal, so its
  ratio to causal is the cost of the document code path itself.
The `DocumentMask` forms a kernel takes are built before timing (the model builds them once per forward pass,
for all layers). The three masks take turns step by step (a drifting load hits all of them); each is timed
over --iters steps after --warmup: CUDA events around each forward + backward on an idle device on CUDA,
wall and process CPU time on CPU (--threads torch threads, 1 by default). Reported: median ms per forward +
backward, its ratio to the same kernel's causal median, tokens/s (batch * seq over the median), and the
visible fraction (visible query-key pairs over causal's: what a kernel that skips masked blocks could save).
--json writes the rows (atomically) after each kernel, so a run stopped at a time limit keeps what finished.
A kernel that fails (out of memory, a kernel refusing its inputs) gets its error in its rows, the others still
run, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_pt.ops.attention import _expand_kv, xformers_available  # noqa: E402
from llama_pt.ops.attention_kernels import KernelAttention, select_kernel  # noqa: E402
from llama_pt.ops.documents import DocumentMask  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASKS = ("causal", "packed", "one_per_row")
# Shapes and step counts: a ~1B model's attention layer (llama_1b: 16 heads of 128) on CUDA, a smaller layer
# on CPU, tiny shapes with --quick (on either device). Flags given explicitly take precedence.
DEFAULTS = {
    "cuda": dict(batch=4, seqs=[2048, 4096], heads=16, kv_heads=16, head_dim=128, dtype="bf16", doc_mean=300,
                 warmup=5, iters=20),
    "cpu": dict(batch=2, seqs=[1024, 2048], heads=8, kv_heads=8, head_dim=64, dtype="fp32", doc_mean=300,
                warmup=2, iters=5),
    "quick": dict(batch=2, seqs=[256, 512], heads=4, kv_heads=4, head_dim=32, doc_mean=64, warmup=1, iters=3),
}


def packed_documents(batch: int, seq: int, mean: float, sigma: float, seed: int) -> torch.Tensor:
    """[batch, seq] document ids: log-normal lengths of mean `mean` (median mean * exp(-sigma^2 / 2)), drawn
    with `seed`, packed one after another into each row; a row's last document is cut at its end."""
    rng = random.Random(seed)
    mu = math.log(mean) - sigma ** 2 / 2
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq:
            ids += [ids[-1] + 1 if ids else 0] * max(1, round(rng.lognormvariate(mu, sigma)))
        rows.append(ids[:seq])
    return torch.tensor(rows)


def visible_fraction(lengths: list[int], batch: int, seq: int) -> float:
    """Query-key pairs a document mask leaves visible, over those of the causal mask."""
    return sum(n * (n + 1) // 2 for n in lengths) / (batch * seq * (seq + 1) // 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Optional[DocumentMask]) -> torch.Tensor:
    """The plain path's SDPA call (llama_pt.ops.attention): is_causal, or the boolean block-diagonal mask."""
    n_rep = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, _expand_kv(k, n_rep), _expand_kv(v, n_rep)))
    if documents is None:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=documents.visible()).transpose(1, 2)


def kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[list[str], dict[str, str]]:
    """The kernels to time on `device` and the ones left out, with why."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    if device.type != "cuda":
        if select_kernel("sdpa", device, dtype, head_dim, documents=True) == "cpu_flash":
            names.append("cpu_flash")
        else:
            skipped["cpu_flash"] = f"torch {torch.__version__} has no CPU flash kernel"
        return names + ["math", "sdpa"], skipped
    if select_kernel("sdpa", device, dtype, head_dim, documents=True) == "cuda_flash":
        names.append("cuda_flash")
    else:
        skipped["cuda_flash"] = (f"no variable-length flash kernel for {torch.cuda.get_device_name(device)}, "
                                 f"torch {torch.__version__}, {dtype}, head_dim {head_dim}")
    if xformers_available():
        names.append("xformers")
    else:
        skipped["xformers"] = "xformers is not importable"
    return names + ["cuda_efficient", "sdpa"], skipped


def attention_fn(kernel: str) -> Callable:
    if kernel == "sdpa":
        return sdpa
    return lambda q, k, v, documents: KernelAttention.apply(q, k, v, kernel, documents)


def prepare(documents: Optional[DocumentMask], kernel: str, dtype: torch.dtype) -> None:
    """Build the mask forms `kernel` takes, as the model does once per forward pass before its layers."""
    if documents is None:
        return
    if kernel == "cuda_flash":
        documents.cu_seqlens()
    elif kernel == "xformers":
        documents.lengths()
    elif kernel == "cuda_efficient":
        documents.additive(dtype, key_align=16)
    elif kernel == "cpu_flash":
        documents.additive(dtype)
    else:
        documents.visible()


def time_masks(fn: Callable, inputs: list[torch.Tensor], masks: dict[str, Optional[DocumentMask]],
               device: torch.device, warmup: int, iters: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per forward + backward of each mask, the masks taking turns step by step: "ms" (CUDA events,
    or wall time on CPU) and on CPU "cpu_ms" (process time)."""
    q, k, v, grad = inputs
    times: dict[str, dict[str, list[float]]] = {name: {"ms": [], "cpu_ms": []} for name in masks}
    for step in range(warmup + iters):
        for name, documents in masks.items():
            for leaf in (q, k, v):
                leaf.grad = None
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fn(q, k, v, documents).backward(grad)
                end.record()
                end.synchronize()
                ms, cpu_ms = start.elapsed_time(end), None
            else:
                wall, cpu = time.perf_counter(), time.process_time()
                fn(q, k, v, documents).backward(grad)
                ms, cpu_ms = (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3
            if step >= warmup:
                times[name]["ms"].append(ms)
                if cpu_ms is not None:
                    times[name]["cpu_ms"].append(cpu_ms)
    return times


def run_kernel(args, kernel: str, seq: int, device: torch.device) -> list[dict]:
    """The rows of one kernel at one sequence length: causal, packed and one document per row."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(args.seed)
    shapes = [(args.batch, seq, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
    q, k, v, grad = (torch.randn(shape, generator=g).to(device, dtype) for shape in shapes)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ids = {"packed": packed_documents(args.batch, seq, args.doc_mean, args.doc_sigma, args.seed),
           "one_per_row": torch.zeros(args.batch, seq, dtype=torch.long)}
    masks: dict[str, Optional[DocumentMask]] = {"causal": None}
    masks.update({name: DocumentMask(t.to(device)) for name, t in ids.items()})
    for documents in masks.values():
        prepare(documents, kernel, dtype)
    head = {"kernel": kernel, "batch": args.batch, "seq": seq, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "dtype": args.dtype}
    try:
        times = time_masks(attention_fn(kernel), [q, k, v, grad], masks, device, args.warmup, args.iters)
    except (RuntimeError, NotImplementedError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
        first_line = (str(error).strip().splitlines() or [""])[0].replace("|", "/")
        return [{**head, "mask": name, "error": f"{type(error).__name__}: {first_line}"[:200]} for name in masks]
    causal_ms = statistics.median(times["causal"]["ms"])
    rows = []
    for name, documents in masks.items():
        lengths = [seq] * args.batch if documents is None else documents.lengths()
        ms = statistics.median(times[name]["ms"])
        rows.append({**head, "mask": name, "documents": len(lengths), "mean_doc_len": sum(lengths) / len(lengths),
                     "visible_fraction": visible_fraction(lengths, args.batch, seq), "ms": ms,
                     "min_ms": min(times[name]["ms"]),
                     "cpu_ms": statistics.median(times[name]["cpu_ms"]) if times[name]["cpu_ms"] else None,
                     "ratio_to_causal": ms / causal_ms, "tokens_per_s": args.batch * seq / (ms / 1e3)})
    return rows


HEADER = ("| kernel | mask | batch x seq | documents | mean length | visible | ms fwd+bwd | process CPU ms | x causal "
          "| tokens/s |\n| --- | --- | --- " + "| ---: " * 7 + "|")


def format_row(r: dict) -> str:
    head = f"| {r['kernel']} | {r['mask']} | {r['batch']}x{r['seq']} |"
    if "error" in r:
        return f"{head} {r['error']} | | | | | | |"
    cpu_ms = "-" if r["cpu_ms"] is None else f"{r['cpu_ms']:.2f}"
    return (f"{head} {r['documents']} | {r['mean_doc_len']:.0f} | {r['visible_fraction']:.3f} | {r['ms']:.2f} | "
            f"{cpu_ms} | {r['ratio_to_causal']:.2f} | {r['tokens_per_s']:.0f} |")


def environment(device: torch.device, skipped: dict[str, str]) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
           "skipped": skipped}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        if xformers_available():
            import xformers
            env["xformers"] = xformers.__version__
    return env


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a smoke run)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seqs", type=int, nargs="+")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--dtype", choices=tuple(DTYPES))
    parser.add_argument("--doc-mean", type=float, help="mean document length of the packed rows")
    parser.add_argument("--doc-sigma", type=float, default=1.0, help="sigma of the log-normal document lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (CPU runs only)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"torch {torch.__version__} sees no CUDA GPU")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    defaults = {**DEFAULTS[args.device], **(DEFAULTS["quick"] if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be at least 1")
    names, skipped = kernels(device, DTYPES[args.dtype], args.head_dim)
    env = environment(device, skipped)
    print(json.dumps(env), flush=True)
    print(HEADER, flush=True)
    rows: list[dict] = []
    for seq in args.seqs:
        for kernel in names:
            rows += run_kernel(args, kernel, seq, device)
            for row in rows[-len(MASKS):]:
                print(format_row(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.json:
                tmp = args.json.with_name(args.json.name + f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"environment": env, "args": {k: v if k != "json" else str(v)
                                                                        for k, v in vars(args).items()},
                                           "rows": rows}, indent=1))
                tmp.replace(args.json)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any("error" in row for row in main()) else 0)
