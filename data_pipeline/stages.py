"""The stages of a recipe, in the order ``llama-data run`` takes them; each is resumable.

dedup (hash + merge passes of the steps that compare every shard: paragraph, exact and
near-duplicate dedup) -> clean (reader -> steps -> jsonl.zst per source and
language/bucket) -> train-tokenizer -> tokenize (indexed token shards) -> manifest (mixture.json).
Every stage writes stats.json in its folder and returns its report for the CLI to summarise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest_stage import write_manifests
from .pipeline import clean_tasks, run_dedup_passes
from .recipe import Recipe
from .stats import write_report
from .task import read_marker
from .tokenize_stage import TOKENIZER_NAME, encode_tasks, train_tokenizer

STAGES = ("dedup", "clean", "train-tokenizer", "tokenize", "manifest")


def source_names(recipe: Recipe) -> list[str]:
    return [s.name for s in recipe.sources]


def run_dedup(recipe: Recipe, executor) -> dict[str, Any]:
    stats = run_dedup_passes(executor, recipe.sources, recipe.work_dir, recipe.seed)
    if not stats:
        return {"stage": "dedup", "sources": {}, "skipped": "no source has a dedup step"}
    return write_report(recipe.work_dir, "dedup", stats)


def run_clean(recipe: Recipe, executor) -> dict[str, Any]:
    run_dedup(recipe, executor)  # a no-op when its markers are all there
    tasks = clean_tasks(recipe.sources, recipe.clean_dir, recipe.work_dir, recipe.seed)
    return write_report(recipe.clean_dir, "clean", executor.run("clean", tasks))


def tokenizer_model(recipe: Recipe) -> Path:
    return Path(recipe.tokenizer["model"] or recipe.tokenizer_dir / f"{TOKENIZER_NAME}.model")


def run_train_tokenizer(recipe: Recipe, executor=None) -> dict[str, Any]:
    if recipe.tokenizer["model"]:
        return {"stage": "train-tokenizer", "sources": {}, "model": recipe.tokenizer["model"], "trained": False}
    path = train_tokenizer(recipe.clean_dir, source_names(recipe), recipe.tokenizer_dir, recipe.tokenizer, recipe.seed)
    return {"stage": "train-tokenizer", "sources": {}, "model": str(path)}


def run_tokenize(recipe: Recipe, executor) -> dict[str, Any]:
    model = tokenizer_model(recipe)
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no tokenizer; run `llama-data train-tokenizer` first")
    tasks = encode_tasks(recipe.clean_dir, source_names(recipe), recipe.tokens_dir, model, recipe.tokenize)
    if not tasks:
        raise FileNotFoundError(f"{recipe.clean_dir}: no clean shards to tokenize; run the clean stage")
    return write_report(recipe.tokens_dir, "tokenize", executor.run("tokenize", tasks))


def run_manifest(recipe: Recipe, executor=None) -> dict[str, Any]:
    model = tokenizer_model(recipe)
    tasks = encode_tasks(recipe.clean_dir, source_names(recipe), recipe.tokens_dir, model, recipe.tokenize)
    missing = [t.name for t in tasks if not t.marker.exists()]
    if missing or not tasks:
        raise FileNotFoundError(f"{recipe.tokens_dir}: tokenization incomplete ({len(missing)} shard(s) "
                                f"missing, e.g. {missing[:1]}); run `llama-data tokenize` first")
    written = write_manifests([read_marker(t.marker) for t in tasks], recipe.tokens_dir, model,
                              recipe.mixture, source_names(recipe))
    return {"stage": "manifest", "sources": {}, **{k: str(v) for k, v in written.items()}}


RUNNERS = {"dedup": run_dedup, "clean": run_clean, "train-tokenizer": run_train_tokenizer,
           "tokenize": run_tokenize, "manifest": run_manifest}


def report(recipe: Recipe) -> list[dict[str, Any]]:
    """Rebuild every stage's stats.json from the markers present (no task is run)."""
    reports = []
    for stage, folder in (("dedup", recipe.work_dir), ("clean", recipe.clean_dir), ("tokenize", recipe.tokens_dir)):
        markers = sorted((folder / ".markers").rglob("*.json")) if (folder / ".markers").is_dir() else []
        if markers:
            reports.append(write_report(folder, stage, [read_marker(m) for m in markers]))
    return reports
