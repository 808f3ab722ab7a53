"""Dedup across every shard of a source: exact document dedup, GitHub's exact file dedup and the Books
near-dedup, against brute-force references over the source's global order (shard, then position)."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import hash_dedup as hd
from data_pipeline.cli import main
from data_pipeline.document import Document
from data_pipeline.executor import LocalExecutor
from data_pipeline.pipeline import SourceSpec, StepSpec, clean_tasks, dedup_rounds, run_dedup_passes
from data_pipeline.recipe import load_recipe
from data_pipeline.steps.books import (BooksNearDedup, band_layout, estimated_jaccard, find_near_duplicates,
                                       near_duplicates_path, shingles, signatures_path)
from data_pipeline.steps.exact_dedup import ExactDedup, normalize_for_exact_dedup, text_hash
from data_pipeline.steps.github import GithubFilter
from data_pipeline.steps.normalize import Normalize
from data_pipeline.steps.paragraph_dedup import line_hashes
from data_pipeline.task import TaskError
from data_pipeline.tokenize_stage import iter_clean_records as iter_clean_texts
from realtext import english_texts

LICENSES = Path("/usr/share/common-licenses")


def _write(folder: Path, shards: list[list[tuple[str, str]]], **meta) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, docs in enumerate(shards):
        paths.append(folder / f"part{s:02d}.jsonl")
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": i, "text": t, **meta}, ensure_ascii=False) + "\n" for i, t in docs)
    return paths


def _run(root: Path, paths: list[Path], steps: tuple[StepSpec, ...], workers: int = 1):
    """Every dedup round, then the clean stage; returns (ids kept per shard, texts by id, stats)."""
    src = SourceSpec("src", "jsonl", tuple(map(str, paths)), steps=steps)
    ex = LocalExecutor(workers=workers, progress=False)
    dedup_stats = run_dedup_passes(ex, [src], root / "work", 0)
    clean_stats = ex.run("clean", clean_tasks([src], root / "clean", root / "work", 0))
    kept, texts = [], {}
    for s in range(len(paths)):
        path = root / "clean" / "src" / f"shard_{s:05d}.jsonl.zst"
        records = list(iter_clean_texts(path)) if path.exists() else []
        kept.append([r["id"] for r in records])
        texts.update((r["id"], r["text"]) for r in records)
    return kept, texts, dedup_stats, clean_stats


def _first_occurrences(shards, key) -> list[list[str]]:
    """Brute force: keep a document iff no document before it in global order has the same key."""
    seen, out = set(), []
    for docs in shards:
        out.append([])
        for doc_id, text in docs:
            if key(text) not in seen:
                seen.add(key(text))
                out[-1].append(doc_id)
    return out


# --- exact document dedup ------------------------------------------------------------------------

def _exact_corpus() -> list[list[tuple[str, str]]]:
    texts = english_texts(60)  # real texts; copyright files shared by packages are natural duplicates
    shards = [[(f"s{s}-{i}", t) for i, t in enumerate(texts[s::4])] for s in range(4)]
    shards[0].append(("late-copy-in-shard-0", shards[2][0][1]))  # shard 0 comes first, even at the end
    shards[1].insert(3, ("repeat-in-shard-1", shards[1][1][1]))
    shards[3].insert(0, ("copy-in-shard-3", shards[1][1][1]))
    variant = "\n ".join("".join(c.upper() if c.isascii() else c for c in shards[0][2][1]).split())
    shards[3].append(("variant", "  " + variant + "\n"))  # a duplicate only after normalisation
    return shards


@pytest.mark.parametrize("normalize, partitions", [(True, 1), (False, 5)])
def test_exact_dedup_keeps_the_first_in_global_order(tmp_path, normalize, partitions):
    shards = _exact_corpus()
    paths = _write(tmp_path / "raw", shards)
    steps = (StepSpec("exact_dedup", "exact_dedup", {"normalize": normalize, "partitions": partitions}),)
    kept, _, dedup_stats, clean_stats = _run(tmp_path, paths, steps)

    def key(text):
        return normalize_for_exact_dedup(text) if normalize else text

    expected = _first_occurrences(shards, key)
    assert kept == expected
    flat = {i for ids in kept for i in ids}
    assert "late-copy-in-shard-0" in flat and shards[2][0][0] not in flat
    assert shards[1][1][0] in flat and not {"repeat-in-shard-1", "copy-in-shard-3"} & flat
    assert ("variant" in flat) != normalize
    n_docs = sum(map(len, shards))
    dropped = sum(s["steps"]["exact_dedup"].get("dropped/duplicate", 0) for s in clean_stats)
    assert dropped == n_docs - len(flat) >= 4

    counts = Counter(text_hash(key(t)) for docs in shards for _, t in docs)
    merges = [s["merge"] for s in dedup_stats if "merge" in s]
    assert len(merges) == partitions and {s["source"] for s in dedup_stats} == {"src/exact_dedup"}
    assert sum(m["distinct_hashes"] for m in merges) == len(counts)
    assert sum(m["duplicate_hashes"] for m in merges) == sum(c > 1 for c in counts.values())
    lowest_shard = {}
    for s in reversed(range(len(shards))):
        lowest_shard.update((text_hash(key(t)), s) for _, t in shards[s])
    step_dir = tmp_path / "work" / "src" / "exact_dedup"
    for p in range(partitions):  # each duplicate with the first shard that has it, in its partition
        dups, first = np.load(hd.dups_path(step_dir, p)), np.load(hd.first_path(step_dir, p))
        assert np.all(hd.partition_of(dups, partitions) == p) and np.all(dups[1:] > dups[:-1])
        assert first.tolist() == [lowest_shard[int(h)] for h in dups]


def test_rounds_hash_each_dedup_after_the_filters_before_it(tmp_path):
    """exact_dedup then paragraph_dedup: the line hashes are taken after exact dedup dropped a copy,
    so the lines of the copy that stays are not counted twice."""
    texts = english_texts(40)
    shards = [[(f"s{s}-{i}", t) for i, t in enumerate(texts[s::3])] for s in range(3)]
    shards[2].append(("copy", shards[0][1][1]))
    paths = _write(tmp_path / "raw", shards)
    steps = (StepSpec("normalize", "normalize"), StepSpec("exact_dedup", "exact_dedup", {"partitions": 2}),
             StepSpec("paragraph_dedup", "paragraph_dedup", {"partitions": 3}))
    kept, texts_out, dedup_stats, _ = _run(tmp_path, paths, steps, workers=2)

    norm = Normalize()
    normalized = [[(i, norm.normalize(t)) for i, t in docs] for docs in shards]
    survivors = {i for ids in _first_occurrences(normalized, normalize_for_exact_dedup) for i in ids}
    docs = [(i, t) for d in normalized for i, t in d if i in survivors]
    line_counts = Counter(h for _, t in docs for h in line_hashes(t).tolist())
    expected = {}
    for doc_id, text in docs:
        lines = [l for l, h in zip(text.split("\n"), line_hashes(text).tolist()) if line_counts[h] == 1]
        if lines:
            expected[doc_id] = "\n".join(lines)
    assert texts_out == expected
    assert "copy" not in texts_out and texts_out[shards[0][1][0]]  # the original keeps its own lines
    assert {s["source"] for s in dedup_stats} == {"src/exact_dedup", "src/paragraph_dedup"}
    rounds = dedup_rounds([SourceSpec("src", "jsonl", tuple(map(str, paths)), steps=steps)], tmp_path / "w", 0)
    assert [(len(h), len(m)) for h, m in rounds] == [(3, 2), (3, 3)]
    assert [h[0].name for h, _ in rounds] == ["dedup-hash/src/exact_dedup/shard_00000",
                                              "dedup-hash/src/paragraph_dedup/shard_00000"]


# --- GitHub: the rules, then exact file dedup across shards, through a recipe -------------------

def test_github_exact_file_dedup_across_shards_from_a_recipe(tmp_path):
    import bisect
    import fnmatch
    import shlex
    import textwrap

    src = {m.__name__: Path(m.__file__).read_text(encoding="utf-8") for m in (bisect, fnmatch, shlex, textwrap)}
    header = "# Copyright (c) 2001 Python Software Foundation\n# Licensed under the MIT License.\n\n"
    shards = [[("bisect", src["bisect"], "mit"), ("fnmatch+header", header + src["fnmatch"], "mit"),
               ("textwrap", src["textwrap"], "bsd-3-clause")],
              [("fnmatch", src["fnmatch"], "MIT"), ("bisect-trailing-space", src["bisect"] + " ", "mit"),
               ("shlex-gpl", src["shlex"], "gpl-3.0")],
              [("textwrap-copy", src["textwrap"], "apache-2.0"), ("shlex", src["shlex"], "mit")]]
    raw = tmp_path / "raw"
    raw.mkdir()
    for s, docs in enumerate(shards):
        with open(raw / f"part{s}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": i, "content": t, "license": l}) + "\n" for i, t, l in docs)
    recipe = tmp_path / "github.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'out'}
workers: 2
progress: false
sources:
  code:
    paths: ["{raw}/*.jsonl"]
    text_key: content
    steps:
      github: {{}}
      file_dedup: {{step: exact_dedup, normalize: false, partitions: 2}}
mixture: {{weights: {{code: 1.0}}}}
""")
    assert main(["clean", str(recipe)]) == 0
    out = tmp_path / "out"
    kept = [[r["id"] for r in iter_clean_texts(p)] for p in sorted((out / "clean/code").glob("*.jsonl.zst"))]
    assert kept == [["bisect", "fnmatch+header", "textwrap"], ["bisect-trailing-space"], ["shlex"]]
    rules = GithubFilter()  # the reference: the rules one file at a time, then first copies in global order
    passed = [[(i, d.text) for i, t, l in docs
               for d in rules([Document(i, t, "code", {"license": l})])] for docs in shards]
    assert kept == _first_occurrences(passed, lambda text: text)
    clean = json.loads((out / "clean/stats.json").read_text())["sources"]["code"]["steps"]
    assert clean["github"]["dropped/license_not_allowed"] == 1
    assert clean["file_dedup"]["dropped/duplicate"] == 2 and clean["file_dedup"]["kept"] == 5
    dedup = json.loads((out / "work/stats.json").read_text())["sources"]["code/file_dedup"]
    assert dedup["hash"]["documents"] == 7 and dedup["merge"]["duplicate_hashes"] == 2 and dedup["tasks"] == 5


# --- Books near-dedup ------------------------------------------------------------------------------

def _license(name: str) -> str:
    path = LICENSES / name
    if not path.is_file():
        pytest.fail(f"{path} missing (Debian's base-files ships it)")
    return path.read_text(encoding="utf-8")


def _jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a, 5), shingles(b, 5)
    return len(sa & sb) / len(sa | sb)


def _books_corpus():
    gpl = _license("GPL-3")
    words = gpl.split()
    edited = [("CHANGED" if i % 1000 == 0 else w) for i, w in enumerate(words)]  # one word in 1000
    edited = " ".join(edited)
    preface = "Preface of this edition. " + _license("Apache-2.0")[:1000] + "\n" + gpl
    first_80 = " ".join(words[: int(len(words) * 0.8)])
    assert _jaccard(gpl, edited) > 0.98 and _jaccard(edited, preface) > 0.96
    assert 0.78 < _jaccard(edited, first_80) < 0.82 and 0.8 < _jaccard(_license("GFDL-1.2"), _license("GFDL-1.3")) < 0.86
    return [[("apache", _license("Apache-2.0")), ("gpl-edited", edited), ("gfdl-1.3", _license("GFDL-1.3"))],
            [("gpl", gpl), ("gpl-first-80", first_80), ("lgpl-2.1", _license("LGPL-2.1"))],
            [("gpl-with-preface", preface), ("gfdl-1.2", _license("GFDL-1.2")), ("lgpl-2", _license("LGPL-2"))]]


def _data_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".markers" not in p.parts and p.name != "stats.json"}


def test_books_near_duplicates_across_shards(tmp_path):
    from datasketch import MinHash

    shards = _books_corpus()
    paths = _write(tmp_path / "raw", shards)
    steps = (StepSpec("normalize", "normalize"), StepSpec("books", "books_near_dedup", {"threshold": 0.9}))
    kept, _, dedup_stats, clean_stats = _run(tmp_path / "a", paths, steps)
    # The edited GPL (shard 0) is the first of its group: the original and the prefaced copy go.
    assert kept == [["apache", "gpl-edited", "gfdl-1.3"], ["gpl-first-80", "lgpl-2.1"], ["gfdl-1.2", "lgpl-2"]]
    step_dir = tmp_path / "a/work/src/books"
    found = np.load(near_duplicates_path(step_dir))
    assert found.tolist() == [[1, 0, 0, 1], [2, 0, 0, 1]]
    sigs = [np.load(signatures_path(step_dir, s)) for s in range(3)]
    for shard, pos, k_shard, k_pos in found:
        assert estimated_jaccard(sigs[shard][pos], sigs[k_shard][k_pos]) >= 0.9
    # The stored signatures are datasketch's MinHash of each book's shingles.
    norm = Normalize()
    for (_, text), sig in zip(shards[0], sigs[0]):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(list(shingles(norm.normalize(text), 5)))
        assert sig.dtype == np.dtype("<u4") and np.array_equal(sig, m.hashvalues)
    merge = next(s["merge"] for s in dedup_stats if "merge" in s)
    assert merge["documents"] == 9 and merge["near_duplicates"] == 2
    assert merge["lsh_candidates"] - merge["candidates_below_threshold"] == 2
    assert sum(s["steps"]["books"].get("dropped/near_duplicate", 0) for s in clean_stats) == 2

    # Two workers, and a rerun after losing the merge and one clean shard: the same bytes.
    _run(tmp_path / "b", paths, steps, workers=2)
    expected = _data_files(tmp_path / "a")
    assert _data_files(tmp_path / "b") == expected
    for path in [*(tmp_path / "a/work/.markers/merge").rglob("*.json"), near_duplicates_path(step_dir),
                 tmp_path / "a/clean/.markers/src/shard_00001.json", tmp_path / "a/clean/src/shard_00001.jsonl.zst"]:
        path.unlink()
    _run(tmp_path / "a", paths, steps)
    assert _data_files(tmp_path / "a") == expected


@pytest.mark.parametrize("threshold", [0.9, 0.6])
def test_lsh_merge_equals_comparing_every_pair(threshold):
    """On real texts with many real near-duplicates (packages' copyright files), the LSH merge takes
    exactly the decisions of a greedy pass comparing every pair of signatures."""
    step = BooksNearDedup(threshold=threshold)
    texts = english_texts(120)
    sigs = [np.stack([step.signature(t) for t in texts[s::4]]) for s in range(4)]
    found, stats = find_near_duplicates(sigs, threshold, seed=1)
    flat = [(s, p) for s in range(4) for p in range(len(sigs[s]))]
    kept, expected = [], []
    for s, p in flat:
        matches = [k for k in kept if estimated_jaccard(sigs[s][p], sigs[k[0]][k[1]]) >= threshold]
        if matches:
            expected.append([s, p, *min(matches)])
        else:
            kept.append((s, p))
    assert found.tolist() == expected and stats["near_duplicates"] == len(expected) > 20
    assert stats["documents"] == 120


def test_band_layout_puts_every_pair_above_the_threshold_in_a_common_band():
    assert band_layout(0.9, 128) == (13, 9) and band_layout(1.0, 128) == (2, 64)
    for threshold in (0.5, 0.8, 0.9, 0.95, 1.0):
        for num_perm in (16, 128, 256):
            bands, rows = band_layout(threshold, num_perm)
            most_differing = max(m for m in range(num_perm + 1) if (num_perm - m) / num_perm >= threshold)
            assert bands > most_differing and bands * rows <= num_perm and rows >= 1


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("step, message", [
    ("exact_dedup", r"exact_dedup: the documents differ from the hash pass of .*shard_00001.npz "
                    r"\(document 'late' at position 2 is new\)"),
    ("books_near_dedup", r"books_near_dedup: the documents differ from the hash pass of .*shard_00001.npy "
                         r"\(3 documents now, 2 then\)"),
])
def test_input_changed_after_the_hash_pass_is_an_error(tmp_path, step, message):
    texts = english_texts(4)
    paths = _write(tmp_path / "raw", [[("a", texts[0]), ("b", texts[1])], [("c", texts[2]), ("d", texts[3])]])
    src = SourceSpec("src", "jsonl", tuple(map(str, paths)), steps=(StepSpec(step, step),))
    ex = LocalExecutor(progress=False)
    run_dedup_passes(ex, [src], tmp_path / "work", 0)
    with open(paths[1], "a") as f:
        f.write(json.dumps({"id": "late", "text": "A document added after the hash pass."}) + "\n")
    with pytest.raises(TaskError, match=message):
        ex.run("clean", clean_tasks([src], tmp_path / "clean", tmp_path / "work", 0))


def test_bad_arguments_name_the_step():
    with pytest.raises(ValueError, match="books_near_dedup.threshold must be in"):
        BooksNearDedup(threshold=0)
    with pytest.raises(ValueError, match="books_near_dedup.num_perm must be >= 2"):
        BooksNearDedup(num_perm=1)
    with pytest.raises(ValueError, match="exact_dedup.partitions=0 must be an integer >= 1"):
        ExactDedup(partitions=0)


def test_shipped_recipes_wire_the_dedup_steps():
    llama = load_recipe("llama1", check_inputs=False)
    sources = {s.name: s for s in llama.sources}
    github = sources["github"]
    assert [(s.key, s.step, s.kwargs) for s in github.steps] == [
        ("github", "github", {}), ("file_dedup", "exact_dedup", {"normalize": False, "partitions": 16})]
    assert [github.steps[i].key for i in github.global_steps()] == ["file_dedup"]
    books = sources["books"]
    assert [books.steps[i].step for i in books.global_steps()] == ["books_near_dedup"]
    assert books.steps[books.global_steps()[0]].kwargs["threshold"] == 0.9
    assert [sources["commoncrawl"].steps[i].step for i in sources["commoncrawl"].global_steps()] == ["paragraph_dedup"]
    demo = load_recipe("demo", check_inputs=False)
    assert [[s.steps[i].step for i in s.global_steps()] for s in demo.sources] == [["exact_dedup", "paragraph_dedup"]] * 2
