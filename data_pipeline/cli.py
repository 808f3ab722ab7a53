"""``llama-data``: run a data-prep recipe (configs/prep/*.yaml), whole or stage by stage.

    llama-data run demo                          # every stage, resumable
    llama-data clean demo workers=2 executor=slurm slurm.partition=cpu
    llama-data tokenize configs/prep/demo.yaml tokenizer.vocab_size=8000
    llama-data report demo

Every recipe key can be overridden as ``key=value`` (dotted for nested keys). A bad recipe or
override stops the command with one line naming the key or file, before any worker starts.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .stats import summary
from .tools import COMMANDS

STAGE_HELP = {
    "run": "every stage in order: dedup, clean, train-tokenizer, tokenize, manifest",
    "dedup": "hash and merge passes of the dedup steps across all shards (paragraph, exact, books near-dedup)",
    "clean": "reader -> steps -> clean jsonl.zst shards (runs the dedup passes first when needed)",
    "train-tokenizer": "train the SentencePiece BPE tokenizer on a sample of the clean shards",
    "tokenize": "encode the clean shards into indexed token shards, then write the mixture manifest",
    "manifest": "write tokens/mixture.json (and valid.json) from the tokenized shards",
    "report": "rebuild and print every stage's stats.json from the completion markers",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="recipe file, or a name in configs/prep/ (demo -> configs/prep/demo.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. workers=4")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(tool=mod)
    return parser


def _print_report(report: dict) -> None:
    if report.get("sources"):
        for line in summary(report):
            print(line)
    else:
        extra = {k: v for k, v in report.items() if k not in ("stage", "sources")}
        print(f"[{report['stage']}] " + ", ".join(f"{k}={v}" for k, v in extra.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "tool"):
        return int(args.tool.run(args) or 0)

    from .recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"llama-data: error: {exc}", file=sys.stderr)
        return 2

    from . import stages

    if args.command == "report":
        reports = stages.report(recipe)
        if not reports:
            print(f"llama-data: nothing to report under {recipe.output_dir}", file=sys.stderr)
            return 1
        for rep in reports:
            _print_report(rep)
        return 0
    names = stages.STAGES if args.command == "run" else (args.command,)
    if args.command == "tokenize":
        names = ("tokenize", "manifest")
    executor = recipe.make_executor()
    for name in names:
        try:
            _print_report(stages.RUNNERS[name](recipe, executor))
        except FileNotFoundError as exc:
            print(f"llama-data: error: {exc}", file=sys.stderr)
            return 2
    return 0

