"""Training-step throughput and MFU of llama_pt per activation mode and attention backend, next to
transformers' LlamaForCausalLM (SDPA attention) on the same model, batch and device, in the same run.

    python benchmarks/bench_layer.py --device cuda                  # the GPU measurement (issue 5, point 6)
    python benchmarks/bench_layer.py --device cpu --presets tiny --seq 64 --batch 2 --steps 2   # CPU smoke

One training step = forward, loss, backward and a fused AdamW step, bf16 autocast over float32 weights
on CUDA (the trainer's recipe; float32 on CPU unless --precision bf16). The same initial weights go into
both implementations (llama_pt.hf_interop names), so their first losses agree. Tokens/s is batch * seq
over the mean wall-clock step time after warm-up
(process CPU time per step is reported too: on a shared CPU it is the steadier number); MFU = tokens/s * llama_pt.model.flops_per_token (6N plus the
attention term) / the device's dense bf16 peak (llama_pt.train.metrics; none on CPU). Peak memory is
torch.cuda.max_memory_allocated over the timed steps. --compile adds rows for `selective` with its
elementwise pieces fused by torch.compile (llama_pt.blocks.selective.compile_elementwise).
--json writes the rows (atomically) after each row, so a run stopped early keeps the rows it finished.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_pt.hf_interop import hf_config, to_hf_name  # noqa: E402
from llama_pt.model import Llama, flops_per_token, get_preset  # noqa: E402
from llama_pt.blocks import selective as layer_backward  # noqa: E402
from llama_pt.blocks.memory import layer_activation_bytes  # noqa: E402
from llama_pt.blocks.modes import ACTIVATION_MODES, apply_activation_mode  # noqa: E402
from llama_pt.ops.attention import xformers_available  # noqa: E402
from llama_pt.train.metrics import mfu, peak_flops  # noqa: E402

GPU_DEFAULTS = dict(presets=["llama_125m", "llama_1b"], seq=2048, batch=8, steps=10, warmup=3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def ours(cfg, mode: str, backend: str, device, state: dict) -> tuple[torch.nn.Module, Callable]:
    model = Llama(cfg).to(device)
    model.load_state_dict(state)
    model.set_attention_backend(backend)
    apply_activation_mode(model, mode)
    return model, lambda tokens: model(tokens[:, :-1])


def transformers_llama(cfg, device, state: dict) -> tuple[torch.nn.Module, Callable]:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = {k: v for k, v in hf_config(cfg, torch.float32).items() if k not in ("llama_pt", "architectures")}
    model = LlamaForCausalLM._from_config(LlamaConfig(**config), attn_implementation="sdpa").to(device)
    model.load_state_dict({to_hf_name(k): v for k, v in state.items()})
    return model, lambda tokens: model(input_ids=tokens[:, :-1], use_cache=False).logits


def time_training(model: torch.nn.Module, logits_fn: Callable, tokens: torch.Tensor, device: torch.device,
                  bf16: bool, warmup: int, steps: int) -> dict:
    opt = _optimizer(model, device)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.cfg.vocab_size
    targets = tokens[:, 1:].reshape(-1)

    def step() -> float:
        with _autocast(device, bf16):
            logits = logits_fn(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()
    for _ in range(warmup - 1):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"first_loss": first_loss, "step_ms": seconds * 1e3, "cpu_ms": cpu_seconds * 1e3, "peak_gib": peak}


def run_row(args, preset: str, impl: str, mode: str, backend: str, compiled: bool, device, bf16: bool) -> dict:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    state = Llama(cfg).state_dict()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    precision = "bf16_autocast" if bf16 else "fp32"
    row = {"preset": preset, "impl": impl, "mode": mode + ("+compile" if compiled else ""), "attention": backend,
           "batch": args.batch, "seq": args.seq, "formula_act_gib_per_layer": None}
    if impl == "llama_pt":
        row["formula_act_gib_per_layer"] = layer_activation_bytes(
            mode, seq=args.seq, batch=args.batch, dim=cfg.dim, ffn_dim=cfg.ffn_hidden_dim, n_heads=cfg.n_heads,
            n_kv_heads=cfg.kv_heads, precision=precision) / 2**30
    try:
        model, logits_fn = (ours(cfg, mode, backend, device, state) if impl == "llama_pt"
                            else transformers_llama(cfg, device, state))
        row.update(time_training(model, logits_fn, tokens, device, bf16, args.warmup, args.steps))
        tps = args.batch * args.seq / (row["step_ms"] / 1e3)
        row.update(tokens_per_s=tps, mfu=mfu(tps, flops_per_token(cfg, args.seq), 1, peak_flops(device)))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    return row


def run_rows(args, on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Time every row; `on_row` is called with the rows so far after each."""
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    backends = ["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
    plain = [("llama_pt", mode, backend, False) for backend in backends for mode in ACTIVATION_MODES]
    plain.append(("transformers", "none", "sdpa", False))
    passes = [plain]
    if args.compile:  # compile_elementwise is process-wide: the compiled rows run after all others
        passes.append([("llama_pt", "selective", backend, True) for backend in backends])
    rows = []
    for variants in passes:
        if variants[0][3]:
            layer_backward.compile_elementwise()
        for preset in args.presets:
            for impl, mode, backend, compiled in variants:
                rows.append(run_row(args, preset, impl, mode, backend, compiled, device, bf16))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(_format_row(rows[-1]), flush=True)
                on_row(rows)
    return rows


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = ("| preset | implementation | activation | attention | batch x seq | step ms | process CPU ms | tokens/s | "
          "MFU | peak GiB | formula act. GiB/layer | first loss |\n" + "| --- " * 4 + "| ---: " * 8 + "|")


def _format_row(r: dict) -> str:
    head = f"| {r['preset']} | {r['impl']} | {r['mode']} | {r['attention']} | {r['batch']}x{r['seq']} |"
    if "error" in r:
        return f"{head} {r['error']} |"
    mfu_pct = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{head} {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | {r['tokens_per_s']:.0f} | {mfu_pct} | "
            f"{_fmt(r['peak_gib'], '.2f')} | {_fmt(r['formula_act_gib_per_layer'], '.4f')} | {r['first_loss']:.4f} |")


def environment(device: torch.device) -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (CPU runs only)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    cpu_defaults = dict(presets=["tiny"], seq=64, batch=2, steps=2, warmup=1)
    for key, value in (GPU_DEFAULTS if args.device.startswith("cuda") else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step is never timed)")
    env = environment(torch.device(args.device))
    print(json.dumps(env))
    print(HEADER)

    def write_json(rows: list[dict]) -> None:
        if args.json:
            tmp = args.json.with_name(args.json.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                       "rows": rows}, indent=1))
            tmp.replace(args.json)
    return run_rows(args, write_json)


if __name__ == "__main__":
    main()
