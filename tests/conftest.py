"""Shared fixtures: a real SentencePiece model and small token corpora written with the project's own shard
writer; and the `cuda` marker's skip where torch sees no CUDA GPU.

`support` (which imports Hydra) is imported inside the fixtures, so that a folder whose tests need
neither (tests/cuda on a GPU machine without Hydra) is collected without it.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # Registered here rather than in pyproject.toml, whose hash decides when scripts/setup_env.sh reinstalls.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run on one by `make gpu-check`")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, when torch sees no CUDA GPU."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_512(tmp_path_factory) -> Path:
    """A real 512-piece SentencePiece model with LLaMA's settings, trained on licence texts."""
    from support import english_text_files

    from llama_pt.tokenizer import train_sentencepiece
    return train_sentencepiece(english_text_files(), tmp_path_factory.mktemp("spm") / "spm", 512)


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory, tokenizer_512) -> dict[str, Path]:
    from support import write_token_corpus
    root = tmp_path_factory.mktemp("tokens")
    train = write_token_corpus(root / "train", {"web": 300, "books": 100}, tokenizer_512, seed=0)
    valid = write_token_corpus(root / "valid", {"web": 30}, tokenizer_512, seed=1, name="valid.json")
    return {"manifest": train, "valid_manifest": valid}
