"""The "GPU check" section of RESULTS.md: rendered from the report (`render_section`) and put between the
markers BEGIN and END, in place of an earlier section or appended (`insert_section`).
"""
from __future__ import annotations

from typing import Optional

BEGIN = "<!-- BEGIN gpu-check (scripts/gpu_check) -->"
END = "<!-- END gpu-check -->"


def insert_section(text: str, section: str) -> str:
    """`text` with its gpu-check section (BEGIN..END) replaced by `section`, or `section` appended."""
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        return text[:start] + section + text[end + len(END):]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_section(report: dict, json_path: str) -> str:
    """The section, BEGIN to END, for `report`; `json_path` is where it says the JSON report lies."""
    m, steps = report["machine"], report["steps"]
    versions = m.get("versions", {})
    if report["device"] == "cuda":
        title = m.get("gpu", "cuda")
        where = (f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, compute capability {m.get('compute_capability')}, "
                 f"{m.get('multiprocessors')} SMs; {m.get('gpu_count')} visible), driver {m.get('driver')} "
                 f"(CUDA {m.get('driver_cuda')}), {m.get('cpu_count')} CPU cores")
    else:
        title = "cpu"
        where = f"CPU only ({m.get('cpu_count')} cores; `--device cpu`: the CUDA tests skip)"
    if report["quick"]:
        title += " (quick smoke run: tiny shapes, not reference figures)"
    lines = [BEGIN, f"## GPU check — {title} — {report['date']}", "",
             f"Command: `{report['command']}`, {report['elapsed_s']:.0f} s in all (budget "
             f"{report['budget_s']} s), started {report['started_utc']}; every figure below is in `{json_path}`. "
             f"Machine: {where}. Versions: Python {m.get('python')}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
             + (f" (torch built for CUDA {m['torch_cuda']})" if m.get("torch_cuda") else "")
             + "; not installed: " + (", ".join(k for k, v in versions.items() if not v) or "none") + ".", ""]
    lines += _setup_lines(report.get("setup") or {})
    lines += ["| step | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {name} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | {s.get('limit_s')} |"
              for name, s in steps.items()]
    lines += _tests_lines(report.get("tests"), steps["tests"])
    lines += _bench_layer_lines(report.get("bench_layer"), steps["bench_layer"])
    lines += _bench_parallel_lines(report.get("bench_parallel"), steps["bench_parallel"])
    lines += _bench_documents_lines(report.get("bench_documents"), steps["bench_documents"])
    return "\n".join(lines + ["", END])


def _setup_lines(setup: dict) -> list[str]:
    if not setup:
        return []
    parts = [f"needed {', '.join(setup['needed'])}"]
    if setup["installed"]:
        parts.append("installed " + ", ".join(f"{i['package']} from {i['source']}" for i in setup["installed"]))
    if setup["missing"]:
        parts.append(f"missing {', '.join(setup['missing'])} (the tests that need them skip)")
    elif not setup["installed"]:
        parts.append("all present")
    if setup["expected_missing"]:
        parts.append(f"absent from the image: {', '.join(setup['expected_missing'])}")
    return ["Set-up: " + "; ".join(parts) + ".", ""]


def _tests_lines(tests: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### CUDA tests (`pytest tests/cuda -m cuda`)", ""]
    if tests is None:
        return lines + [f"Not run ({step['status']})."]
    ended = "stopped at its time limit" if tests["exit_code"] is None else f"pytest exit code {tests['exit_code']}"
    lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} "
                 f"skipped ({ended}).")
    per_file: dict[str, dict[str, int]] = {}
    for case in tests["cases"]:
        counts = per_file.setdefault(case["test"].split("::")[0], {"passed": 0, "failed": 0, "skipped": 0, "error": 0})
        counts[case["outcome"]] += 1
    if per_file:
        lines += ["", "| file | passed | failed | skipped | errors |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {f} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['error']} |"
                  for f, c in per_file.items()]
    bad = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
    if bad:
        lines += ["", "Failures:"] + [f"- `{c['test']}` ({c['when']}): {c['message']}" for c in bad]
    reasons: dict[str, int] = {}
    for c in tests["cases"]:
        if c["outcome"] == "skipped":
            reasons[c["message"]] = reasons.get(c["message"], 0) + 1
    if reasons:
        lines += ["", "Skipped:"] + [f"- {n} x {reason}" for reason, n in reasons.items()]
    return lines


def _bench_layer_lines(bench: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### Training step per activation mode and attention backend, next to transformers "
                 "(`benchmarks/bench_layer.py`)", ""]
    if not bench:
        return lines + [f"No rows ({step['status']})."]
    args = bench["args"]
    lines += [f"`{step.get('command', '')}`: {args['steps']} timed steps after {args['warmup']} warm-up, precision "
              f"{args['precision']}; step {step['status']}.", "",
              "| preset | implementation | activation | attention | batch x seq | step ms | tokens/s | MFU | peak GiB "
              "| first loss |", "| --- " * 4 + "| ---: " * 6 + "|"]
    for r in bench["rows"]:
        head = f"| {r['preset']} | {r['impl']} | {r['mode']} | {r['attention']} | {r['batch']}x{r['seq']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | |")
            continue
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{head} {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {_fmt(r.get('peak_gib'), '.2f')} "
                     f"| {r['first_loss']:.4f} |")
    for preset in dict.fromkeys(r["preset"] for r in bench["rows"]):
        rows = [r for r in bench["rows"] if r["preset"] == preset and "error" not in r]
        ours = [r for r in rows if r["impl"] == "llama_pt" and r["mode"] == "selective"]
        hf = [r for r in rows if r["impl"] == "transformers"]
        if ours and hf:
            best = max(ours, key=lambda r: r["tokens_per_s"])
            mfu = "" if best.get("mfu") is None else f", MFU {100 * best['mfu']:.1f}%"
            ratio = best["tokens_per_s"] / hf[0]["tokens_per_s"]
            lines.append(f"\n{preset}: `selective` ({best['attention']}) runs at {ratio:.2f}x "
                         f"the tokens/s of transformers{mfu} (targets in the layer section: >= 1.3x, and >= 55% MFU "
                         f"for the ~1B model).")
    return lines


def _bench_parallel_lines(bench: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### One device: plain loop against the parallel path at TP=1 "
                 "(`benchmarks/bench_parallel.py --single`)", ""]
    if not bench:
        return lines + [f"No rows ({step['status']})."]
    args = bench["args"]
    lines += [f"`{step.get('command', '')}`: {args['model']}, {args['micro_batch']} x {args['seq']} tokens x "
              f"{args['grad_accum']} micro-batch(es), median of {args['steps']} steps; step {step['status']}.", "",
              "| path | median step s | min step s | tokens/s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['path']} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['tokens_per_s']:.0f} |"
              for r in bench["results"]]
    by_path = {r["path"]: r for r in bench["results"]}
    if {"plain", "parallel_tp1"} <= set(by_path):
        ratio = by_path["parallel_tp1"]["tokens_per_s"] / by_path["plain"]["tokens_per_s"]
        lines.append(f"\nparallel_tp1 / plain tokens/s: {ratio:.3f}.")
    return lines


def _bench_documents_lines(bench: Optional[dict], step: dict) -> list[str]:
    lines = ["", "### Attention over packed documents: document masks against causal, per kernel "
                 "(`benchmarks/bench_documents.py`)", ""]
    if not bench:
        return lines + [f"No rows ({step['status']})."]
    args, skipped = bench["args"], bench["environment"]["skipped"]
    lines += [f"`{step.get('command', '')}`: {args['heads']} heads ({args['kv_heads']} key/value) of "
              f"{args['head_dim']}, {args['dtype']}, forward + backward, median of {args['iters']} steps after "
              f"{args['warmup']} warm-up; `packed`: log-normal document lengths of mean {args['doc_mean']:g} (sigma "
              f"{args['doc_sigma']:g}, seed {args['seed']}), `one_per_row`: the document path with one document per "
              f"row; `visible`: the visible query-key pairs over causal's; step {step['status']}."]
    if skipped:
        lines.append("Not run: " + "; ".join(f"{kernel} ({why})" for kernel, why in skipped.items()) + ".")
    lines += ["", "| kernel | mask | batch x seq | documents | mean length | visible | ms fwd+bwd | x causal | "
                  "tokens/s |", "| --- | --- | --- " + "| ---: " * 6 + "|"]
    for r in bench["rows"]:
        head = f"| {r['kernel']} | {r['mask']} | {r['batch']}x{r['seq']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        lines.append(f"{head} {r['documents']} | {r['mean_doc_len']:.0f} | {r['visible_fraction']:.3f} | "
                     f"{r['ms']:.2f} | {r['ratio_to_causal']:.2f} | {r['tokens_per_s']:.0f} |")
    for seq in dict.fromkeys(r["seq"] for r in bench["rows"]):
        rows = [r for r in bench["rows"] if r["seq"] == seq and "error" not in r]
        causal = [r for r in rows if r["mask"] == "causal"]
        packed = [r for r in rows if r["mask"] == "packed"]
        if causal and packed:
            fast_causal, fast_packed = (min(group, key=lambda r: r["ms"]) for group in (causal, packed))
            lines.append(f"\nseq {seq}: packed documents fastest with `{fast_packed['kernel']}`, "
                         f"{fast_packed['ms']:.2f} ms: {fast_packed['ms'] / fast_causal['ms']:.2f}x the time of the "
                         f"fastest causal kernel (`{fast_causal['kernel']}`, {fast_causal['ms']:.2f} ms).")
    return lines
