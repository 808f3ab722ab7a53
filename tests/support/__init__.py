"""Helpers shared by the tests (fixtures live in tests/conftest.py): token corpora, Hydra configs, run results.

The package's modules: `torchrun` launches scripts under torchrun; `workers/` holds the worker mains the
multi-process tests launch; `fault_runs` (train.py under torchrun) and `injection` (bad batches) serve the
fault tests.
"""
import json
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from llama_pt.data import IndexedDatasetWriter, write_manifest
from llama_pt.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[2]

EOS = 2


def _phrase_documents(rng: np.random.Generator, n_docs: int, vocab: int) -> list[np.ndarray]:
    """Documents built from a fixed set of token phrases: learnable structure, like text."""
    phrases = [rng.integers(3, vocab, size=rng.integers(3, 9)) for _ in range(24)]
    docs = []
    for _ in range(n_docs):
        picks = rng.integers(0, len(phrases), size=rng.integers(4, 40))
        docs.append(np.concatenate([phrases[i] for i in picks] + [np.array([EOS])]))
    return docs


def english_text_files() -> list[Path]:
    """Real English text present on every Debian machine (licence texts)."""
    files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file() and not p.is_symlink())
    assert files, "/usr/share/common-licenses is empty: the tests expect a Debian machine"
    return files


def write_token_corpus(root: Path, sources: dict[str, int], tokenizer: Path, vocab: int = 512, seed: int = 0,
                       name: str = "mixture.json") -> Path:
    """Shards + manifest for sources {name: n_docs} of synthetic phrase documents."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for source, n_docs in sources.items():
        prefix = root / source / "shard_00000"
        prefix.parent.mkdir(exist_ok=True)
        docs = _phrase_documents(rng, n_docs, vocab)
        with IndexedDatasetWriter(prefix, vocab) as writer:
            for doc in docs:
                writer.add_document(doc)
        entries.append({"name": source, "prefixes": [prefix], "documents": len(docs),
                        "tokens": int(sum(len(d) for d in docs)), "weight": 1.0, "epochs": None})
    path = root / name
    write_manifest(path, entries, tokenizer, vocab_size=vocab, eos_id=EOS)
    return path




def make_config(tmp_path, token_corpus, *overrides):
    base = [f"data.manifest={token_corpus['manifest']}", f"data.valid_manifest={token_corpus['valid_manifest']}",
            f"train.out_dir={tmp_path}", "model=tiny", "train.seq_len=32", "train.global_batch_tokens=512",
            "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
            "optim.warmup_steps=2", "optim.lr=3e-3", "logging.wandb.enabled=false"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


def losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def final_weights(out_dir):
    from llama_pt.pretrained import load_checkpoint_model
    model, _ = load_checkpoint_model(list_checkpoints(out_dir / "checkpoints")[-1])
    return model.state_dict()
