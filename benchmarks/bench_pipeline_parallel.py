"""Pipeline parallelism on CPU: step time and the bubble per schedule, measured from the recorded timeline.

    .venv/bin/python benchmarks/bench_pipeline_parallel.py [--stages 2 4] [--layers 8 --seq 128 --micro-batch 4
        --micro-batches 8 --steps 5] [--json out.json]

For each number of stages p and each schedule (GPipe, 1F1B, interleaved 1F1B with v=2), torchrun starts p
processes (gloo, one thread each) that build the model as the trainer does (same seed, build_model: TP plan,
activation mode `selective`, the stage cut), the all-reduce engine and the loss, and run optimizer steps on
random tokens: a barrier, then the schedule (llama_pt.parallel.pipeline.run_schedule) and the optimizer step.
A step's time is the slowest stage's. Every stage records its timeline (forward, backward, waits); the idle
fraction of a stage is 1 - its compute time / the span of the schedule over all stages (host monotonic
clock, one machine), printed next to the formulas of Narayanan et al. 2021, Sec. 2.2: (p-1)/(m+p-1) for
GPipe and 1F1B, (p-1)/(v m+p-1) interleaved. Medians over --steps steps after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
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

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2))


def worker(args) -> None:
    import torch.distributed as dist
    from llama_pt.config import compose_config, resolve
    from llama_pt.parallel import PlainDataParallel, make_loss_fn
    from llama_pt.parallel.pipeline import StageLink, StageTimeline, idle_fraction, run_schedule, schedule_actions
    from llama_pt.train.distributed import WorldEnv, start
    from llama_pt.train.model_setup import build_model
    from llama_pt.train.optim import build_optimizer

    torch.set_num_threads(1)
    env = WorldEnv.from_environ()
    m, b = args.micro_batches, args.micro_batch
    cfg = compose_config([
        "model=tiny", f"model.n_layers={args.layers}", f"model.dim={args.dim}", "model.activation=selective",
        "data.manifest=unused",
        f"train.seq_len={args.seq}", f"train.global_batch_tokens={args.seq * b * m}", f"train.micro_batch_size={b}",
        "train.eval_every=0", "train.device=cpu", "logging.wandb.enabled=false",
        f"parallel.pipeline_parallel={env.world_size}", f"parallel.pipeline_schedule={args.schedule}",
        f"parallel.virtual_stages={args.chunks}"])
    run = resolve(cfg, env.world_size)
    ctx = start(run, env)
    p = ctx.pstate
    model = build_model(run, p, ctx.device)
    engine = PlainDataParallel(model, build_optimizer(model, run.optim), p, m, run.optim.grad_clip, True)
    loss_fn = make_loss_fn(p)
    link = StageLink(p, (b, args.seq, run.model.dim), torch.float32, ctx.device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, run.model.vocab_size, (b, args.seq + 1), generator=gen) for _ in range(m)]
    actions = schedule_actions(args.schedule, p.pp_size, p.pp_rank, m, args.chunks)

    def forward(chunk, i, hidden):
        return engine.forward(batches[i][:, :-1], hidden=hidden, chunk=chunk)

    def backward(out, grad, last):
        engine.backward(out, last) if grad is None else engine.backward_from(out, grad, last)

    step_times, idle = [], []
    for step in range(2 + args.steps):
        timeline = StageTimeline(p.pp_rank)
        dist.barrier()
        started = time.perf_counter()
        run_schedule(actions, p.pp_size, p.pp_rank, args.chunks, m, link, forward,
                     lambda i, logits: loss_fn(logits, batches[i][:, 1:]), backward, timeline)
        engine.step(1e-4)
        elapsed = torch.tensor(time.perf_counter() - started)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        timelines = [None] * p.pp_size
        dist.all_gather_object(timelines, timeline)
        if step >= 2:
            step_times.append(elapsed.item())
            idle.append(idle_fraction(timelines))
    if env.rank == 0:
        v = args.chunks
        print(json.dumps({
            "stages": p.pp_size, "schedule": args.schedule, "virtual": v, "micro_batches": m,
            "step_s": statistics.median(step_times),
            "idle_per_stage": [statistics.median(s[i] for s in idle) for i in range(p.pp_size)],
            "formula": (p.pp_size - 1) / (v * m + p.pp_size - 1)}))
    ctx.close()


def run_all(args) -> list[dict]:
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for stages in args.stages:
        for schedule, virtual in SCHEDULES:
            if args.layers < stages * virtual or (virtual > 1 and args.micro_batches % stages):
                continue
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stages}",
                   __file__, "--worker", "--schedule", schedule, "--chunks", str(virtual),
                   "--layers", str(args.layers), "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
                   "--micro-batches", str(args.micro_batches), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
            if proc.returncode:
                sys.exit(f"torchrun failed ({stages} stages, {schedule}):\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            idle = ", ".join(f"{x:.3f}" for x in result["idle_per_stage"])
            print(f"p={stages} {schedule:<17} v={virtual}: step {result['step_s'] * 1e3:7.1f} ms; idle per stage "
                  f"[{idle}] (formula {result['formula']:.3f})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"tiny model with {args.layers} layers of dim {args.dim}, seq {args.seq}, micro-batch {args.micro_batch}, "
          f"{args.micro_batches} micro-batches", flush=True)
    results = run_all(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
