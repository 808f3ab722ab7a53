"""Pipelines over shards: reader -> steps -> writer, as picklable tasks an executor can run anywhere.

A source (one entry of the recipe's ``sources``) is read shard by shard. Its steps run in recipe
order. A step that must see every shard of its source (a ``GlobalStep``: paragraph_dedup,
exact_dedup, books_near_dedup) first has its hash pass (``HashTask``, one per shard, over the reader
and the steps before it) and its merge pass (``MergeTask``); ``CleanTask`` then runs the whole chain.
Several global steps of one source run in rounds, one step per round (``dedup_rounds``), so the hash
pass of each sees the documents after the filters of those before it; see ``global_step.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from .document import Document
from .global_step import GlobalStep
from .readers import InputShard, Reader, make_reader
from .stats import OutputStats
from .step import Step
from .steps import get_step_class
from .writers import ShardWriter


@dataclass(frozen=True)
class StepSpec:
    """One configured step: ``key`` (its name in the recipe and the report), registry ``step``, kwargs."""

    key: str
    step: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Step:
        return get_step_class(self.step)(**self.kwargs)


@dataclass(frozen=True)
class SourceSpec:
    """A recipe source: how to read it and which steps to run."""

    name: str
    format: str
    paths: tuple[str, ...]
    reader_kwargs: dict[str, Any] = field(default_factory=dict)
    num_shards: int | None = None
    steps: tuple[StepSpec, ...] = ()

    def make_reader(self):
        return make_reader(self.format, self.name, **self.reader_kwargs)

    def shards(self) -> list[InputShard]:
        return self.make_reader().list_shards(list(self.paths), self.num_shards)

    def global_steps(self) -> list[int]:
        """Positions of the steps that need passes over every shard (``GlobalStep`` subclasses)."""
        return [i for i, spec in enumerate(self.steps) if issubclass(get_step_class(spec.step), GlobalStep)]


@dataclass(frozen=True)
class ShardContext:
    """What a step may need to know about where it runs (given to ``step.setup(ctx)``)."""

    source: str
    shard_index: int
    num_shards: int
    work_dir: Path
    seed: int = 0
    step_key: str = ""

    @property
    def step_dir(self) -> Path:
        """The work folder of the step being set up: ``work/<source>/<step key>``."""
        return Path(self.work_dir) / self.step_key


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def chain_steps(specs: Iterable[StepSpec], ctx: ShardContext,
                docs: Iterator[Document]) -> tuple[Iterator[Document], dict[str, Step]]:
    """Build, set up and chain the steps; returns (documents out, {key: step})."""
    steps: dict[str, Step] = {}
    for spec in specs:
        step = spec.build()
        if hasattr(step, "setup"):
            step.setup(replace(ctx, step_key=spec.key))
        steps[spec.key] = step
        docs = step(docs)
    return docs, steps


@dataclass
class ShardTask:
    """What the tasks reading one input shard of a source share: the shard, where to write, the seed."""

    source: SourceSpec
    shard: InputShard
    index: int
    num_shards: int
    stage_dir: Path
    work_root: Path
    seed: int = 0

    @property
    def context(self) -> ShardContext:
        return ShardContext(self.source.name, self.index, self.num_shards,
                            Path(self.work_root) / self.source.name, self.seed)

    def counters(self, reader: Reader, steps: dict[str, Step]) -> dict[str, Any]:
        """The counters of the reader and of every step, for the task's marker."""
        return {"source": self.source.name, "shard": self.shard.describe(), "reader": dict(reader.stats),
                "steps": {key: dict(step.stats) for key, step in steps.items()}}


@dataclass
class CleanTask(ShardTask):
    """Reader -> every step -> jsonl.zst files under ``<stage_dir>/<source>/[<group>/]``."""

    @property
    def name(self) -> str:
        return f"clean/{self.source.name}/{shard_name(self.index)}"

    @property
    def marker(self) -> Path:
        return Path(self.stage_dir) / ".markers" / self.source.name / f"{shard_name(self.index)}.json"

    def run(self) -> dict[str, Any]:
        reader = self.source.make_reader()
        out = OutputStats()
        with ShardWriter(self.stage_dir, self.source.name, shard_name(self.index)) as writer:
            writer.remove_stale()
            docs, steps = chain_steps(self.source.steps, self.context, reader.read(self.shard))
            for doc in docs:
                writer.write(doc)
                out.add(doc.metadata, len(doc.text))
            groups = writer.close()
        return {**self.counters(reader, steps), "output": {**out.to_json(), "groups": groups}}


@dataclass
class HashTask(ShardTask):
    """Pass 1 of the global step at ``step_index``: reader -> the steps before it -> its ``scan``."""

    step_index: int = 0

    @property
    def spec(self) -> StepSpec:
        return self.source.steps[self.step_index]

    @property
    def name(self) -> str:
        return f"dedup-hash/{self.source.name}/{self.spec.key}/{shard_name(self.index)}"

    @property
    def marker(self) -> Path:
        return (Path(self.stage_dir) / ".markers" / "hash" / self.source.name / self.spec.key
                / f"{shard_name(self.index)}.json")

    def run(self) -> dict[str, Any]:
        reader = self.source.make_reader()
        docs, steps = chain_steps(self.source.steps[: self.step_index], self.context, reader.read(self.shard))
        step = self.spec.build()
        hashed = step.scan(docs, replace(self.context, step_key=self.spec.key).step_dir, self.index)
        return {**self.counters(reader, steps), "source": f"{self.source.name}/{self.spec.key}", "hash": hashed}


@dataclass
class MergeTask:
    """Pass 2, task ``unit`` (a hash partition, or the only one), of one global step of one source."""

    source: str
    spec: StepSpec
    unit: int
    num_shards: int
    stage_dir: Path
    work_root: Path

    @property
    def name(self) -> str:
        return f"dedup-merge/{self.source}/{self.spec.key}/part_{self.unit:04d}"

    @property
    def marker(self) -> Path:
        return Path(self.stage_dir) / ".markers" / "merge" / self.source / self.spec.key / f"part_{self.unit:04d}.json"

    def run(self) -> dict[str, Any]:
        step_dir = Path(self.work_root) / self.source / self.spec.key
        merged = self.spec.build().merge(step_dir, self.unit, self.num_shards)
        return {"source": f"{self.source}/{self.spec.key}", "merge": merged}


def clean_tasks(sources: Iterable[SourceSpec], stage_dir: Path, work_root: Path, seed: int) -> list[CleanTask]:
    tasks = []
    for src in sources:
        shards = src.shards()
        tasks += [CleanTask(src, sh, i, len(shards), stage_dir, work_root, seed) for i, sh in enumerate(shards)]
    return tasks


def dedup_rounds(sources: Iterable[SourceSpec], work_root: Path,
                 seed: int) -> list[tuple[list[HashTask], list[MergeTask]]]:
    """The hash and merge tasks of every global step, in rounds: round r holds the r-th global step
    of each source that has one; its hash tasks need the merges of the rounds before."""
    rounds: list[tuple[list[HashTask], list[MergeTask]]] = []
    for src in sources:
        positions = src.global_steps()
        shards = src.shards() if positions else []
        for r, k in enumerate(positions):
            if r == len(rounds):
                rounds.append(([], []))
            hashes, merges = rounds[r]
            spec = src.steps[k]
            hashes += [HashTask(src, sh, i, len(shards), work_root, work_root, seed, step_index=k)
                       for i, sh in enumerate(shards)]
            merges += [MergeTask(src.name, spec, u, len(shards), work_root, work_root)
                       for u in range(spec.build().merge_units())]
    return rounds


def run_dedup_passes(executor, sources: Iterable[SourceSpec], work_root: Path, seed: int) -> list[dict[str, Any]]:
    """Run every round's hash tasks, then its merge tasks; returns every task's stats."""
    stats: list[dict[str, Any]] = []
    for r, (hashes, merges) in enumerate(dedup_rounds(sources, work_root, seed), start=1):
        stats += executor.run(f"dedup-hash-{r}", hashes)
        stats += executor.run(f"dedup-merge-{r}", merges)
    return stats
