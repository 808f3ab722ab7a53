"""Arithmetic on the weights of models of one architecture: the delta between two models and its application,
and the weighted average of several. Every model is a Hugging Face folder or a training checkpoint folder
(.loading); every output is a Hugging Face folder written atomically, tensors in one dtype.

Deltas (`make_delta`, `apply_delta`). Vicuna (Chiang et al. 2023, lmsys/FastChat) released its weights as
target − base: whoever holds the LLaMA base recovers Vicuna with base + delta, and the delta alone is of no
use. Here base + delta gives the target back bit for bit, in float32, bfloat16 and float16, by three means:

1. The delta is stored one format wider than the target's weights (`WIDE`: float64 for float32 weights,
   float32 for 16-bit ones), and applied as `(base.to(W) + delta).to(T)`: the sum in W, one rounding to T.
2. `make_delta` applies its own delta and compares the result with the target bit for bit; the few elements
   where the two differ are stored as they are (their flat index and value, the "patches",
   llama_pt_delta_patches.safetensors) and written over the sum by `apply_delta`.
3. llama_pt_delta.json names the base (dtype, model config, SHA-256 of its tensors) and the target (dtype,
   SHA-256): `apply_delta` refuses another base in one line, and checks the rebuilt target's SHA-256 before
   writing it.

Why the patches are few. Let a be a base weight and b the target's, both in T (precision p_T bits: 24 for
float32, 8 for bfloat16, 11 for float16), W the wide format (p_W = 53 or 24), d = fl_W(b − a), s = fl_W(a + d):
- Exponent gap. a and b are integer multiples of the spacing of T at the smaller of |a|, |b|, and
  |b − a| ≤ 2 max(|a|, |b|); if their binades are at most p_W − p_T − 1 apart (28 for float32 in float64,
  15 for bfloat16 and 12 for float16 in float32), b − a has at most p_W significant bits: d is exact, a + d = b
  is representable in W, s = b.
- A larger gap with |b| > |a| (the target dominates): d and s each carry one rounding of relative size 2^−p_W,
  so |s − b| < 2^(2−p_W)|b|, below half the spacing of T at b (≥ 2^(−p_T−1)|b|) because p_W ≥ p_T + 3:
  s rounds to b.
- A larger gap with |a| > |b| (the base dominates): d ≈ −a within a factor of 2, so a + d is exact
  (Sterbenz's lemma) and s = b + (d − (b − a)) is off by d's rounding error, up to 2^−p_W|a|. That reaches
  half the spacing of T at b only when b is more than 2^(p_W−p_T−2) times smaller than a (a weight fine-tuned
  to nearly zero: a = 1, b = 2^−60 in float32 gives d = −1, s = 0): then b may not come back, and is a patch.
- Signed zeros: a sum x + (−x), and (−0) + (+0), is +0 when rounding to nearest, so a target −0.0 is never
  rebuilt from a non-zero base (nor from a base −0.0, whose delta is +0): a patch. So are non-finite values,
  and b − a overflowing W (bfloat16 weights near 3.4e38).
The argument takes a and b in T; a base in another dtype (a float32 checkpoint under bfloat16 weights) may
need more patches, and step 2 makes the result exact whatever the argument covers. A delta in the weights'
own dtype has no such bound: fl_T(b − a) loses low bits whenever a and b are more than a factor of 2 apart or
of opposite signs, and a sizeable part of the elements come back wrong (tests/test_deltas.py shows this, and
the failures of the wide delta without patches). The patches hold target values, but only at elements whose
target is zero or tiny next to the base (or non-finite); llama_pt_delta.json counts them.

Averages (`average_models`): the weighted average Σ w_i θ_i of N models with the same tensors, the weights
normalised to sum 1 (equal by default); a "model soup" (Wortsman et al. 2022, "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time"). It is computed in
float64, model by model, and rounded once to the models' dtype (float32 when their dtypes differ, which holds
every value of each exactly).

Every refusal (tensors missing, extra or of another shape, another base, bad weights) is one line
(ValueError, CheckpointError, FileNotFoundError) raised before anything is written. Each command holds its
models in host memory: both models and the delta, or one model and the float64 sum.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..config import ModelConfig
from ..config.hf_model import hf_config
from ..hf_interop import export_hf, import_hf
from .loading import is_hf_folder, load_checkpoint_model, tokenizer_of_checkpoint

DELTA_FILE = "llama_pt_delta.json"
PATCHES_FILE = "llama_pt_delta_patches.safetensors"
DELTA_FORMAT = 1
WIDE = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Weights:
    """A model's tensors (llama_pt names, stored dtype), config and tokenizer file (None if it has none)."""
    path: Path
    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Optional[Path]

    @property
    def dtype(self) -> torch.dtype:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in self.tensors.values()})
        if len(dtypes) != 1:
            raise ValueError(f"{self.path} holds tensors of several dtypes ({', '.join(dtypes)}); "
                             "weight arithmetic needs one")
        return next(iter(self.tensors.values())).dtype


def load_weights(path: str | Path) -> Weights:
    """The tensors as stored: a Hugging Face folder's in its dtype, a checkpoint's in float32."""
    path = Path(path)
    if is_hf_folder(path):
        cfg, tensors = import_hf(path)
        tokenizer = path / "tokenizer.model"
        return Weights(path, cfg, tensors, tokenizer if tokenizer.is_file() else None)
    model, state = load_checkpoint_model(path)
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    return Weights(path, model.cfg, tensors, tokenizer_of_checkpoint(state))


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{_dtype_name(t.dtype)}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_same_tensors(reference: Weights, other: Weights) -> None:
    """ValueError naming the first tensor (in the reference's order) missing from `other`, of another shape in
    it, or only in it."""
    for name, t in reference.tensors.items():
        if name not in other.tensors:
            raise ValueError(f"tensor {name!r} of {reference.path} is missing from {other.path}")
        if other.tensors[name].shape != t.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)} in {reference.path} "
                             f"but {tuple(other.tensors[name].shape)} in {other.path}")
    for name in other.tensors:
        if name not in reference.tensors:
            raise ValueError(f"{other.path} has a tensor {name!r} that {reference.path} lacks")


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The model as its config.json describes it, without the dtype and llama_pt's derivation hints: one form
    for the configs of one model, however they were stored (n_kv_heads None or equal to n_heads, another
    multiple_of giving the same intermediate_size). As it reads back from JSON, so that a stored one compares
    equal."""
    config = {k: v for k, v in hf_config(cfg, "float32").items() if k not in ("torch_dtype", "dtype", "llama_pt")}
    return json.loads(json.dumps(config))


# ----------------------------------------------------------------------------------------------- deltas
def subtract(base: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta in WIDE[target.dtype], flat indices and values of the patches) with
    add(base, delta, target.dtype, indices, values) equal to `target` (float32, bfloat16 or float16) bit for bit."""
    wide = WIDE[target.dtype]
    delta = target.to(wide) - base.to(wide)
    rebuilt = add(base, delta, target.dtype)
    wrong = (_bits(rebuilt) != _bits(target)).reshape(-1).nonzero().squeeze(1)
    return delta, wrong, target.reshape(-1)[wrong]


def add(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype, patch_index: Optional[torch.Tensor] = None,
        patch_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(base + delta) computed in the delta's dtype, rounded once to `dtype`, the patches written over it."""
    out = (base.to(delta.dtype) + delta).to(dtype)
    if patch_index is not None:
        out.view(-1)[patch_index] = patch_values
    return out


def make_delta(base_path: str | Path, target_path: str | Path, out_dir: str | Path) -> Path:
    """Write the delta folder of `target` over `base` (same tensors and shapes): a Hugging Face folder of the
    differences in the wide dtype with the target's config and tokenizer, the patches, and llama_pt_delta.json."""
    base, target = load_weights(base_path), load_weights(target_path)
    check_same_tensors(base, target)
    base_dtype, target_dtype = base.dtype, target.dtype
    if target_dtype not in WIDE:
        raise ValueError(f"{target.path} holds {_dtype_name(target_dtype)} weights; "
                         "deltas are made of float32, bfloat16 or float16 weights")
    delta, patches = {}, {}
    for name, t in target.tensors.items():
        delta[name], index, values = subtract(base.tensors[name], t)
        if index.numel():
            patches[f"{name}.index"], patches[f"{name}.value"] = index, values.contiguous()
    n_patched = sum(t.numel() for key, t in patches.items() if key.endswith(".index"))
    manifest = {
        "llama_pt_delta": DELTA_FORMAT,
        "recipe": "target = (base.to(delta_dtype) + delta).to(target.dtype), then target.view(-1)[index] = value "
                  f"for each tensor's patches in {PATCHES_FILE}",
        "delta_dtype": _dtype_name(WIDE[target_dtype]),
        "base": {"dtype": _dtype_name(base_dtype), "config": architecture(base.cfg),
                 "weights_sha256": weights_sha256(base.tensors)},
        "target": {"dtype": _dtype_name(target_dtype), "weights_sha256": weights_sha256(target.tensors)},
        "patched_elements": n_patched,
        "elements": sum(t.numel() for t in target.tensors.values()),
    }
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        export_hf(delta, target.cfg, tmp, tokenizer_path=target.tokenizer, dtype=WIDE[target_dtype])
        save_file(patches, str(tmp / PATCHES_FILE), metadata={"format": "pt"})
        (tmp / DELTA_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_delta_manifest(delta_dir: str | Path) -> dict[str, Any]:
    """llama_pt_delta.json of a delta folder; ValueError if the folder is not one."""
    path = Path(delta_dir) / DELTA_FILE
    if not path.is_file():
        raise ValueError(f"{delta_dir} is not a llama_pt delta folder (no {DELTA_FILE}; make it with make-delta)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if manifest.get("llama_pt_delta") != DELTA_FORMAT:
        raise ValueError(f"{path}: delta format {manifest.get('llama_pt_delta')!r} is not {DELTA_FORMAT}")
    return manifest


def apply_delta(base_path: str | Path, delta_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the target that `make_delta` took the delta of: a Hugging Face folder with the delta's config and
    tokenizer, its weights equal to the target's bit for bit. Refuses another base before any arithmetic."""
    manifest = read_delta_manifest(delta_dir)
    expected = manifest["base"]
    base, delta = load_weights(base_path), load_weights(delta_dir)
    check_same_tensors(base, delta)
    if _dtype_name(base.dtype) != expected["dtype"]:
        raise ValueError(f"{base.path} holds {_dtype_name(base.dtype)} weights, the base of {delta_dir} held "
                         f"{expected['dtype']} ones (another export of the same model does not do)")
    config = architecture(base.cfg)
    field = _first_difference(config, expected["config"])
    if field:
        raise ValueError(f"{base.path} is not the base of {delta_dir}: config field {field} is "
                         f"{config.get(field)!r}, the delta's base had {expected['config'].get(field)!r}")
    found = weights_sha256(base.tensors)
    if found != expected["weights_sha256"]:
        raise ValueError(f"{base.path} is not the base of {delta_dir}: its weights' sha256 is {found[:16]}…, "
                         f"the delta was made from {expected['weights_sha256'][:16]}…")
    if _dtype_name(delta.dtype) != manifest["delta_dtype"]:
        raise ValueError(f"{delta_dir} holds {_dtype_name(delta.dtype)} differences, its {DELTA_FILE} says "
                         f"{manifest['delta_dtype']}")
    dtype = getattr(torch, manifest["target"]["dtype"])
    patches = load_file(str(Path(delta_dir) / PATCHES_FILE))
    target = {name: add(base.tensors[name], d, dtype, patches.get(f"{name}.index"), patches.get(f"{name}.value"))
              for name, d in delta.tensors.items()}
    if weights_sha256(target) != manifest["target"]["weights_sha256"]:
        raise ValueError(f"{delta_dir} is damaged: base + delta does not match the target's sha256 in {DELTA_FILE}")
    return export_hf(target, delta.cfg, out_dir, tokenizer_path=delta.tokenizer, dtype=dtype)


# ----------------------------------------------------------------------------------------------- averages
def average_models(out_dir: str | Path, model_paths: Sequence[str | Path],
                   weights: Optional[Sequence[float]] = None) -> Path:
    """Write Σ w_i θ_i (w normalised, equal by default) of models with the same tensors, config and tokenizer,
    with the first model's config and tokenizer."""
    if not model_paths:
        raise ValueError("average needs at least one model")
    weights = [1.0] * len(model_paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(model_paths):
        raise ValueError(f"{len(weights)} weights for {len(model_paths)} models")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be positive and finite, got {' '.join(map(str, weights))}")
    weight_sum = sum(weights)
    coefficients = [w / weight_sum for w in weights]
    first = load_weights(model_paths[0])
    first_dtype, dtypes = first.dtype, {first.dtype}
    total = {name: t.double() * coefficients[0] for name, t in first.tensors.items()}
    for path, c in zip(model_paths[1:], coefficients[1:]):
        model = load_weights(path)
        check_same_tensors(first, model)
        _check_same_config(first, model)
        _check_same_tokenizer(first, model)
        dtypes.add(model.dtype)
        for name, t in model.tensors.items():
            total[name] += t.double() * c
    dtype = first_dtype if len(dtypes) == 1 else torch.float32
    return export_hf(total, first.cfg, out_dir, tokenizer_path=first.tokenizer, dtype=dtype)


def _check_same_config(reference: Weights, other: Weights) -> None:
    a, b = architecture(reference.cfg), architecture(other.cfg)
    field = _first_difference(a, b)
    if field:
        raise ValueError(f"{other.path} differs from {reference.path} in config field {field}: "
                         f"{b.get(field)!r} vs {a.get(field)!r}")


def _check_same_tokenizer(reference: Weights, other: Weights) -> None:
    if reference.tokenizer and other.tokenizer and reference.tokenizer.read_bytes() != other.tokenizer.read_bytes():
        raise ValueError(f"the tokenizer of {other.path} ({other.tokenizer}) differs from that of {reference.path} "
                         f"({reference.tokenizer})")


# ----------------------------------------------------------------------------------------------- helpers
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> Optional[str]:
    """The first key (a's order, then b's) whose values differ, None if none does."""
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key) != b.get(key):
            return key
    return None
