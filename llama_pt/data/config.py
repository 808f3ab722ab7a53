"""The `data` config group (configs/data/*.yaml) and the start-up checks that go with it.

Keys: manifest (path to mixture.json), valid_manifest (optional held-out manifest), weights
(optional mapping source -> weight, overrides the manifest), epochs (optional mapping source ->
epochs, see mixture.resolve_weights), seed (shuffling seed, >= 0), num_workers (loader processes),
index_dir (folder for the sources' shuffling tables, see packing.py; the trainer's default is
<train.out_dir>/data_index).
Every error is one line naming the field or file.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llama_pt.model.config import ConfigError, reject_unknown_fields

from .mixture import load_manifest, requested_epochs, resolve_weights
from .packing import PackedSource
from .samples import BlendedSamples


@dataclass(frozen=True)
class DataConfig:
    manifest: str
    valid_manifest: Optional[str] = None
    weights: Optional[dict[str, float]] = None
    epochs: Optional[dict[str, float]] = None
    seed: int = 1234
    num_workers: int = 0
    index_dir: Optional[str] = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], prefix: str = "data") -> "DataConfig":
        """Build from a plain dict or an OmegaConf DictConfig; ConfigError names the bad field."""
        reject_unknown_fields(cls, values, prefix)
        if not values.get("manifest"):
            raise ConfigError(f"{prefix}.manifest must name the mixture manifest (mixture.json)")
        kw: dict[str, Any] = {"manifest": str(values["manifest"])}
        for key in ("valid_manifest", "index_dir"):
            if values.get(key):
                kw[key] = str(values[key])
        for key in ("weights", "epochs"):
            v = values.get(key)
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{prefix}.{key} must be a mapping of source name to number")
            kw[key] = {str(k): x for k, x in v.items()}
        for key in ("seed", "num_workers"):
            v = values.get(key, getattr(cls, key))
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{prefix}.{key}={v!r} must be a non-negative integer")
            kw[key] = v
        return cls(**kw)


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

