"""Mixture manifest, weight rule, blend, packing, the Table 1 preset and the `data` config checks."""
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from llama_pt.config import DataConfig
from llama_pt.data import (Blend, IndexedDatasetWriter, PackedSource, build_train_samples,
                           format_epoch_table, load_manifest, resolve_weights, valid_prefixes, write_manifest)
from llama_pt.model import ConfigError

REPO = Path(__file__).resolve().parents[1]
EOS = 2
TABLE1 = {"commoncrawl": (67.0, 1.10), "c4": (15.0, 1.06), "github": (4.5, 0.64), "wikipedia": (4.5, 2.45),
          "books": (4.5, 2.23), "arxiv": (2.5, 1.06), "stackexchange": (2.0, 1.03)}


def write_docs(prefix, docs, vocab_size=512):
    with IndexedDatasetWriter(prefix, vocab_size) as w:
        for d in docs:
            w.add_document(d)


def random_docs(rng, n, lo=1, hi=30, vocab_size=512):
    """Documents as the tokenizer stage writes them: text tokens then one EOS."""
    return [np.append(rng.integers(3, vocab_size, size=int(k)), EOS) for k in rng.integers(lo, hi, size=n)]


def make_mixture(root, spec, seed=0, **extra):
    """spec: name -> (n_docs, weight, epochs); two shards per source; returns the manifest path."""
    rng = np.random.default_rng(seed)
    sources = []
    for name, (n, weight, epochs) in spec.items():
        docs = random_docs(rng, n)
        half = len(docs) // 2
        prefixes = [root / "tokens" / name / "00000", root / "tokens" / name / "00001"]
        write_docs(prefixes[0], docs[:half])
        write_docs(prefixes[1], docs[half:])
        sources.append({"name": name, "prefixes": prefixes, "documents": len(docs),
                        "tokens": int(sum(len(d) for d in docs)), "weight": weight, "epochs": epochs})
    return write_manifest(root / "tokens" / "mixture.json", sources, root / "tok.model", 512, EOS, **extra)


def test_manifest_round_trip_uses_relative_paths(tmp_path):
    path = make_mixture(tmp_path, {"wiki": (10, 0.7, None), "books": (6, None, 2.0)})
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["vocab_size"] == 512 and raw["eos_id"] == EOS
    assert raw["tokenizer"] == "../tok.model"
    assert raw["sources"][0]["prefixes"] == ["wiki/00000", "wiki/00001"]
    assert raw["sources"][1]["weight"] is None and raw["sources"][1]["epochs"] == 2.0
    assert [p.name for p in path.parent.iterdir() if "tmp" in p.name] == []
    m = load_manifest(path)
    assert m["path"] == str(path.resolve()) and m["tokenizer"] == str((tmp_path / "tok.model").resolve())
    assert m["sources"][0]["prefixes"][1] == str((tmp_path / "tokens" / "wiki" / "00001").resolve())


def test_manifest_errors_name_file_and_field(tmp_path):
    path = make_mixture(tmp_path, {"wiki": (4, 1.0, None)})
    good = json.loads(path.read_text())
    with pytest.raises(FileNotFoundError, match=r"missing\.json: mixture manifest not found"):
        load_manifest(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path}: manifest is not valid JSON"):
        load_manifest(path)
    bad = json.loads(json.dumps(good))
    del bad["sources"][0]["tokens"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{path}: sources\[0\]\.tokens=None \(wiki\)"):
        load_manifest(path)
    bad = json.loads(json.dumps(good))
    bad["sources"][0]["weight"] = -1
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"sources\[0\]\.weight=-1 \(wiki\) must be a positive"):
        load_manifest(path)
    path.write_text(json.dumps(good))
    (tmp_path / "tokens" / "wiki" / "00001.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"sources\[0\] \(wiki\) shard file .*wiki/00001\.bin not found"):
        load_manifest(path)
    with pytest.raises(ValueError, match=r"x\.json: sources\[0\]\.name must be a non-empty string"):
        write_manifest(tmp_path / "x.json", [{"name": "", "prefixes": ["a"], "documents": 0, "tokens": 0}],
                       "t", 10, 2)


def test_weight_rule():
    srcs = [{"name": "a", "tokens": 1000, "weight": 3.0, "epochs": None},
            {"name": "b", "tokens": 4000, "weight": 1.0, "epochs": 1.5},
            {"name": "c", "tokens": 2000, "weight": None, "epochs": 2.0}]
    # explicit weights are fractions; c derives its weight from epochs * tokens and takes the rest
    with pytest.raises(ConfigError, match="data.weights: explicit weights sum to 4"):
        resolve_weights(srcs)
    # all explicit: normalised
    assert resolve_weights(srcs, weights={"c": 4.0}) == {"a": 3 / 8, "b": 1 / 8, "c": 4 / 8}
    # all from epochs (config epochs override the manifest weights): proportional to epochs * tokens
    w = resolve_weights(srcs, epochs={"a": 1.0, "b": 0.5})
    assert w == pytest.approx({"a": 1000 / 7000, "b": 2000 / 7000, "c": 4000 / 7000}, rel=1e-15)
    # mixed: a and b explicit fractions, c gets the remaining 0.4
    w = resolve_weights(srcs, weights={"a": 0.5, "b": 0.1})
    assert w == pytest.approx({"a": 0.5, "b": 0.1, "c": 0.4}, rel=1e-15)
    mixed = [dict(srcs[0], weight=0.25), dict(srcs[1], weight=None, epochs=1.0), srcs[2]]
    w = resolve_weights(mixed)  # b: 4000, c: 4000 share the remaining 0.75 equally
    assert w == pytest.approx({"a": 0.25, "b": 0.375, "c": 0.375}, rel=1e-15)
    with pytest.raises(ConfigError, match=r"^data\.weights\.wiki: unknown source \(manifest has: a, b, c\)$"):
        resolve_weights(srcs, weights={"wiki": 1.0})
    with pytest.raises(ConfigError, match=r"^data\.weights\.a=0 must be a positive number$"):
        resolve_weights(srcs, weights={"a": 0})
    with pytest.raises(ConfigError, match=r"^data\.epochs\.b=-1\.0 must be"):
        resolve_weights(srcs, epochs={"b": -1.0})
    with pytest.raises(ConfigError, match=r"^data\.weights\.c: source has neither"):
        resolve_weights([dict(srcs[2], epochs=None)])


@pytest.mark.parametrize("weights", [[67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0], [1, 1], [0.999, 0.001]])
def test_blend_is_exact_and_well_mixed(weights):
    blend = Blend(weights, block_size=4096)
    w = np.asarray(weights) / sum(weights)
    assert blend.counts.sum() == 4096 and np.all(np.abs(blend.counts - w * 4096) < 1)
    n = 3 * 4096 + 1000
    src, j = blend(np.arange(n))
    per_source = blend.samples_per_source(n)
    for s in range(len(weights)):  # each source's samples are numbered 0, 1, 2, ... in order
        assert np.array_equal(j[src == s], np.arange(per_source[s]))
    assert per_source.sum() == n
    counts = np.zeros((n, len(weights)))
    counts[np.arange(n), src] = 1
    drift = np.cumsum(counts, axis=0) - np.arange(1, n + 1)[:, None] * blend.fractions
    assert np.abs(drift).max() < 2  # every prefix holds its share of each source to within 2 samples
    assert blend(5000) == (int(src[5000]), int(j[5000]))
    with pytest.raises(ValueError, match="'1' is below 1/4096"):
        Blend([1.0, 1e-5], block_size=4096)


def test_packing_concatenates_whole_documents_into_overlapping_windows(tmp_path):
    """Tokens are unique per position, so windows can be chained back into the epoch's stream."""
    lengths = [5, 1, 9, 3, 12, 4, 7, 2, 6, 8]
    docs, nxt = [], 10
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n))
        nxt += n
    write_docs(tmp_path / "a", docs[:4], 1000)
    write_docs(tmp_path / "b", docs[4:], 1000)
    seq = 4
    src = PackedSource("s", [tmp_path / "a", tmp_path / "b"], seq, seed=7)
    total = sum(lengths)
    W = (total - 1) // seq
    assert src.windows_per_epoch == W and src.num_docs == 10 and src.num_tokens == total
    starts = {int(d[0]): i for i, d in enumerate(docs)}
    orders = []
    for epoch in range(3):
        windows = [src[epoch * W + r] for r in range(W)]
        assert all(w.dtype == np.int64 and len(w) == seq + 1 for w in windows)
        targets = np.concatenate([w[1:] for w in windows])
        assert len(set(targets.tolist())) == W * seq  # each token is a target at most once
        by_first = {int(w[0]): w for w in windows}
        firsts, lasts = set(by_first), {int(w[-1]) for w in windows}
        head = (firsts - lasts).pop()  # the chain of windows, each starting where the last ended
        stream, w = [], by_first[head]
        while True:
            stream.extend(w[:-1].tolist())
            if int(w[-1]) not in by_first:
                stream.append(int(w[-1]))
                break
            w = by_first[int(w[-1])]
        assert len(stream) == W * seq + 1
        order, pos = [], 0  # the stream is whole documents back to back, then a cut-off tail
        while pos < len(stream):
            d = starts[stream[pos]]
            piece = stream[pos:pos + lengths[d]]
            assert piece == docs[d][:len(piece)].tolist()
            order.append(d)
            pos += lengths[d]
        assert pos - len(stream) < lengths[order[-1]] and total - len(stream) <= seq
        assert len(set(order)) == len(order)
        orders.append(order)
        assert [int(w[0]) for w in windows] != sorted(int(w[0]) for w in windows)  # windows shuffled
    assert orders[0] != orders[1]  # a new document order each epoch
    again = PackedSource("s", [tmp_path / "a", tmp_path / "b"], seq, seed=7)
    assert all(np.array_equal(again[j], src[j]) for j in reversed(range(2 * W)))  # pure function of j
    other = PackedSource("s", [tmp_path / "a", tmp_path / "b"], seq, seed=8)
    assert not all(np.array_equal(other[j], src[j]) for j in range(W))
    with pytest.raises(ValueError, match=r"source 'tiny' has 3 tokens, fewer than seq_len \+ 1 = 5"):
        write_docs(tmp_path / "t", [[1, 2, 3]], 10)
        PackedSource("tiny", [tmp_path / "t"], 4, seed=0)


def test_table1_preset_builds_and_reports_epochs(tmp_path):
    preset = OmegaConf.load(REPO / "configs" / "data" / "llama1_table1.yaml")
    assert {k: (preset.weights[k], preset.epochs[k]) for k in TABLE1} == TABLE1
    assert sum(preset.weights.values()) == pytest.approx(100.0)
    manifest = make_mixture(tmp_path, {name: (12, None, None) for name in TABLE1}, seed=3)
    preset.manifest = str(manifest)
    cfg = DataConfig.from_dict(preset)
    assert cfg.seed == 1234 and cfg.num_workers == 2 and cfg.valid_manifest is None
    samples = build_train_samples(cfg, seq_len=16)
    assert samples.vocab_size == 512 and samples.eos_id == EOS
    fractions = dict(zip([s.name for s in samples.sources], samples.blend.fractions))
    for name, (w, _) in TABLE1.items():
        assert abs(fractions[name] - w / 100) < 1 / samples.blend.block_size
    rows = samples.epoch_report(train_tokens=16 * 10_000)
    assert sum(r["samples"] for r in rows) == 10_000
    for r, src in zip(rows, samples.sources):
        assert r["epochs"] == r["samples"] / src.windows_per_epoch
        assert r["requested_epochs"] == TABLE1[r["source"]][1]
    table = format_epoch_table(rows)
    assert all(name in table for name in TABLE1) and "1.10" in table
    name, j = samples.locate(123)
    assert np.array_equal(samples[123], samples.sources[[s.name for s in samples.sources].index(name)][j])


def test_data_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.manifest must name"):
        DataConfig.from_dict({"seed": 1})
    with pytest.raises(ConfigError, match=r"^data\.shuffle is not a known field"):
        DataConfig.from_dict({"manifest": "m.json", "shuffle": True})
    with pytest.raises(ConfigError, match=r"^data\.seed=-1 must be a non-negative integer"):
        DataConfig.from_dict({"manifest": "m.json", "seed": -1})
    with pytest.raises(ConfigError, match=r"^data\.weights must be a mapping"):
        DataConfig.from_dict({"manifest": "m.json", "weights": [1, 2]})
    missing = tmp_path / "nowhere" / "mixture.json"
    with pytest.raises(ConfigError, match=rf"^data\.manifest={missing}: mixture manifest not found$"):
        build_train_samples(DataConfig(manifest=str(missing)), seq_len=8)
    with pytest.raises(ConfigError, match=r"^data\.valid_manifest=.*not found$"):
        valid_prefixes(DataConfig(manifest="m.json", valid_manifest=str(missing)))
    manifest = make_mixture(tmp_path, {"wiki": (8, 1.0, None), "code": (8, 1.0, None)})
    with pytest.raises(ConfigError, match=r"^data\.weights\.github: unknown source"):
        build_train_samples(DataConfig(manifest=str(manifest), weights={"github": 1.0}), seq_len=8)
    with pytest.raises(ConfigError, match=r"^data\.weights\.wiki=-2 must be a positive number$"):
        build_train_samples(DataConfig(manifest=str(manifest), weights={"wiki": -2}), seq_len=8)
    raw = json.loads(manifest.read_text())
    raw["sources"][1]["tokens"] += 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"sources\[1\]\.tokens=\d+ \(code\) but its shards hold \d+"):
        build_train_samples(DataConfig(manifest=str(manifest)), seq_len=8)
    assert valid_prefixes(DataConfig(manifest="m.json")) is None
    prefixes = valid_prefixes(DataConfig(manifest="m.json", valid_manifest=str(manifest)))
    assert [Path(p).name for p in prefixes] == ["00000", "00001", "00000", "00001"]


def test_demo_config_is_valid():
    cfg = DataConfig.from_dict(OmegaConf.load(REPO / "configs" / "data" / "demo.yaml"))
    assert cfg.manifest.endswith("mixture.json") and cfg.weights is None and cfg.epochs is None


def test_build_index_builds_the_epochs_that_a_run_reads(tmp_path):
    manifest = make_mixture(tmp_path, {"wiki": (20, 3.0, None), "code": (6, 1.0, None)})
    index_dir = tmp_path / "index"
    cfg = DataConfig.from_dict({"manifest": str(manifest), "index_dir": str(index_dir)})
    assert cfg.index_dir == str(index_dir)
    samples = build_train_samples(cfg, seq_len=8)
    assert not index_dir.exists()  # opening the sources builds nothing
    n = 150
    by_name = {s.name: s for s in samples.sources}
    read = set()
    for g in range(n):
        name, j = samples.locate(g)
        read.add(f"{by_name[name].index_key}/epoch_{j // by_name[name].windows_per_epoch:06d}")
    assert len(read) > len(samples.sources)  # some source reads more than one epoch
    assert samples.build_index(n) == len(read)
    assert {f"{p.parent.name}/{p.name}" for p in index_dir.glob("*/epoch_??????")} == read
    assert samples.build_index(n) == 0
