"""Stage statistics: what each shard counted, merged into one report (stats.json + PNGs).

A shard's stats (kept in its completion marker) hold the reader's counters, each step's counters
(``kept``, ``dropped/<reason>``, ...), documents per output group, languages, buckets and a
perplexity histogram per language on fixed log10 bins, so shards merge by adding.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .task import output_file, output_path

#: Perplexity histogram bins: log10(perplexity) in [0, 6) in steps of 0.05 (plus overflow in the last).
PPL_LOG10_MAX = 6.0
PPL_BINS = 120


def ppl_bin(perplexity: float) -> int:
    if not perplexity > 0 or math.isinf(perplexity):
        return PPL_BINS - 1
    return min(PPL_BINS - 1, max(0, int(math.log10(perplexity) / PPL_LOG10_MAX * PPL_BINS)))


class OutputStats:
    """Counts over the documents a shard writes: groups, languages, buckets, perplexity histogram."""

    def __init__(self) -> None:
        self.languages: Counter[str] = Counter()
        self.buckets: Counter[str] = Counter()
        self.ppl: dict[str, list[int]] = {}
        self.documents = 0
        self.chars = 0

    def add(self, metadata: dict[str, Any], n_chars: int) -> None:
        self.documents += 1
        self.chars += n_chars
        lang = metadata.get("language")
        if lang is not None:
            self.languages[str(lang)] += 1
        if metadata.get("bucket") is not None:
            self.buckets[str(metadata["bucket"])] += 1
        ppl = metadata.get("perplexity")
        if ppl is not None:
            hist = self.ppl.setdefault(str(lang), [0] * PPL_BINS)
            hist[ppl_bin(float(ppl))] += 1

    def to_json(self) -> dict[str, Any]:
        return {"documents": self.documents, "chars": self.chars, "languages": dict(self.languages),
                "buckets": dict(self.buckets), "perplexity_hist": self.ppl}


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Recursive sum of nested dicts of numbers and equal-length lists."""
    for key, value in other.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            cur = into.setdefault(key, [0] * len(value))
            into[key] = [a + b for a, b in zip(cur, value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value


def merge(shard_stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum of shard stats, grouped by source (the ``source`` field of each shard's stats)."""
    by_source: dict[str, dict[str, Any]] = {}
    shards: Counter[str] = Counter()
    for stats in shard_stats:
        source = stats.get("source", "")
        shards[source] += 1
        _add(by_source.setdefault(source, {}), {k: v for k, v in stats.items() if k not in ("source", "shard")})
    for source, stats in by_source.items():
        stats["tasks"] = shards[source]
    return dict(sorted(by_source.items()))


def _plot_perplexity(hists: dict[str, list[int]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = PPL_LOG10_MAX / PPL_BINS
    centers = [10 ** ((i + 0.5) * width) for i in range(PPL_BINS)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for lang, counts in sorted(hists.items(), key=lambda kv: -sum(kv[1]))[:8]:
        ax.step(centers, counts, where="mid", label=f"{lang} ({sum(counts)})")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (KenLM 5-gram, per document)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with output_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_report(stage_dir: Path, stage: str, shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Writes ``stats.json`` (and one perplexity PNG per source that has perplexities) in ``stage_dir``."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    report = {"stage": stage, "sources": merge(shard_stats)}
    for source, stats in report["sources"].items():
        hists = stats.get("output", {}).get("perplexity_hist")
        if hists:
            png = stage_dir / f"perplexity_{source or 'all'}.png"
            _plot_perplexity(hists, f"{stage}: {source}", png)
            stats["perplexity_png"] = png.name
    with output_file(stage_dir / "stats.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def summary(report: dict[str, Any]) -> list[str]:
    """A few lines per source for the terminal: documents in/out, drops by reason, top languages."""
    lines = [f"[{report['stage']}]"]
    for source, stats in report["sources"].items():
        reader = stats.get("reader", {})
        out = stats.get("output", {})
        head = f"  {source or '-'}: {stats.get('tasks', 0)} tasks"
        if reader:
            head += f", read {reader.get('read', 0)}"
        if out:
            head += f", kept {out.get('documents', 0)}"
        lines.append(head)
        drops = {f"reader:{k[4:]}": v for k, v in reader.items() if k.startswith("bad/")}
        for step, counters in stats.get("steps", {}).items():
            drops.update({f"{step}:{k[8:]}": v for k, v in counters.items() if k.startswith("dropped/")})
        if drops:
            lines.append("    dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
        langs = out.get("languages", {})
        if langs:
            top = sorted(langs.items(), key=lambda kv: -kv[1])[:6]
            lines.append("    languages: " + ", ".join(f"{k}={v}" for k, v in top))
        for key, value in sorted(stats.items()):
            if key not in ("reader", "steps", "output") and isinstance(value, dict):
                nums = {k: v for k, v in value.items() if isinstance(v, (int, float))}
                lines.append(f"    {key}: " + ", ".join(f"{k}={v}" for k, v in sorted(nums.items())))
    return lines
