"""The wiki-reference fastText classifier trained on two real corpora: reference-style prose (the Debian
Reference, standing in for pages cited by Wikipedia) against casual text (fortune cookies, standing in
for random CommonCrawl pages). Held-out documents must be separated well above chance."""
import json

import pytest

from debian_text import debian_reference, fortunes, sample
from data_pipeline.cli import main
from data_pipeline.document import Document
from data_pipeline.steps.wiki_classifier import WikiReferenceFilter, prepare
from data_pipeline.tools.train_wiki_classifier import train_wiki_classifier


SMALL = ["--epoch", "10", "--bucket", "20000"]  # 600 training documents: an 8 MB model, not 800 MB


@pytest.fixture(scope="module")
def corpora():
    refs = sample(debian_reference("en"), 400, seed=1)
    casual = sample(fortunes("en"), 400, seed=1)
    split = 300
    return {"train": (refs[:split], casual[:split]), "test": (refs[split:], casual[split:])}


@pytest.fixture(scope="module")
def model_path(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("wiki")
    pos, neg = root / "refs.jsonl", root / "cc.txt"
    pos.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpora["train"][0]), encoding="utf-8")
    neg.write_text("".join(prepare(t) + "\n" for t in corpora["train"][1]), encoding="utf-8")
    out = root / "wiki.bin"
    assert main(["train-wiki-classifier", "--positive", str(pos), "--negative", str(neg), "--out", str(out),
                 *SMALL]) == 0
    return out


def test_separates_held_out_documents(corpora, model_path):
    refs, casual = corpora["test"]
    step = WikiReferenceFilter(str(model_path), threshold=0.5)
    docs = [Document(f"r{i}", t, "cc") for i, t in enumerate(refs)] + \
           [Document(f"c{i}", t, "cc") for i, t in enumerate(casual)]
    kept = {d.id for d in step(docs)}
    true_pos = sum(f"r{i}" in kept for i in range(len(refs)))
    false_pos = sum(f"c{i}" in kept for i in range(len(casual)))
    accuracy = (true_pos + len(casual) - false_pos) / (len(refs) + len(casual))
    assert accuracy >= 0.75, (true_pos, false_pos)  # chance: 0.5
    assert step.stats["dropped/not_wiki_like"] == len(docs) - len(kept)
    assert all(0.0 <= d.metadata["wiki_score"] <= 1.0 for d in docs)


def test_threshold_is_monotone(corpora, model_path):
    docs = [Document(str(i), t, "cc") for i, t in enumerate(corpora["test"][0] + corpora["test"][1])]
    kept = [len(list(WikiReferenceFilter(str(model_path), threshold=t)([Document(d.id, d.text, d.source) for d in docs])))
            for t in (0.0, 0.25, 0.5, 0.9, 1.0)]
    assert kept[0] == len(docs) and kept == sorted(kept, reverse=True) and kept[-1] < kept[1]


def test_training_is_reproducible(corpora, tmp_path, model_path):
    """Same data and seed, text files instead of JSONL, after predictions in this process: same bytes."""
    pos, neg = tmp_path / "p.txt", tmp_path / "n.txt"
    pos.write_text("\n".join(prepare(t) for t in corpora["train"][0]) + "\n", encoding="utf-8")
    neg.write_text("\n".join(prepare(t) for t in corpora["train"][1]) + "\n", encoding="utf-8")
    for i in range(2):
        again = train_wiki_classifier([pos], [neg], tmp_path / f"again{i}.bin", epoch=10, bucket=20_000)
        assert again.read_bytes() == model_path.read_bytes()


def test_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no wiki training documents"):
        train_wiki_classifier([empty], [empty], tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_wiki_classifier([tmp_path / "missing.txt"], [empty], tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError, match="wiki_classifier.model_path"):
        WikiReferenceFilter(str(tmp_path / "none.bin"))
