"""Tokenization stage: tokenizer trained on a sample of clean text, parallel encoding into indexed
shards (every document decodes back exactly, one EOS after each), the train/valid split and the
mixture manifest with LLaMA Table 1 weights."""
import json

import numpy as np
import pytest

from data_pipeline.executor import LocalExecutor
from data_pipeline.manifest_stage import PRESETS, write_manifests
from data_pipeline.pipeline import SourceSpec, StepSpec, clean_tasks
from data_pipeline.task import read_marker
from data_pipeline.tokenize_stage import clean_files, encode_tasks, in_valid_split
from data_pipeline.tokenize_stage import iter_clean_records as iter_clean_texts
from data_pipeline.tokenize_stage import sample_texts, train_tokenizer
from llama_pt.data import IndexedDataset, load_manifest
from llama_pt.tokenizer import Tokenizer
from realtext import english_texts, write_jsonl_shards

SOURCES = ("wikipedia", "books")
TOK_CFG = {"vocab_size": 420, "sample_bytes": 150_000, "input_sentence_size": 100_000, "num_threads": 1,
           "character_coverage": 0.995}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = english_texts(80)
    specs = []
    for i, name in enumerate(SOURCES):
        paths = write_jsonl_shards(root / "raw" / name, texts[i::2], 2)
        specs.append(SourceSpec(name, "jsonl", tuple(map(str, paths)), steps=(StepSpec("normalize", "normalize"),)))
    ex = LocalExecutor(workers=2, progress=False)
    ex.run("clean", clean_tasks(specs, root / "clean", root / "work", 0))
    model = train_tokenizer(root / "clean", list(SOURCES), root / "tokenizer", TOK_CFG, seed=0)
    tasks = encode_tasks(root / "clean", list(SOURCES), root / "tokens", model,
                         {"batch_size": 7, "valid_fraction": 0.2})
    ex.run("tokenize", tasks)
    return root, model, tasks


def test_sample_is_proportional_and_bounded(built):
    root, _, _ = built
    files = [f for s in SOURCES for f in clean_files(root / "clean", s)]
    docs = {f: [r["text"] for r in iter_clean_texts(f)] for f in files}
    sample = list(sample_texts(files, 60_000))
    total = sum(f.stat().st_size for f in files)
    pos = 0
    for f in files:  # each file gives its first documents, up to its share of the budget (one doc over)
        share = 60_000 * f.stat().st_size / total
        n = 0
        taken = 0
        while n < len(docs[f]) and taken < share:
            taken += len(docs[f][n].encode())
            n += 1
        assert sample[pos:pos + n] == docs[f][:n]
        pos += n
    assert pos == len(sample)


def test_every_document_round_trips_with_one_eos(built):
    root, model, tasks = built
    tok = Tokenizer(model)
    assert tok.vocab_size == 420 and tok.eos_id == 2
    n_docs = 0
    for task in tasks:
        records = list(iter_clean_texts(task.clean_file))
        stats = read_marker(task.marker)
        for split in ("train", "valid"):
            want = [r for r in records if in_valid_split(task.source, r["id"], 0.2) == (split == "valid")]
            assert stats[split]["documents"] == len(want)
            if not want:
                assert not (root / "tokens" / f"{stats[split]['prefix']}.idx").exists()
                continue
            ds = IndexedDataset(root / "tokens" / stats[split]["prefix"])
            assert ds.dtype == np.uint16 and len(ds) == len(want)
            assert int(ds.sizes.sum()) == stats[split]["tokens"]
            for i, record in enumerate(want):
                ids = ds[i]
                assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1].tolist()
                assert tok.decode(ids[:-1].tolist()) == record["text"]
            n_docs += len(want)
    assert n_docs == 80


def test_valid_split_is_a_pure_function_of_the_document():
    ids = [f"doc-{i}" for i in range(2000)]
    picked = [in_valid_split("web", i, 0.1) for i in ids]
    assert picked == [in_valid_split("web", i, 0.1) for i in ids]
    assert 150 < sum(picked) < 250
    assert not any(in_valid_split("web", i, 0.0) for i in ids)


def test_manifest_with_llama_table1_preset(built):
    root, model, tasks = built
    mixture = {"preset": "llama1", "weights": {}, "epochs": {"books": 3.0}}
    written = write_manifests([read_marker(t.marker) for t in tasks], root / "tokens", model, mixture, list(SOURCES))
    assert set(written) == {"train", "valid"}
    manifest = load_manifest(written["train"])
    assert manifest["tokenizer"] == str(model.resolve()) and manifest["eos_id"] == 2
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert list(by_name) == list(SOURCES)
    assert (by_name["wikipedia"]["weight"], by_name["wikipedia"]["epochs"]) == PRESETS["llama1"]["wikipedia"]
    assert (by_name["books"]["weight"], by_name["books"]["epochs"]) == (None, 3.0)  # epochs given: weight derived
    for name, src in by_name.items():
        sizes = [IndexedDataset(p).sizes for p in src["prefixes"]]
        assert src["tokens"] == sum(int(s.sum()) for s in sizes)
        assert src["documents"] == sum(len(s) for s in sizes)
        stats = [read_marker(t.marker)["train"] for t in tasks if t.source == name]
        assert src["tokens"] == sum(s["tokens"] for s in stats)
    raw = json.loads(written["train"].read_text())
    assert all(not p.startswith("/") for s in raw["sources"] for p in s["prefixes"])
    valid = load_manifest(written["valid"])
    assert sum(s["documents"] for s in valid["sources"]) + sum(s["documents"] for s in manifest["sources"]) == 80
