"""Instruction data and a base model for the instruction-tuning tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def short_records(path: Path, n: int = 60) -> Path:
    """n short records, every third a two-turn ShareGPT conversation, the rest Alpaca records with an input
    (about 40-100 tokens each with the tests' 512-piece tokenizer): a window of 128 holds one to three."""
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta file path text line list name value".split()
    with open(path, "w") as f:
        for i in range(n):
            picked = " ".join(rng.choice(words, size=int(rng.integers(2, 5))))
            record = {"instruction": "Repeat the words.", "input": picked, "output": picked} if i % 3 else \
                {"conversations": [{"from": "human", "value": f"Say {picked}."}, {"from": "gpt", "value": picked},
                                   {"from": "human", "value": "Again."}, {"from": "gpt", "value": picked}]}
            f.write(json.dumps(record) + "\n")
    return path


def tiny_base(folder: Path, tokenizer: Path) -> Path:
    """A Hugging Face folder of a freshly initialised tiny model (seed 0) with the tokenizer."""
    import torch

    from llama_pt.hf_interop import export_hf
    from llama_pt.model import Llama, get_preset
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    return export_hf(Llama(cfg), cfg, folder, tokenizer_path=tokenizer)
