"""Step time of the parallel training path: communication overlap on and off, TP=2 and TP=2 x DP=2.

    .venv/bin/python benchmarks/bench_parallel.py [--model demo --seq 128 --micro-batch 8 --steps 20]
    .venv/bin/python benchmarks/bench_parallel.py --device cuda [--model llama_125m --seq 1024 --micro-batch 8]
    .venv/bin/python benchmarks/bench_parallel.py --single [--model tiny --seq 64]   # the one-process comparison on CPU

CPU (default): for each layout (TP=2 on 2 processes, TP=2 x DP=2 on 4; each with and without
sequence parallelism) and each `parallel.overlap` setting, torchrun starts the processes (gloo), which
build the model exactly as the trainer does (same seed, parallelize, make_loss_fn, the data-parallel
engine: DeepSpeed ZeRO `--zero-stage`, default 1) and time optimizer steps on random tokens: a
barrier, then forward + backward of every micro-batch and the optimizer step; a step's time is the
slowest rank's. Reported: median and min over `--steps` steps after `--warmup`. Overlap covers the
TP collectives of the backward (asynchronous, hidden behind the dgrad/wgrad matmuls) and DeepSpeed's
overlap_comm for the DP gradient reduction.

`--device cuda` (or `--single` on CPU): one device, one process: tokens/s of the parallel code path
at TP=1 (parallelize, which leaves the model untouched at TP=1, the vocabulary-parallel loss, the
all-reduce engine; bf16 autocast on CUDA) against a plain loop (Llama, F.cross_entropy, AdamW): the
parallel layers must cost nothing when unused.
`--json PATH` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama_pt.model import Llama, get_preset  # noqa: E402
from llama_pt.config import ParallelConfig  # noqa: E402
from llama_pt.parallel import ParallelState, PlainDataParallel, make_loss_fn, parallelize  # noqa: E402
from llama_pt.train.optim import OptimConfig, build_optimizer  # noqa: E402

LAYOUTS = [(2, False), (2, True), (4, False), (4, True)]  # (processes, sequence_parallel); TP = 2 throughout


def _tokens(args, rank: int, vocab: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + rank)
    return [torch.randint(0, vocab, (args.micro_batch, args.seq + 1), generator=g).to(device)
            for _ in range(args.grad_accum)]


def _step(engine, loss_fn, micro, autocast) -> None:
    for i, batch in enumerate(micro):
        with autocast():
            logits = engine.forward(batch[:, :-1])
        engine.backward(loss_fn(logits, batch[:, 1:]), last=i == len(micro) - 1)
    engine.step(1e-4)


def worker(args) -> None:
    """Under torchrun: time optimizer steps of one layout and overlap setting; rank 0 prints JSON."""
    import contextlib
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = get_preset(args.model)
    pcfg = ParallelConfig(tensor_parallel=2, sequence_parallel=args.sp, overlap=args.overlap,
                          zero_stage=args.zero_stage)
    pstate = ParallelState(pcfg, cfg, args.seq)
    torch.manual_seed(0)
    model = parallelize(Llama(cfg), pstate)
    optimizer = build_optimizer(model, OptimConfig())
    if args.zero_stage:
        from llama_pt.parallel.zero import ZeroDataParallel
        engine = ZeroDataParallel(model, optimizer, pstate, args.micro_batch, args.grad_accum, 1.0, bf16=False)
    else:
        engine = PlainDataParallel(model, optimizer, pstate, args.grad_accum, 1.0, args.overlap)
    loss_fn, micro = make_loss_fn(pstate), _tokens(args, pstate.dp_rank, cfg.vocab_size, "cpu")
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        _step(engine, loss_fn, micro, contextlib.nullcontext)
        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(elapsed.item())
    engine.close()
    if dist.get_rank() == 0:
        tokens = args.micro_batch * args.seq * args.grad_accum * pstate.dp_size
        print("RESULT " + json.dumps({"world": pstate.world_size, "tp": 2, "dp": pstate.dp_size, "sp": args.sp,
                                      "overlap": args.overlap, "median_s": statistics.median(times),
                                      "min_s": min(times), "tokens_per_step": tokens}))
    dist.destroy_process_group()
    del engine, model, optimizer, pstate
    gc.collect()  # free engines and groups before interpreter shutdown (see llama_pt.train.entry)


def run_cpu(args) -> list[dict]:
    results = []
    for nproc, sp in LAYOUTS:
        for overlap in (True, False):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   __file__, "--worker", "--model", args.model, "--seq", str(args.seq),
                   "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--zero-stage", str(args.zero_stage)]
            cmd += ["--sp"] if sp else []
            cmd += [] if overlap else ["--no-overlap"]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"torchrun failed ({nproc} processes, sp={sp}, overlap={overlap}):\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[0][len("RESULT "):]))
            print(results[-1], file=sys.stderr)
    return results


def run_single(args) -> list[dict]:
    """One device: the plain loop against the parallel code path at TP=1 (tokens/s)."""
    device = torch.device(args.device)
    cfg = get_preset(args.model)
    use_bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else \
        (lambda: torch.autocast(device.type, enabled=False))
    micro = _tokens(args, 0, cfg.vocab_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    class Plain:  # the loop of a plain single-device trainer
        def __init__(self, model):
            self.module, self.opt, self.n = model, build_optimizer(model, OptimConfig()), len(micro)

        def forward(self, x):
            return self.module(x)

        def backward(self, loss, last):
            (loss / self.n).backward()

        def step(self, lr):
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def plain_loss(logits, targets):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    engines = {}
    for path in ("plain", "parallel_tp1"):
        torch.manual_seed(0)
        model = Llama(cfg).to(device)
        if path == "plain":
            engines[path] = (Plain(model), plain_loss)
        else:
            pstate = ParallelState.single(cfg, args.seq)
            model = parallelize(model, pstate)
            engines[path] = (PlainDataParallel(model, build_optimizer(model, OptimConfig()), pstate, len(micro), 1.0,
                                               True), make_loss_fn(pstate))
    times = {path: [] for path in engines}
    for i in range(args.warmup + args.steps):  # alternate the paths step by step: drifting load hits both
        for path, (engine, loss_fn) in engines.items():
            sync()
            start = time.perf_counter()
            _step(engine, loss_fn, micro, autocast)
            sync()
            if i >= args.warmup:
                times[path].append(time.perf_counter() - start)
    tokens = args.micro_batch * args.seq * args.grad_accum
    results = [{"path": path, "median_s": statistics.median(t), "min_s": min(t),
                "tokens_per_s": tokens / statistics.median(t)} for path, t in times.items()]
    for r in results:
        print(r, file=sys.stderr)
    return results


def versions() -> str:
    try:
        import deepspeed
        ds = f", deepspeed {deepspeed.__version__}"
    except ImportError:  # the one-device comparison runs without it (GPU images often lack it)
        ds = ""
    return (f"Python {platform.python_version()}, torch {torch.__version__}{ds}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="preset (default: demo on CPU, llama_125m on CUDA)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--single", action="store_true", help="one process: plain loop vs parallel path at TP=1")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-overlap", dest="overlap", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("llama_125m" if args.device == "cuda" else "demo")
    args.seq = args.seq or (1024 if args.device == "cuda" else 128)
    if args.worker:
        return worker(args)
    single = args.single or args.device == "cuda"
    results = run_single(args) if single else run_cpu(args)
    print(f"# {versions()}\n# command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    if single:
        print("| path | median step s | tokens/s |\n| --- | ---: | ---: |")
        for r in results:
            print(f"| {r['path']} | {r['median_s']:.4f} | {r['tokens_per_s']:.0f} |")
    else:
        print("| processes | layout | overlap | median step s | min step s | tokens/s (median) |")
        print("| ---: | --- | --- | ---: | ---: | ---: |")
        for r in results:
            layout = f"TP=2{' +SP' if r['sp'] else ''} x DP={r['dp']}"
            print(f"| {r['world']} | {layout} | {'on' if r['overlap'] else 'off'} | {r['median_s']:.4f} | "
                  f"{r['min_s']:.4f} | {r['tokens_per_step'] / r['median_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
