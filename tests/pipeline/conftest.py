"""Real text for the model-based steps, from Debian packages (scripts/install_test_corpora.sh installs
them; `make test` runs it): fortune cookies in English, German, Spanish, Italian and Russian, and the
Debian Reference in English and French. Models trained on it once per session: KenLM reference models
(built with the project's own train_reference_lm / `llama-data train-lm`) and the wiki classifier."""
from __future__ import annotations

from pathlib import Path

import pytest

from debian_text import debian_reference, fortunes, sample


@pytest.fixture(scope="session")
def lid_corpora() -> dict[str, list[str]]:
    """50 real documents in each of six languages."""
    out = {lang: sample(fortunes(lang), 50) for lang in ("en", "de", "es", "it", "ru")}
    out["fr"] = sample(debian_reference("fr"), 50)
    return out


@pytest.fixture(scope="session")
def english_fortunes() -> dict[str, list[str]]:
    """English fortunes split into train (9 in 10) and held-out (1 in 10) documents."""
    docs = fortunes("en")
    return {"train": [d for i, d in enumerate(docs) if i % 10], "heldout": [d for i, d in enumerate(docs) if not i % 10]}


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, english_fortunes) -> Path:
    """English and German reference models, trained by train_reference_lm and `llama-data train-lm`."""
    from data_pipeline.cli import main
    from data_pipeline.tools.train_lm import train_reference_lm

    root = tmp_path_factory.mktemp("lm")
    models = root / "models"
    en_text = root / "en.txt"
    en_text.write_text("\n".join(english_fortunes["train"]) + "\n", encoding="utf-8")
    train_reference_lm("en", [en_text], models, memory="200M")
    de_text = root / "de.txt"
    de_text.write_text("\n".join(fortunes("de")[::2]) + "\n", encoding="utf-8")
    assert main(["train-lm", "de", str(de_text), "--out", str(models), "--memory", "200M"]) == 0
    return models
