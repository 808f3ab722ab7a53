"""Real SentencePiece + KenLM models trained by train_reference_lm on real text; CCNet's perplexity
formula, percentile cutoffs and head/middle/tail buckets."""
import json
import pickle
import random

import kenlm
import numpy as np
import pytest

from data_pipeline.ccnet_normalization import normalize_for_lm
from data_pipeline.cli import main
from data_pipeline.document import Document
from data_pipeline.steps.perplexity import LanguageModel, Perplexity, bucket_of, read_cutoffs
from data_pipeline.tools import train_lm as kenlm_train


def _shuffled_words(text: str, seed: int) -> str:
    """The same words in random order, line by line: the control text of a language model."""
    rng = random.Random(seed)
    lines = []
    for line in text.split("\n"):
        words = line.split()
        rng.shuffle(words)
        lines.append(" ".join(words))
    return "\n".join(lines)


def _long(docs, n, min_words=12):
    return [d for d in docs if len(d.split()) >= min_words][:n]


def test_model_files_written(lm_dir):
    names = sorted(p.name for p in lm_dir.iterdir())
    assert names == ["de.arpa.bin", "de.sp.model", "de.sp.vocab", "en.arpa.bin", "en.sp.model", "en.sp.vocab"]
    assert kenlm.Model(str(lm_dir / "en.arpa.bin")).order == 5


def test_normalization_is_ccnets():
    assert normalize_for_lm("  Élève «Zürich» 1984 — fin…\x07 ") == 'eleve "zurich" 0000  -  fin...'
    assert normalize_for_lm("   ") == ""


def test_document_perplexity_is_the_ccnet_formula(lm_dir, english_fortunes):
    model = LanguageModel(lm_dir, "en")
    doc = english_fortunes["heldout"][3] + "\n\n" + english_fortunes["heldout"][4]
    lines = [line for line in doc.split("\n") if normalize_for_lm(line)]
    # Independent count: KenLM's per-token scores, one entry per piece plus </s> for each line.
    log10, n = 0.0, 0
    for line in lines:
        pieces = model.sp.encode(normalize_for_lm(line), out_type=str)
        scores = list(model.lm.full_scores(" ".join(pieces), bos=True, eos=True))
        assert len(scores) == len(pieces) + 1
        log10 += sum(s[0] for s in scores)
        n += len(scores)
    assert model.perplexity(doc) == pytest.approx(10 ** (-log10 / n), rel=1e-6)  # KenLM's per-token scores are float32
    assert model.perplexity("\n  \n") is None


def test_in_domain_text_has_lower_perplexity_than_garbled(lm_dir, english_fortunes):
    model = LanguageModel(lm_dir, "en")
    heldout = _long(english_fortunes["heldout"], 80)
    real = np.array([model.perplexity(d) for d in heldout])
    garbled = np.array([model.perplexity(_shuffled_words(d, i)) for i, d in enumerate(heldout)])
    assert (real < garbled).mean() >= 0.9
    assert np.median(real) * 1.5 < np.median(garbled)
    de_model = LanguageModel(lm_dir, "de")  # the German model finds English text far less likely
    assert all(de_model.perplexity(d) > 2 * p for d, p in zip(heldout[:10], real[:10]))


def _sample_jsonl(path, docs, lang):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"{lang}{i}", "text": text, "metadata": {"language": lang}}) + "\n")


def test_cutoffs_and_buckets_split_at_the_percentiles(lm_dir, english_fortunes, tmp_path):
    heldout = _long(english_fortunes["heldout"], 101, min_words=6)
    assert len(heldout) == 101
    sample = tmp_path / "sample.jsonl"
    _sample_jsonl(sample, heldout, "en")
    with open(sample, "a", encoding="utf-8") as f:  # another language's document is not sampled
        f.write(json.dumps({"id": "x", "text": "Ein deutscher Satz.", "metadata": {"language": "de"}}) + "\n")
    cutoffs_dir = tmp_path / "cutoffs"
    out = cutoffs_dir / "en.cutoffs.json"
    assert main(["lm-cutoffs", "en", str(lm_dir), str(sample), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    model = LanguageModel(lm_dir, "en")
    pps = [model.perplexity(d) for d in heldout]
    assert record["documents"] == 101 and record["percentiles"] == [30, 60]
    assert record["cutoffs"] == pytest.approx(list(np.percentile(pps, [30, 60])), rel=1e-12)
    assert read_cutoffs(out) == record["cutoffs"]

    step = Perplexity(str(lm_dir), languages=["en"], cutoffs_dir=str(cutoffs_dir))
    docs = [Document(id=str(i), text=t, source="cc", metadata={"language": "en"}) for i, t in enumerate(heldout)]
    scored = list(step(docs))
    buckets = [d.metadata["bucket"] for d in scored]
    # 101 distinct values: the 30th and 60th percentiles are the 31st and 61st smallest values.
    assert (buckets.count("head"), buckets.count("middle"), buckets.count("tail")) == (30, 30, 41)
    for doc, pp in zip(scored, pps):
        assert doc.metadata["perplexity"] == round(pp, 1)
        assert doc.metadata["bucket"] == bucket_of(pp, record["cutoffs"])
    assert step.stats["bucket/en_head"] == 30 and step.stats["kept"] == 101


def test_languages_without_model_or_cutoffs(lm_dir, tmp_path):
    (tmp_path / "de.cutoffs.json").write_text(json.dumps({"cutoffs": [10.0, 20.0]}))
    step = Perplexity(str(lm_dir), cutoffs_dir=str(tmp_path), require_cutoffs=False)
    assert step.languages == ["de", "en"]
    docs = [Document("a", "Bonjour à tous, voici un texte.", "cc", {"language": "fr"}),
            Document("b", "Der Hund läuft über die Straße.", "cc", {"language": "de"}),
            Document("c", "The dog runs across the street.", "cc", {"language": "en"}),
            Document("d", "\n \n", "cc", {"language": "en"})]
    out = {d.id: d.metadata for d in step(docs)}
    assert out["a"] == {"language": "fr", "bucket": "all"} and step.stats["no_model/fr"] == 1
    assert out["b"]["bucket"] == bucket_of(LanguageModel(lm_dir, "de").perplexity(docs[1].text), [10.0, 20.0])
    assert out["c"]["bucket"] == "all" and step.stats["no_cutoffs/en"] == 1 and out["c"]["perplexity"] > 0
    assert "d" not in out and step.stats["dropped/no_scorable_line"] == 1
    clone = pickle.loads(pickle.dumps(step))  # models are reloaded where the step runs
    assert clone._models == {} and [d.metadata for d in clone([docs[2]])][0]["perplexity"] == out["c"]["perplexity"]


def test_batched_scoring_equals_one_document_at_a_time(lm_dir, english_fortunes, lid_corpora, tmp_path):
    """Documents are tokenized in batches across documents and languages: every document keeps its
    own lines, exactly the scores of scoring it alone, and the stream keeps its order."""
    (tmp_path / "en.cutoffs.json").write_text(json.dumps({"cutoffs": [100.0, 300.0]}))
    (tmp_path / "de.cutoffs.json").write_text(json.dumps({"cutoffs": [100.0, 300.0]}))
    texts = [("en", t) for t in english_fortunes["heldout"][:9]] + [("de", t) for t in lid_corpora["de"][:5]]
    texts += [("fr", lid_corpora["fr"][0]), (None, lid_corpora["en"][0]), ("en", "\n \n")]
    texts = [texts[i] for i in random.Random(0).sample(range(len(texts)), len(texts))]
    models = {lang: LanguageModel(lm_dir, lang) for lang in ("en", "de")}

    def docs():
        return [Document(str(i), t, "cc", {"language": l} if l else {}) for i, (l, t) in enumerate(texts)]

    outputs = []
    for batch_size in (1, 4, 64):
        step = Perplexity(str(lm_dir), cutoffs_dir=str(tmp_path), batch_size=batch_size)
        outputs.append([(d.id, d.metadata) for d in step(docs())])
        assert step.stats["seen"] == len(texts) and step.stats["dropped/no_scorable_line"] == 1
    assert outputs[0] == outputs[1] == outputs[2]
    for doc_id, meta in outputs[0]:
        lang, text = texts[int(doc_id)]
        if lang in models:
            assert meta["perplexity"] == round(models[lang].perplexity(text), 1)
        else:
            assert meta["bucket"] == "all" and "perplexity" not in meta
    assert [int(i) for i, _ in outputs[0]] == sorted(int(i) for i, _ in outputs[0])
    scored = models["en"].log10_probs_and_lengths([t for l, t in texts if l == "en"])
    assert scored == [models["en"].log10_probs_and_lengths([t])[0] for l, t in texts if l == "en"]


def test_errors_name_the_file(lm_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="en.cutoffs.json"):
        list(Perplexity(str(lm_dir), languages=["en"], cutoffs_dir=str(tmp_path))(
            [Document("a", "Some text here.", "cc", {"language": "en"})]))
    with pytest.raises(FileNotFoundError, match="xx.sp.model"):
        Perplexity(str(lm_dir), languages=["xx"])
    bad = tmp_path / "bad.cutoffs.json"
    bad.write_text(json.dumps({"cutoffs": [30.0, 10.0]}))
    with pytest.raises(ValueError, match="bad.cutoffs.json.*cutoffs"):
        read_cutoffs(bad)
    monkeypatch.setattr(kenlm_train, "LOCAL_KENLM_BIN", tmp_path)
    monkeypatch.delenv("KENLM_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make kenlm"):
        kenlm_train.train_reference_lm("en", [bad], tmp_path / "out")
