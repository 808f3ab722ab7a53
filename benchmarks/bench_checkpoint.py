"""Checkpoint save and load under DeepSpeed ZeRO: time, bytes and collectives, per-partition against per-tensor.

    .venv/bin/python benchmarks/bench_checkpoint.py [--model llama_125m --nproc 2 --zero-stage 1 --repeats 3]
    .venv/bin/python benchmarks/bench_checkpoint.py --repo /tmp/llama_head --paths full   # another checkout

torchrun starts `--nproc` processes (gloo, one thread each: DP = nproc, TP = 1) that build the model
as the trainer does (same seed, DeepSpeed ZeRO `--zero-stage` with our AdamW and ParallelState as
mpu, fp32 on CPU), take one optimizer step on random tokens (so the moments are not zero), then save
and load the checkpoint `--repeats` times each with llama_pt.train.checkpoint, through each path:

  fragments  what the trainer does: CheckpointLayout.engine_checkpoint, i.e. each rank writes the
             range of every parameter its ZeRO partition holds and reads back into it, then
             DeepSpeed's update_lp_params (zero.ZeroDataParallel.partition_fragments)
  full       the per-tensor path (the trainer's before that change): the engine's state_tensors
             (DeepSpeed's safe_get_full_fp32_param / safe_get_full_optimizer_state: an all-reduce over
             DP per tensor), wrapped by CheckpointLayout.wrap; load_state_tensors after the load

A save is timed from a barrier to the slowest rank's return of save_checkpoint (building the tree
included); a load from a barrier to the slowest rank's return of load_checkpoint (rank 0 checks
every file's SHA-256 first, as Trainer.restore does) plus the engine's update. Reported: median and
min seconds; rank 0's time to hash the folder once (verify_checkpoint: a save hashes every file for
the manifest, a load checks them), which neither path changes; the folder's bytes; and every
collective issued during one save and one load (op: calls, and for tensor collectives the bytes by
comm_trace's convention). `--repo` imports llama_pt
from another checkout (e.g. ``git worktree add /tmp/llama_head HEAD``), whose trainer knew only `full`.
`--json PATH` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("fragments", "full")


def _repo_on_path(argv: list[str]) -> Path:
    """The checkout to import llama_pt from (--repo), put first on sys.path before any import of it."""
    repo = Path(argv[argv.index("--repo") + 1]).resolve() if "--repo" in argv else REPO
    sys.path.insert(0, str(repo))
    return repo


LLAMA_REPO = _repo_on_path(sys.argv)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

_local = threading.local()


@contextlib.contextmanager
def recorded_collectives():
    """Every torch.distributed collective issued in the block (llama_pt.parallel.inflight.WATCHED:
    tensor and object collectives, barriers), outermost calls only: yields [op name]."""
    from llama_pt.parallel.comm_trace import interposed
    from llama_pt.parallel.inflight import WATCHED
    calls: list[str] = []

    def make(fn, name):
        def wrapper(*args, **kwargs):
            if getattr(_local, "inside", False):
                return fn(*args, **kwargs)
            calls.append(name)
            _local.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                _local.inside = False
        return wrapper
    with interposed(WATCHED, make):
        yield calls


def _slowest(start: float) -> float:
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def worker(args) -> None:
    """Under torchrun: one optimizer step, then `--repeats` saves and loads through `--path`; rank 0 prints JSON."""
    from llama_pt.model import Llama, get_preset
    from llama_pt.config import ParallelConfig
    from llama_pt.parallel import CheckpointLayout, ParallelState, make_loss_fn, parallelize
    from llama_pt.parallel.comm_trace import summarize, trace_collectives
    from llama_pt.parallel.zero import ZeroDataParallel
    from llama_pt.train import checkpoint as ckpt
    from llama_pt.train.optim import OptimConfig, build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = get_preset(args.model)
    pstate = ParallelState(ParallelConfig(zero_stage=args.zero_stage), cfg, args.seq)
    torch.manual_seed(0)
    model = parallelize(Llama(cfg), pstate)
    engine = ZeroDataParallel(model, build_optimizer(model, OptimConfig()), pstate, 1, 1, 1.0, bf16=False)
    g = torch.Generator().manual_seed(1234 + pstate.dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq + 1), generator=g)
    engine.backward(make_loss_fn(pstate)(engine.forward(tokens[:, :-1]), tokens[:, 1:]), last=True)
    engine.step(1e-4)
    layout = CheckpointLayout(pstate, torch.device("cpu"))
    params = dict(engine.module.named_parameters())

    def tree_and_finish():
        if args.path == "fragments":
            target = layout.engine_checkpoint(engine, params)
            return target.tree, target.loaded
        tensors = engine.state_tensors()
        return layout.wrap(tensors, params), lambda: engine.load_state_tensors(tensors)

    root = Path(args.out)
    save_s, load_s, comm = [], [], {}
    for i in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        with recorded_collectives() as calls, trace_collectives() as traced:
            tree, _ = tree_and_finish()
            path = ckpt.save_checkpoint(root, i + 1, tree, {"step": i + 1}, keep_last=1)
        save_s.append(_slowest(start))
        comm.setdefault("save", (calls, traced))
        del tree
        dist.barrier()
        start = time.perf_counter()
        with recorded_collectives() as calls, trace_collectives() as traced:
            tree, finish = tree_and_finish()
            ckpt.load_checkpoint(path, tree)
            finish()
        load_s.append(_slowest(start))
        comm.setdefault("load", (calls, traced))
        del tree, finish
    size = sum(f.stat().st_size for f in path.iterdir())
    start = time.perf_counter()
    ckpt.verify_checkpoint(path)  # the SHA-256 of every file, part of both a save and a load above
    verify_s = time.perf_counter() - start
    result = {"path": args.path, "model": args.model, "params": sum(p.numel() for p in params.values()),
              "tensors": 3 * len(params), "dp": pstate.dp_size, "zero_stage": args.zero_stage, "bytes": size,
              "save_s": save_s, "load_s": load_s, "verify_s": verify_s}
    ranks = list(range(dist.get_world_size()))
    for phase, (calls, traced) in comm.items():
        result[f"{phase}_calls"] = dict(Counter(calls))
        result[f"{phase}_tensor_bytes"] = {op: float(v["bytes"]) for op, v in summarize(traced, ranks).items()}
    engine.close()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result))
    dist.destroy_process_group()
    del engine, model
    gc.collect()  # free engines and groups before interpreter shutdown (see llama_pt.train.entry)


def run(args, path: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_", dir=args.dir) as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", "--repo", str(LLAMA_REPO), "--path", path, "--out", out, "--model", args.model,
               "--seq", str(args.seq), "--zero-stage", str(args.zero_stage), "--repeats", str(args.repeats)]
        env = {**os.environ, "PYTHONPATH": str(LLAMA_REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"torchrun failed (path {path}):\n{proc.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def versions() -> str:
    import deepspeed
    return (f"Python {platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}")


def _calls(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) + f" (total {sum(counts.values())})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_125m", help="model preset")
    parser.add_argument("--seq", type=int, default=64, help="tokens of the one training step before the saves")
    parser.add_argument("--nproc", type=int, default=2, help="processes = DP size")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to import llama_pt from")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = []
    for path in args.paths:
        results.append(run(args, path))
        print(results[-1], file=sys.stderr)
    command = " ".join([Path(sys.executable).name] + sys.argv)
    print(f"# {versions()}\n# llama_pt from {LLAMA_REPO}\n# command: {command}")
    print("| path | save s (median / min) | load s (median / min) | of which SHA-256 s | bytes | "
          "save: collectives | load: collectives |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in results:
        print(f"| {r['path']} | {statistics.median(r['save_s']):.2f} / {min(r['save_s']):.2f} | "
              f"{statistics.median(r['load_s']):.2f} / {min(r['load_s']):.2f} | {r['verify_s']:.2f} | "
              f"{r['bytes']:,} | {_calls(r['save_calls'])} | {_calls(r['load_calls'])} |")
    for r in results:
        print(f"# {r['path']}: tensor bytes sent per rank, save {r['save_tensor_bytes']}, "
              f"load {r['load_tensor_bytes']}")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "repo": str(LLAMA_REPO),
                                         "args": vars(args) | {"json": str(args.json), "repo": str(args.repo)},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
