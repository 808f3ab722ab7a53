"""The training samples and held-out shards a `data` config (llama_pt.config.DataConfig) names, opened
and checked against their manifests; every error is one line naming the field or file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, DataConfig

from .mixture import load_manifest, requested_epochs, resolve_weights
from .packing import PackedSource
from .samples import BlendedSamples


def _manifest(path: str, field: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"{field}={path}: mixture manifest not found")
    return load_manifest(path)


def build_train_samples(cfg: DataConfig, seq_len: int, prefix: str = "data") -> BlendedSamples:
    """Open every shard of the manifest and build the blended sample sequence.

    Checks, in order: the manifest file, its fields and shard files, the weights/epochs overrides,
    that each source's shards hold the token and document counts the manifest states, and that
    each source has at least one window of seq_len + 1 tokens. The sources keep their epoch tables
    in cfg.index_dir (packing.default_index_dir() when unset); none is built here.
    """
    manifest = _manifest(cfg.manifest, f"{prefix}.manifest")
    srcs = manifest["sources"]
    weights = resolve_weights(srcs, cfg.weights, cfg.epochs, prefix)
    packed = []
    for i, s in enumerate(srcs):
        p = PackedSource(s["name"], s["prefixes"], seq_len, cfg.seed, index_dir=cfg.index_dir)
        for key, got in (("tokens", p.num_tokens), ("documents", p.num_docs)):
            if got != s[key]:
                raise ValueError(f"{manifest['path']}: sources[{i}].{key}={s[key]} ({s['name']}) but its "
                                 f"shards hold {got}")
        packed.append(p)
    return BlendedSamples(packed, [weights[s["name"]] for s in srcs], requested_epochs(srcs, cfg.epochs),
                          vocab_size=manifest["vocab_size"], eos_id=manifest["eos_id"])


def valid_prefixes(cfg: DataConfig, prefix: str = "data") -> Optional[list[str]]:
    """Shard prefixes of the held-out manifest (all sources, manifest order), or None if unset."""
    if cfg.valid_manifest is None:
        return None
    manifest = _manifest(cfg.valid_manifest, f"{prefix}.valid_manifest")
    return [p for s in manifest["sources"] for p in s["prefixes"]]

