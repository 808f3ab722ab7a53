"""The mixture manifest (which token shards make up each source) and the rule that turns
weights/epochs into sampling proportions.

Manifest (JSON, written by the data pipeline next to its shards, read by train.py):

    {"version": 1, "tokenizer": "<path rel. to manifest dir>", "vocab_size": int, "eos_id": int,
     "sources": [{"name": str, "prefixes": [<shard prefixes rel. to manifest dir>], "documents": int,
                  "tokens": int (incl. one EOS per document), "weight": float|null,
                  "epochs": float|null}]}

Weight rule (LLaMA, Touvron et al. 2023, Table 1 gives both a sampling proportion and the epochs it
implies over 1.4T tokens): sampling is by weight. A source with epochs but no weight gets a weight
proportional to epochs * tokens. Values from the data config override the manifest's, per source;
a config weight beats a config epoch, which beats the manifest's weight, which beats its epochs.
If every source ends up with an explicit weight, the weights are normalised by their sum (so
percentages work). If some are explicit and some derived from epochs, the explicit ones are
fractions of the whole and must sum below 1; the derived ones share the rest in proportion to
epochs * tokens.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..atomic import write_text_atomic
from ..config import ConfigError

from .indexed import PathLike, bin_path, idx_path

MANIFEST_VERSION = 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_manifest(data: Any, where: str) -> None:
    """Raise ValueError '<where>: <field> ...' for the first malformed field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: manifest must be a JSON object")
    if data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{where}: version={data.get('version')!r}, expected {MANIFEST_VERSION}")
    if not isinstance(data.get("tokenizer"), str):
        raise ValueError(f"{where}: tokenizer must be a path string")
    vocab = data.get("vocab_size")
    if not _is_int(vocab) or vocab <= 0:
        raise ValueError(f"{where}: vocab_size={vocab!r} must be a positive integer")
    eos = data.get("eos_id")
    if not _is_int(eos) or not 0 <= eos < vocab:
        raise ValueError(f"{where}: eos_id={eos!r} must be an integer in [0, vocab_size={vocab})")
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError(f"{where}: sources must be a non-empty list")
    seen: set[str] = set()
    for i, src in enumerate(sources):
        at = f"{where}: sources[{i}]"
        if not isinstance(src, dict):
            raise ValueError(f"{at} must be an object")
        name = src.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at}.name must be a non-empty string")
        if name in seen:
            raise ValueError(f"{at}.name={name!r} is a duplicate")
        seen.add(name)
        prefixes = src.get("prefixes")
        if not isinstance(prefixes, list) or not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"{at}.prefixes ({name}) must be a non-empty list of path strings")
        for key in ("documents", "tokens"):
            if not _is_int(src.get(key)) or src[key] < 0:
                raise ValueError(f"{at}.{key}={src.get(key)!r} ({name}) must be a non-negative integer")
        for key in ("weight", "epochs"):
            if src.get(key) is not None and not _is_positive(src[key]):
                raise ValueError(f"{at}.{key}={src[key]!r} ({name}) must be a positive number or null")


def write_manifest(path: PathLike, sources: Sequence[Mapping[str, Any]], tokenizer: PathLike,
                   vocab_size: int, eos_id: int) -> Path:
    """Write the manifest atomically; prefixes and tokenizer are stored relative to its folder."""
    path = Path(path)
    base = path.parent.resolve()

    def rel(p: PathLike) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    data = {
        "version": MANIFEST_VERSION, "tokenizer": rel(tokenizer), "vocab_size": vocab_size, "eos_id": eos_id,
        "sources": [{"name": s.get("name"), "prefixes": [rel(p) for p in s.get("prefixes") or []],
                     "documents": s.get("documents"), "tokens": s.get("tokens"),
                     "weight": s.get("weight"), "epochs": s.get("epochs")} for s in sources],
    }
    _check_manifest(data, str(path))
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def load_manifest(path: PathLike, check_files: bool = True) -> dict[str, Any]:
    """Read and validate a manifest; prefixes and tokenizer come back as absolute paths.

    With check_files, every shard's .bin and .idx must exist (FileNotFoundError naming both the
    manifest and the shard). The returned dict also carries "path", the manifest's absolute path.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mixture manifest not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: manifest is not valid JSON ({e})") from None
    _check_manifest(data, str(path))
    base = path.parent
    data["path"] = str(path)
    data["tokenizer"] = str((base / data["tokenizer"]).resolve())
    for i, src in enumerate(data["sources"]):
        src["prefixes"] = [str((base / p).resolve()) for p in src["prefixes"]]
        if check_files:
            for p in src["prefixes"]:
                for f in (idx_path(p), bin_path(p)):
                    if not f.is_file():
                        raise FileNotFoundError(f"{path}: sources[{i}] ({src['name']}) shard file {f} not found")
    return data


def resolve_weights(sources: Sequence[Mapping[str, Any]], weights: Optional[Mapping[str, float]] = None,
                    epochs: Optional[Mapping[str, float]] = None, prefix: str = "data") -> dict[str, float]:
    """Sampling proportions (summing to 1) per source name, by the rule in the module docstring.

    Raises ConfigError naming `<prefix>.weights.<name>` / `<prefix>.epochs.<name>` for an unknown
    source, a non-positive value, or a source left with neither a weight nor epochs.
    """
    weights, epochs = dict(weights or {}), dict(epochs or {})
    names = [s["name"] for s in sources]
    for field, given in (("weights", weights), ("epochs", epochs)):
        for name, value in given.items():
            if name not in names:
                raise ConfigError(f"{prefix}.{field}.{name}: unknown source (manifest has: {', '.join(names)})")
            if not _is_positive(value):
                raise ConfigError(f"{prefix}.{field}.{name}={value!r} must be a positive number")
    explicit: dict[str, float] = {}
    derived: dict[str, float] = {}
    for src in sources:
        name = src["name"]
        if name in weights:
            explicit[name] = float(weights[name])
        elif name in epochs:
            derived[name] = float(epochs[name]) * src["tokens"]
        elif src.get("weight") is not None:
            explicit[name] = float(src["weight"])
        elif src.get("epochs") is not None:
            derived[name] = float(src["epochs"]) * src["tokens"]
        else:
            raise ConfigError(f"{prefix}.weights.{name}: source has neither a weight nor epochs "
                              "in the config or the manifest")
        if name in derived and derived[name] <= 0:
            raise ConfigError(f"{prefix}.epochs.{name}: source has no tokens, cannot derive a weight from epochs")
    if not derived:
        total = sum(explicit.values())
        return {n: explicit[n] / total for n in names}
    share = 1.0 - sum(explicit.values())
    if share <= 0:
        raise ConfigError(f"{prefix}.weights: explicit weights sum to {1 - share:g} but "
                          f"{', '.join(derived)} derive theirs from epochs; give explicit weights as "
                          "fractions summing below 1")
    total = sum(derived.values())
    return {n: explicit[n] if n in explicit else share * derived[n] / total for n in names}


def requested_epochs(sources: Sequence[Mapping[str, Any]],
                     epochs: Optional[Mapping[str, float]] = None) -> dict[str, Optional[float]]:
    """Epochs asked for per source (config over manifest), None where nobody asked; for reports."""
    epochs = dict(epochs or {})
    return {s["name"]: (float(epochs[s["name"]]) if s["name"] in epochs
                        else s.get("epochs")) for s in sources}
