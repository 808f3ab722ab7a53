"""Full training, LoRA and QLoRA on CPU through llama_pt's trainer: step time and memory, next to the planner.

    .venv/bin/python benchmarks/bench_peft.py [--model llama_125m --seq-len 256 --micro-batch 2 --warmup 2 --steps 3]
        [--configs full lora qlora] [--out runs/bench_peft] [--json PATH]

Set-up (once, under --out): the base, a Hugging Face folder of a randomly initialised `--model` exported in
float32, and token shards of uniformly random ids over its vocabulary (no tokenizer: none is read).
Every configuration trains from that base (`train.init_from`), fp32, one micro-batch of `--micro-batch`
sequences of `--seq-len` tokens per step, AdamW:

  full   peft=none, every parameter trains (model.activation=selective, the default)
  lora   peft=lora, rank 8, alpha 16, no dropout, all seven projections (wq wk wv wo w1 w2 w3); selective
  qlora  peft=qlora with the same adapters on an NF4 base; ++model.activation=full (its only CPU mode)

Each runs in a fresh process (this script with --worker) that builds the run as train.py does
(compose_config -> resolve -> Trainer: the base loaded, adapters and activation mode applied) and calls
Trainer.train_step, the call Trainer.fit makes, `--warmup` + `--steps` times. Measured there: the wall time
of each step after the warm-up; the bytes of the trainable parameters, of the frozen base (frozen parameters
plus the NF4 buffers), of the gradients (summed in an optimizer step pre-hook, when every gradient exists)
and of the optimizer state (after the last step); the resident set size after the imports, after building
the trainer, and its peak over the steps alone (VmHWM reset through /proc/self/clear_refs after the build).
Measured here: the process's peak RSS from start to exit (os.wait4's ru_maxrss), which includes building
the model from the base folder (under qlora the float32 model exists before its projections are quantised).

Then the planner (llama_pt.plan.make_plan, what `python -m llama_pt.plan ... --json` prints) for the same
configurations on one H100 (bf16, its default precision there) and in fp32 (the CPU runs' precision: its
weight, gradient and optimizer bytes are what the runs count): memory, and the step time, which it models
for full training only; and for the published-size cases of docs/planner.md ("LoRA and QLoRA"). Nothing is
written outside --out; --json also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "full": ("peft=none",),
    "lora": ("peft=lora", "peft.rank=8", "peft.alpha=16", "peft.dropout=0.0", "peft.targets=[wq,wk,wv,wo,w1,w2,w3]"),
    "qlora": ("peft=qlora", "peft.rank=8", "peft.alpha=16", "peft.dropout=0.0", "peft.targets=[wq,wk,wv,wo,w1,w2,w3]",
              "++model.activation=full"),
}
# docs/planner.md's QLoRA-paper settings (the qlora repository's scripts/finetune_guanaco_*.sh).
GUANACO = ("train.seq_len=512", "train.global_batch_tokens=8192", "train.micro_batch_size=1",
           "++model.activation=full", "peft.dropout=0.05")
PUBLISHED = [
    ("LLaMA-65B QLoRA, one 48 GB GPU (QLoRA abstract)", ("+experiment=llama1_65b", "peft=qlora", *GUANACO), "a6000"),
    ("LLaMA-33B QLoRA, one 24 GB GPU without paging", ("+experiment=llama1_33b", "peft=qlora", *GUANACO), "rtx4090"),
    ("Llama-2-13B QLoRA, one 24 GB GPU", ("model=llama2_13b", "peft=qlora", *GUANACO), "rtx4090"),
    ("Llama-2-13B LoRA, one 24 GB GPU", ("model=llama2_13b", "peft=lora", *GUANACO), "rtx4090"),
    ("Llama-2-7B LoRA, one 24 GB GPU", ("model=llama2_7b", "peft=lora", *GUANACO), "rtx4090"),
]
MIB, GIB = 1024 ** 2, 1024 ** 3


def run_overrides(config: str, model: str, base: Path, manifest: Path, out_dir: Path, seq_len: int,
                  micro_batch: int, steps: int) -> list[str]:
    """train.py's overrides of one configuration (one micro-batch per step, no evaluation, no checkpoints)."""
    return [f"model={model}", f"train.init_from={base}", f"data.manifest={manifest}", "data.valid_manifest=null",
            f"train.out_dir={out_dir}", f"train.seq_len={seq_len}", f"train.global_batch_tokens={seq_len * micro_batch}",
            f"train.micro_batch_size={micro_batch}", f"train.steps={steps}", "train.precision=fp32",
            "train.device=cpu", "train.eval_every=0", "train.ckpt_every=0", "train.resume=none",
            "logging.wandb.enabled=false", *CONFIGS[config]]


def planner_overrides(config: str, model: str, seq_len: int, micro_batch: int) -> list[str]:
    return [f"model={model}", f"train.seq_len={seq_len}", f"train.global_batch_tokens={seq_len * micro_batch}",
            f"train.micro_batch_size={micro_batch}", *CONFIGS[config]]


# ---- set-up ------------------------------------------------------------------------------------

def prepare(out: Path, model: str, tokens: int) -> tuple[Path, Path]:
    """The base folder and a manifest of random tokens under `out` (reused when present)."""
    import numpy as np
    import torch

    from llama_pt.data import IndexedDatasetWriter, write_manifest
    from llama_pt.hf_interop import export_hf
    from llama_pt.model import Llama, get_preset

    cfg = get_preset(model)
    base, manifest = out / f"{model}_random_hf", out / "tokens" / "mixture.json"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        export_hf(Llama(cfg), cfg, base, dtype="float32")
    if not manifest.is_file():
        rng = np.random.default_rng(0)
        prefix = out / "tokens" / "random" / "shard_00000"
        docs = [rng.integers(3, cfg.vocab_size, 1000) for _ in range(tokens // 1000)]
        with IndexedDatasetWriter(prefix, cfg.vocab_size) as writer:
            for doc in docs:
                writer.add_document(np.append(doc, 2))
        write_manifest(manifest, [{"name": "random", "prefixes": [prefix], "documents": len(docs),
                                   "tokens": len(docs) * 1001, "weight": 1.0, "epochs": None}],
                       out / "tokens" / "no_tokenizer.model", cfg.vocab_size, eos_id=2)
    return base, manifest


# ---- one configuration, in its own process -----------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(overrides: list[str], warmup: int) -> dict:
    """Build the run's Trainer, time its steps, count its bytes (module docstring)."""
    import torch

    from llama_pt.adapters.nf4 import NF4Linear
    from llama_pt.config import compose_config, resolve
    from llama_pt.train.trainer import Trainer

    rss_imports = _status_kib("VmRSS")
    cfg = compose_config(overrides)
    run = resolve(cfg)
    trainer = Trainer(run, cfg)
    rss_built = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak over the steps alone
    grad_bytes = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grad_bytes.append(sum(
        p.grad.nbytes for group in opt.param_groups for p in group["params"] if p.grad is not None)))
    batches = iter(trainer.data.loader)
    times, losses = [], []
    for _ in range(run.train.steps):
        start = time.perf_counter()
        metrics = trainer.train_step(next(batches))
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    model = trainer.model
    params = list(model.parameters())
    result = {
        "step_s": times[warmup:], "warmup_s": times[:warmup], "losses": losses, "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "trainable_bytes": sum(p.nbytes for p in params if p.requires_grad),
        "frozen_bytes": sum(p.nbytes for p in params if not p.requires_grad)
        + sum(m.storage_bytes() for m in model.modules() if isinstance(m, NF4Linear)),
        "gradient_bytes": max(grad_bytes),
        "optimizer_bytes": sum(t.nbytes for state in trainer.optimizer.state.values() for t in state.values()
                               if torch.is_tensor(t)),
        "rss_imports_kib": rss_imports, "rss_built_kib": rss_built, "rss_peak_steps_kib": _status_kib("VmHWM"),
    }
    trainer.close()
    return result


def measure(config: str, overrides: list[str], warmup: int, log: Path) -> dict:
    """Run one configuration in a fresh process; its numbers and its peak RSS (ru_maxrss, KiB)."""
    cmd = [sys.executable, __file__, "--worker", "--warmup", str(warmup), "--", *overrides]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "WANDB_MODE": "offline"})
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{config}: the worker failed (exit {code}); its output, {log}:\n{text[-3000:]}")
    result = json.loads(text.rsplit("RESULT ", 1)[1])
    return {**result, "rss_peak_process_kib": usage.ru_maxrss}


# ---- the planner -------------------------------------------------------------------------------

def plan(overrides: list[str], gpu: str) -> dict:
    from llama_pt.config import compose_config
    from llama_pt.plan import get_gpu, make_plan
    return make_plan(compose_config(overrides), get_gpu(gpu), 1, 1).to_dict()


def plan_cmd(overrides: list[str], gpu: str) -> str:
    return f"python -m llama_pt.plan {' '.join(overrides)} gpu={gpu} nodes=1 gpus_per_node=1 --json"


# ---- report ------------------------------------------------------------------------------------

def versions() -> str:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores; Linux {platform.release()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def report(args, runs: dict[str, dict], plans: dict[str, dict], published: list[tuple[str, str, dict]]) -> None:
    print(f"\nmachine: {versions()}")
    print(f"model {args.model}, seq {args.seq_len}, micro-batch {args.micro_batch} ({args.seq_len * args.micro_batch} "
          f"tokens per step), fp32, {next(iter(runs.values()))['threads']} torch threads; {args.warmup} warm-up + "
          f"{args.steps} measured steps per configuration\n")
    print("| configuration | trainable params | step s, median (min-max) | tokens/s | trainable weights MiB "
          "| frozen base MiB | gradients MiB | optimizer MiB | RSS after build MiB | peak RSS in steps MiB "
          "| peak RSS of the process MiB |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        med = statistics.median(r["step_s"])
        print(f"| {name} | {r['trainable_params']:,} | {med:.2f} ({min(r['step_s']):.2f}-{max(r['step_s']):.2f}) "
              f"| {args.seq_len * args.micro_batch / med:.0f} | {r['trainable_bytes'] / MIB:.1f} "
              f"| {r['frozen_bytes'] / MIB:.1f} | {r['gradient_bytes'] / MIB:.1f} | {r['optimizer_bytes'] / MIB:.1f} "
              f"| {r['rss_built_kib'] / 1024:.0f} | {r['rss_peak_steps_kib'] / 1024:.0f} "
              f"| {r['rss_peak_process_kib'] / 1024:.0f} |")
    imports = ", ".join(f"{n} {r['rss_imports_kib'] / 1024:.0f}" for n, r in runs.items())
    print(f"\n(RSS after the imports: {imports} MiB)\n\nplanner, same configurations, one H100:\n")
    print("| configuration | precision | trainable weights + gradients + optimizer MiB | frozen base MiB "
          "| activations MiB | peak GiB (with the 1 GiB reserve) | fits | step s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for key, p in plans.items():
        s = p["states"]
        print(f"| {key.split('/')[0]} | {key.split('/')[1]} | "
              f"{(s['weights'] + s['gradients'] + s['optimizer']) / MIB:.1f} | {s.get('frozen_base', 0) / MIB:.1f} | "
              f"{sum(p['activations'].values()) / MIB:.1f} | {p['peak_bytes'] / GIB:.2f} | {p['fits']} | "
              + (f"{p['step_time']:.4f} |" if "step_time" in p else "not modelled |"))
    print("\nplanner, published-size cases (docs/planner.md):\n")
    print("| case | GPU | peak GiB | capacity GiB | fits |\n| --- | --- | ---: | ---: | --- |")
    for case, gpu, p in published:
        print(f"| {case} | {p['gpu']} | {p['peak_bytes'] / GIB:.2f} | {p['capacity_bytes'] / GIB:.2f} | {p['fits']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_125m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_peft")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.overrides, args.warmup)), flush=True)
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    base, manifest = prepare(out, args.model, tokens=max(200_000, 2 * total * args.seq_len * args.micro_batch))
    runs = {}
    for name in args.configs:
        overrides = run_overrides(name, args.model, base, manifest, out / name, args.seq_len, args.micro_batch, total)
        print(f"{name}: python train.py {' '.join(overrides)}", flush=True)
        runs[name] = measure(name, overrides, args.warmup, out / f"{name}.log")
        print(f"  step s {[round(t, 2) for t in runs[name]['step_s']]}, peak RSS "
              f"{runs[name]['rss_peak_process_kib'] / 1024:.0f} MiB", flush=True)
    plans = {}
    for name in args.configs:
        for precision in ("bf16", "fp32"):
            overrides = [*planner_overrides(name, args.model, args.seq_len, args.micro_batch),
                         f"train.precision={precision}"]
            print(plan_cmd(overrides, "h100"))
            plans[f"{name}/{precision}"] = plan(overrides, "h100")
    published = []
    for case, overrides, gpu in PUBLISHED:
        print(plan_cmd(list(overrides), gpu))
        published.append((case, gpu, plan(list(overrides), gpu)))
    report(args, runs, plans, published)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "plans": plans,
                                         "published": [{"case": c, "gpu": g, "plan": p} for c, g, p in published]},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
