"""The mixture manifest train.py reads: token shards per source with weights and epochs.

A recipe's ``mixture.preset`` names a published mixture of ``llama_pt.config.mixtures`` (``llama1``:
LLaMA Table 1, each source's sampling proportion and the epochs it made over the 1.4T-token run).
The recipe's ``mixture.weights`` and ``mixture.epochs`` override it per source. Weights are written as
fractions (the preset's percentages / 100), and train.py normalises them over the sources present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_pt.config.mixtures import MIXTURES

#: The published mixtures as the manifest writes them: name -> source -> (weight as a fraction, epochs).
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    name: {source: (share.percent / 100, share.epochs) for source, share in mixture.items()}
    for name, mixture in MIXTURES.items()
}


def source_weights(mixture: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    """(weight, epochs) of source ``name``: the recipe's values over the preset's."""
    preset = PRESETS.get(mixture.get("preset"), {}).get(name, (None, None))
    weights, epochs = mixture.get("weights") or {}, mixture.get("epochs") or {}
    weight = weights.get(name, preset[0] if name not in epochs else None)
    return (None if weight is None else float(weight),
            float(epochs[name]) if name in epochs else preset[1])


def manifest_sources(shard_stats: list[dict[str, Any]], base: Path, mixture: dict[str, Any],
                     order: list[str], split: str) -> list[dict[str, Any]]:
    """Manifest ``sources`` entries for ``split`` (train/valid) from the tokenize markers' stats."""
    by_source: dict[str, dict[str, Any]] = {}
    for stats in shard_stats:
        part = stats.get(split)
        if not part or not part["documents"]:
            continue
        entry = by_source.setdefault(stats["source"], {"prefixes": [], "documents": 0, "tokens": 0})
        entry["prefixes"].append(str(Path(base) / part["prefix"]))
        entry["documents"] += part["documents"]
        entry["tokens"] += part["tokens"]
    sources = []
    for name in order:
        if name in by_source:
            weight, epochs = source_weights(mixture, name)
            sources.append({"name": name, **by_source[name], "prefixes": sorted(by_source[name]["prefixes"]),
                            "weight": weight, "epochs": epochs})
    return sources


def write_manifests(shard_stats: list[dict[str, Any]], tokens_dir: Path, tokenizer_model: Path,
                    mixture: dict[str, Any], order: list[str]) -> dict[str, Path]:
    """``mixture.json`` (and ``valid.json`` when documents were held out) in ``tokens_dir``."""
    from llama_pt.data.mixture import write_manifest
    from llama_pt.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_model)
    written = {}
    for split, filename in (("train", "mixture.json"), ("valid", "valid.json")):
        sources = manifest_sources(shard_stats, tokens_dir, mixture, order, split)
        if not sources:
            if split == "train":
                raise ValueError(f"{tokens_dir}: no tokenized documents to write a manifest for")
            continue
        written[split] = write_manifest(tokens_dir / filename, sources, tokenizer_model, tok.vocab_size, tok.eos_id)
    return written
