"""The training data loader at scale: index build time, memory per rank and per loader worker, tokens/s.

    python benchmarks/bench_loader.py --docs 1e8                # the full measurement
    python benchmarks/bench_loader.py --docs 1e6 --old          # small, next to the previous implementation

Writes a synthetic mixture of --docs documents over three sources (web, code, books: 60/30/10% of the
documents and of the blend weight) into a new folder inside --workdir (default: the temporary
directory), deleted at the end unless --keep. Document lengths are lognormal (sigma 1, mean ~700 tokens, median
~425). The .idx files are real Megatron indexes (llama_pt.data.indexed's layout, one shard per
--shard-docs documents); each .bin is a SPARSE file of the right size made with truncate, so the disk
holds only the indexes and the tables and every token reads as 0: the figures are the loader's own
cost, not the storage's.

Every measurement runs in a fresh process:
  build   global rank 0's work: the epoch-0 tables of every source (seconds; peak RSS, which counts
          the page cache of the .idx files read and the table files written, and peak anonymous
          memory, sampled every 20 ms).
  rank    a rank: opens the sources (checking every .idx), reads through MicroBatchLoader (seq_len
          2048, global batch 64, micro-batches of 8) with num_workers 1 and 2 (forked workers, each
          time on freshly opened sources), then reads samples in its own process for --seconds (the
          raw tokens/s); memory of the rank and of each worker.
  old     (--old) the same reads with the implementation of --old-ref (git show of
          llama_pt/data/packing.py and indexed.py, loaded as a package), which builds its tables in
          every process.
Memory comes from /proc/<pid>/smaps, split into: rss; uss (pages no other process maps); own (the
process's private memory that no file backs: private pages of anonymous mappings and copy-on-write
pages of file mappings; file pages, clean or not yet written back, are page cache); mapped_shards and
mapped_tables (resident pages of the shards' .idx/.bin and of the epoch tables: page cache, shared by
every process of the machine).
The planner's tokens/s per H100 (llama_pt.plan, seq 2048, 8 GPUs, data parallel) for llama_1b and
llama3_8b give the headroom. Prints one JSON object per measurement and a summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCES = (("web", 0.6), ("code", 0.3), ("books", 0.1))
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 2048, 64, 8
MEAN_TOKENS, SIGMA = 700.0, 1.0
IDX_BYTES_PER_DOC, TABLE_BYTES_PER_DOC = 20, 12


# ---- the synthetic mixture ------------------------------------------------------------------------

def write_shard(prefix: Path, lengths: np.ndarray) -> None:
    """A Megatron .idx for documents of these lengths (uint16 tokens) and a sparse .bin of the right size."""
    from llama_pt.data.indexed import HEADER_BYTES, MAGIC, VERSION
    n = len(lengths)
    pointers = (np.cumsum(lengths, dtype=np.int64) - lengths) * 2
    with open(f"{prefix}.idx.tmp", "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, 8, n, n + 1))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
        assert f.tell() == HEADER_BYTES + 12 * n + 8 * (n + 1)
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)
    os.replace(f"{prefix}.idx.tmp", f"{prefix}.idx")


def make_mixture(data_dir: Path, docs: int, shard_docs: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    mu = math.log(MEAN_TOKENS) - SIGMA ** 2 / 2
    spec: dict[str, Any] = {"sources": [], "docs": docs}
    tokens = 0
    for name, share in SOURCES:
        n = int(round(docs * share))
        prefixes = []
        for k, a in enumerate(range(0, n, shard_docs)):
            lengths = np.maximum(1, np.rint(rng.lognormal(mu, SIGMA, min(shard_docs, n - a)))).astype(np.int32)
            prefix = data_dir / "shards" / name / f"{k:05d}"
            prefix.parent.mkdir(parents=True, exist_ok=True)
            write_shard(prefix, lengths)
            prefixes.append(str(prefix))
            tokens += int(lengths.sum())
        spec["sources"].append({"name": name, "weight": share, "docs": n, "prefixes": prefixes})
    spec["tokens"] = tokens
    return spec


# ---- measurements (each in its own process) -------------------------------------------------------

def memory(pid: int, data_dir: str) -> dict[str, float]:
    """MB from /proc/<pid>/smaps; see the module docstring for the fields."""
    totals = dict.fromkeys(("rss", "uss", "own", "mapped_shards", "mapped_tables"), 0)
    path, is_file = "", False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if not line[:1].isupper():  # a mapping's header: address range, perms, offset, dev, inode, path
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                is_file = path.startswith("/") and not path.endswith("(deleted)")
                continue
            head, _, rest = line.partition(":")
            if not rest.strip().endswith("kB"):
                continue
            kb = int(rest.split()[0])
            if head == "Rss":
                totals["rss"] += kb
                if path.startswith(f"{data_dir}/shards/"):
                    totals["mapped_shards"] += kb
                elif path.startswith(f"{data_dir}/index/"):
                    totals["mapped_tables"] += kb
            elif head in ("Private_Clean", "Private_Dirty"):
                totals["uss"] += kb
                if not is_file:
                    totals["own"] += kb
            elif head == "Anonymous" and is_file:  # copy-on-write pages of a file mapping
                totals["own"] += kb
    return {k: round(v / 1024, 1) for k, v in totals.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def open_sources(spec: dict[str, Any], data_dir: Path, impl: str):
    if impl == "new":
        from llama_pt.data import PackedSource
        return [PackedSource(s["name"], s["prefixes"], SEQ_LEN, seed=1234, index_dir=data_dir / "index")
                for s in spec["sources"]]
    sys.path.insert(0, str(data_dir / "old_impl"))
    from old_llama_pt_data.packing import PackedSource as OldPackedSource
    return [OldPackedSource(s["name"], s["prefixes"], SEQ_LEN, seed=1234) for s in spec["sources"]]


class PeakAnon:
    """Samples RssAnon (/proc/self/status) every 20 ms in a thread; `.peak` in MB."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak, 1)


def role_build(spec: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    from llama_pt.data import PackedSource  # noqa: F401 (imported before the clock starts)
    anon = PeakAnon()
    t0 = time.perf_counter()
    sources = open_sources(spec, data_dir, "new")
    opened = time.perf_counter() - t0
    per_source = {}
    for src in sources:
        t = time.perf_counter()
        built = src.build_epochs([0])
        per_source[src.name] = {"docs": src.num_docs, "seconds": round(time.perf_counter() - t, 2), "built": built}
    table_bytes = sum(p.stat().st_size for p in (data_dir / "index").rglob("*.npy"))
    return {"open_s": round(opened, 2), "build_s": round(time.perf_counter() - t0 - opened, 2),
            "per_source": per_source, "table_GB": round(table_bytes / 1e9, 3), "peak_anon_MB": anon.stop(),
            "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def role_rank(spec: dict[str, Any], data_dir: Path, impl: str, seconds: float, steps: int,
              worker_counts: list[int]) -> dict[str, Any]:
    """The loader runs first, each time on freshly opened sources, as in training, where the rank's own
    process never reads a sample (its workers do); then the rank reads samples itself."""
    from llama_pt.data import BlendedSamples, MicroBatchLoader
    weights = [s["weight"] for s in spec["sources"]]
    result: dict[str, Any] = {"impl": impl, "memory_before_open": memory(os.getpid(), data_dir)}
    t0 = time.perf_counter()
    samples = BlendedSamples(open_sources(spec, data_dir, impl), weights)
    result.update(open_s=round(time.perf_counter() - t0, 2), memory_after_open=memory(os.getpid(), data_dir))
    start = 0
    for workers in worker_counts:
        samples = BlendedSamples(open_sources(spec, data_dir, impl), weights)
        loader = MicroBatchLoader(samples, GLOBAL_BATCH, MICRO_BATCH, consumed_samples=start, num_workers=workers)
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        next(it)
        pids = children(os.getpid())
        cpu0, t0 = [cpu_seconds(pid) for pid in pids], time.perf_counter()
        for _ in range(steps):
            next(it)
        elapsed = time.perf_counter() - t0
        cpu = [round(cpu_seconds(pid) - c, 2) for pid, c in zip(pids, cpu0)]
        worker_mem = [memory(pid, data_dir) for pid in pids]
        del it
        start += (steps + 2) * GLOBAL_BATCH
        tokens = steps * GLOBAL_BATCH * SEQ_LEN
        result[f"workers_{workers}"] = {"first_step_s": round(first, 2), "tokens_per_s": round(tokens / elapsed),
                                        "worker_cpu_s": cpu, "tokens_per_worker_cpu_s": round(tokens / sum(cpu)),
                                        "memory_workers": worker_mem}
    result["memory_rank_with_loader"] = memory(os.getpid(), data_dir)
    g, t0, cpu0 = start, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or g < start + 200:
        samples[g]
        g += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    result.update(raw_samples=g - start, raw_tokens_per_s=round((g - start) * SEQ_LEN / elapsed),
                  raw_tokens_per_cpu_s=round((g - start) * SEQ_LEN / cpu),
                  memory_rank_after_reading=memory(os.getpid(), data_dir))
    return result


def install_old_impl(data_dir: Path, ref: str) -> None:
    """--old-ref's packing.py and indexed.py as the package old_llama_pt_data."""
    pkg = data_dir / "old_impl" / "old_llama_pt_data"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for module in ("packing", "indexed"):
        text = subprocess.run(["git", "show", f"{ref}:llama_pt/data/{module}.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        (pkg / f"{module}.py").write_text(text)


def planner_tokens_per_s() -> dict[str, float]:
    """tokens/s per H100 predicted by llama_pt.plan at seq 2048 on one node of 8 GPUs, data parallel."""
    from llama_pt.plan.__main__ import compose_config
    from llama_pt.plan.hardware import get_gpu
    from llama_pt.plan.report import make_plan
    out = {}
    for model, extra in (("llama_1b", []), ("llama3_8b", ["parallel.zero_stage=1"])):
        cfg = compose_config([f"model={model}", f"train.seq_len={SEQ_LEN}", "train.global_batch_tokens=4194304",
                              "train.micro_batch_size=1", *extra])
        out[model] = round(make_plan(cfg, get_gpu("h100"), 8, 8).time.tokens_per_s_per_gpu)
    return out


# ---- driver ---------------------------------------------------------------------------------------

def run_role(args: argparse.Namespace, role: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--role", role, "--workdir", str(args.data_dir), "--seconds",
           str(args.seconds), "--steps", str(args.steps), *extra]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"role": role, **result}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=float, default=1e8, help="documents over all sources (default 1e8)")
    p.add_argument("--shard-docs", type=float, default=1e7, help="documents per shard (default 1e7)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="a new folder inside it holds the shards and tables (default: the temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep that folder at the end")
    p.add_argument("--old", action="store_true", help="also measure the implementation of --old-ref")
    p.add_argument("--old-ref", default="HEAD", help="git revision of the previous implementation")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the raw per-process read (s)")
    p.add_argument("--steps", type=int, default=50, help="timed loader steps per worker count")
    p.add_argument("--role", choices=("build", "rank", "old"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.role:  # one measurement, in a process of its own; --workdir is the data folder
        spec = json.loads((args.workdir / "spec.json").read_text())
        if args.role == "build":
            result = role_build(spec, args.workdir)
        else:
            result = role_rank(spec, args.workdir, "new" if args.role == "rank" else "old", args.seconds,
                               args.steps, [1, 2] if args.role == "rank" else [1])
        print(json.dumps(result))
        return

    docs, shard_docs = int(args.docs), int(args.shard_docs)
    parent = args.workdir if args.workdir is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = docs * (IDX_BYTES_PER_DOC + TABLE_BYTES_PER_DOC)
    free = shutil.disk_usage(parent).free
    if free < 2 * need:
        sys.exit(f"error: {parent} has {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.1f} GB (x2 margin)")
    args.data_dir = Path(tempfile.mkdtemp(prefix="bench_loader_", dir=parent))
    try:
        t0 = time.perf_counter()
        spec = make_mixture(args.data_dir, docs, shard_docs)
        (args.data_dir / "spec.json").write_text(json.dumps(spec))
        print(json.dumps({"role": "data", "docs": docs, "tokens": spec["tokens"],
                          "shards": sum(len(s["prefixes"]) for s in spec["sources"]),
                          "idx_GB": round(sum(os.path.getsize(f"{q}.idx") for s in spec["sources"]
                                              for q in s["prefixes"]) / 1e9, 3),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        build = run_role(args, "build")
        rank = run_role(args, "rank")
        old = None
        if args.old:
            install_old_impl(args.data_dir, args.old_ref)
            old = run_role(args, "old")
        planner = planner_tokens_per_s()
        worker_rate = min(rank[f"workers_{w}"]["tokens_per_s"] / w for w in (1, 2))
        summary = {"role": "summary", "docs": docs, "build_s": build["build_s"],
                   "rank_own_MB": rank["memory_rank_after_reading"]["own"],
                   "worker_own_MB": max(m["own"] for w in (1, 2) for m in rank[f"workers_{w}"]["memory_workers"]),
                   "raw_tokens_per_s": rank["raw_tokens_per_s"], "raw_tokens_per_cpu_s": rank["raw_tokens_per_cpu_s"],
                   "loader_tokens_per_s": {w: rank[f"workers_{w}"]["tokens_per_s"] for w in (1, 2)},
                   "h100_tokens_per_s": planner,
                   "headroom_per_worker": {m: round(worker_rate / r, 1) for m, r in planner.items()}}
        if old is not None:
            summary["old_rank_own_MB"] = old["memory_rank_after_reading"]["own"]
            summary["old_worker_own_MB"] = max(m["own"] for m in old["workers_1"]["memory_workers"])
        print(json.dumps(summary), flush=True)
    finally:
        if args.keep:
            print(f"kept {args.data_dir}", file=sys.stderr)
        else:
            shutil.rmtree(args.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
