"""Paragraph dedup across shards against a brute-force count of every line hash in the corpus."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import hash_dedup as hd
from data_pipeline.ccnet_normalization import normalize_for_dedup
from data_pipeline.executor import LocalExecutor
from data_pipeline.pipeline import SourceSpec, StepSpec, clean_tasks, dedup_rounds
from data_pipeline.steps import paragraph_dedup as pd
from data_pipeline.steps.normalize import Normalize
from data_pipeline.task import TaskError
from data_pipeline.tokenize_stage import iter_clean_records as iter_clean_texts
from realtext import english_texts, write_jsonl_shards


def test_normalize_for_dedup_follows_ccnet():
    assert normalize_for_dedup("  Hello,   World 2024!  ") == "hello, world 0000!"  # ASCII punct kept
    assert normalize_for_dedup("«Ｈｉ» — ４２％…") == "ｈｉ 00"  # CCNet's unicode punct removed
    assert normalize_for_dedup("a\tb\x07c\x9f") == "abc"  # non-printing characters removed
    assert normalize_for_dedup("Ünïcödé 3.14") == "ünïcödé 0.00"  # accents kept, digits zeroed
    assert normalize_for_dedup("   ") == "" and normalize_for_dedup("") == ""


def test_line_hash_is_first_8_bytes_of_sha1_little_endian():
    text = "First line\nSecond line 12\n\nsecond LINE 99"
    hashes = pd.line_hashes(text)
    expected = [int.from_bytes(hashlib.sha1(normalize_for_dedup(l).encode()).digest()[:8], "little")
                for l in text.split("\n")]
    assert hashes.dtype == np.dtype("<u8") and hashes.tolist() == expected
    assert hashes[1] == hashes[3]  # same line after normalisation


def test_partitions_cover_the_hash_space_by_top_bits():
    h = np.array([0, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    assert hd.partition_of(h, 1).tolist() == [0, 0, 0, 0]
    assert hd.partition_of(h, 2).tolist() == [0, 0, 1, 1]
    assert hd.partition_of(h, 3).tolist() == [0, 1, 1, 2]


def _corpus(tmp_path: Path, n_shards: int) -> tuple[list[Path], list[dict]]:
    texts = english_texts(90)
    # Lines that only repeat across shards, or inside one document, plus a line seen once.
    texts[0] += "\nA sentence shared by the first and the last shard."
    texts[-1] += "\na SENTENCE shared by the first and the last shard."
    texts[1] += "\nTwice in one document 1.\nTwice in one document 2."
    texts[2] += "\nThis line appears exactly once in the corpus."
    paths = write_jsonl_shards(tmp_path / "raw", texts, n_shards)
    records = [json.loads(l) for p in paths for l in p.read_text().splitlines()]
    return paths, records


def _reference(records: list[dict], normalize: bool) -> list[tuple[str, str]]:
    """Keep a line iff its hash occurs once in the whole corpus; drop documents left empty."""
    norm = Normalize()
    docs = [(r["id"], norm.normalize(r["text"]) if normalize else r["text"]) for r in records]
    docs = [(i, t) for i, t in docs if t]

    def h(line):
        return hashlib.sha1(normalize_for_dedup(line).encode()).digest()[:8]

    counts = Counter(h(l) for _, t in docs for l in t.split("\n"))
    out = []
    for doc_id, text in docs:
        kept = [l for l in text.split("\n") if counts[h(l)] == 1]
        if kept:
            out.append((doc_id, "\n".join(kept)))
    return out


def _run(tmp_path: Path, paths, steps, partitions):
    src = SourceSpec("web", "jsonl", tuple(map(str, paths)), steps=steps)
    ex = LocalExecutor(workers=1, progress=False)
    [(hashes, merges)] = dedup_rounds([src], tmp_path / "work", 0)
    hash_stats = ex.run("hash", hashes)
    merge_stats = ex.run("merge", merges)
    clean_stats = ex.run("clean", clean_tasks([src], tmp_path / "clean", tmp_path / "work", 0))
    files = sorted((tmp_path / "clean" / "web").glob("*.jsonl.zst"))
    out = [(r["id"], r["text"]) for f in files for r in iter_clean_texts(f)]
    return src, out, hash_stats, merge_stats, clean_stats


@pytest.mark.parametrize("partitions", [1, 3, 16])
def test_dedup_across_shards_matches_brute_force(tmp_path, partitions):
    paths, records = _corpus(tmp_path, n_shards=4)
    steps = (StepSpec("paragraph_dedup", "paragraph_dedup", {"partitions": partitions}),)
    src, out, hash_stats, merge_stats, clean_stats = _run(tmp_path, paths, steps, partitions)
    expected = _reference(records, normalize=False)
    by_id = dict(out)
    assert sorted(out) == sorted(expected)
    assert "shared by the first" not in by_id.get("doc-0", "") + by_id.get(f"doc-{len(records) - 1}", "")
    assert "Twice in one document" not in by_id.get("doc-1", "")
    assert "This line appears exactly once in the corpus." in by_id["doc-2"]

    all_hashes = np.concatenate([pd.line_hashes(r["text"]) for r in records])
    values, counts = np.unique(all_hashes, return_counts=True)
    assert sum(s["merge"]["distinct_hashes"] for s in merge_stats) == values.size
    assert sum(s["merge"]["duplicate_hashes"] for s in merge_stats) == int((counts > 1).sum())
    for p in range(partitions):  # each partition file holds only its own hash range, sorted
        dups = np.load(hd.dups_path(tmp_path / "work" / "web" / "paragraph_dedup", p))
        assert np.all(hd.partition_of(dups, partitions) == p) and np.all(np.diff(dups.astype(np.float64)) >= 0)
    removed = sum(s["steps"]["paragraph_dedup"].get("lines_removed", 0) for s in clean_stats)
    assert removed == int(counts[counts > 1].sum())
    dropped = sum(s["steps"]["paragraph_dedup"].get("dropped/all_lines_duplicated", 0) for s in clean_stats)
    assert dropped == len(records) - len(expected) > 0
    assert sum(s["hash"]["hashes"] for s in hash_stats) == all_hashes.size


def test_hash_pass_sees_the_steps_before_dedup(tmp_path):
    paths, records = _corpus(tmp_path, n_shards=3)
    steps = (StepSpec("normalize", "normalize"), StepSpec("paragraph_dedup", "paragraph_dedup", {"partitions": 4}))
    _, out, *_ = _run(tmp_path, paths, steps, 4)
    assert sorted(out) == sorted(_reference(records, normalize=True))


def test_changed_input_after_hash_pass_is_an_error(tmp_path):
    paths, records = _corpus(tmp_path, n_shards=2)
    src = SourceSpec("web", "jsonl", tuple(map(str, paths)),
                     steps=(StepSpec("paragraph_dedup", "paragraph_dedup", {"partitions": 2}),))
    ex = LocalExecutor(workers=1, progress=False)
    [(hashes, merges)] = dedup_rounds([src], tmp_path / "work", 0)
    ex.run("hash", hashes)
    ex.run("merge", merges)
    with open(paths[1], "a") as f:
        f.write(json.dumps({"id": "late", "text": "a document added after the hash pass"}) + "\n")
    with pytest.raises(TaskError, match="clean/web/shard_00001: RuntimeError: paragraph_dedup: the documents differ"):
        ex.run("clean", clean_tasks([src], tmp_path / "clean", tmp_path / "work", 0))
