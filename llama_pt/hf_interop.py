"""Export to and import from the Hugging Face Llama format (config.json + safetensors + tokenizer).

Parameter names differ only by a renaming (table `NAME_MAP`, used in both directions). No q/k
permutation is needed: llama_pt's RoPE pairs dimension i with i + head_dim/2 ("rotate half"), the
layout of `transformers`' LlamaForCausalLM (tests/test_hf_parity.py checks logits against it).

Vocabulary padding (llama_pt.config.model): a folder holds the real vocabulary only. Export trims the
embedding and the head to `vocab_size` rows (config.json's vocab_size), import pads them back with zero
rows to `padded_vocab_size`; the multiple is recorded in config.json's `llama_pt` entry.

Tokenizer: the SentencePiece model is copied as tokenizer.model with a tokenizer_config.json naming
LlamaTokenizer. transformers 5's LlamaTokenizer rebuilds it as a `tokenizers` BPE with a Metaspace
pre-tokenizer; it encodes exactly like SentencePiece except for text that starts with whitespace, where
Metaspace adds no dummy prefix ("▁") while SentencePiece does (true of Meta's own Llama-2 folders too).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .config import ModelConfig
from .config.hf_model import hf_config, model_config_from_hf
from .model import VOCAB_ROWS, Llama
from .tokenizer import Tokenizer

# (llama_pt name, Hugging Face name); "{i}" is the layer index.
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
# Buffers some older Hugging Face checkpoints store; they are recomputed from the config.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + r"\Z")


_TO_HF = [(_pattern(ours), hf) for ours, hf in NAME_MAP]
_FROM_HF = [(_pattern(hf), ours) for ours, hf in NAME_MAP]


def _rename(name: str, table, what: str) -> str:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.replace("{i}", match.group(1)) if match.groups() else template
    raise ValueError(f"{what} parameter {name!r} has no counterpart in the name map")


def to_hf_name(name: str) -> str:
    return _rename(name, _TO_HF, "llama_pt")


def from_hf_name(name: str) -> str:
    return _rename(name, _FROM_HF, "Hugging Face")


def expected_shapes(cfg: ModelConfig, padded: bool = True) -> dict[str, tuple[int, ...]]:
    """llama_pt parameter name -> shape, for every parameter of Llama(cfg); with `padded=False` the shapes of a
    Hugging Face folder (vocab_size rows in VOCAB_ROWS)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(cfg).state_dict().items()}
    if not padded:
        shapes.update({name: (cfg.vocab_size, *shapes[name][1:]) for name in VOCAB_ROWS})
    return shapes


def _check_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str, padded: bool = True,
                      names: Optional[Collection[str]] = None) -> None:
    """Every parameter of Llama(cfg) (of `names` when given) in `state` with its shape, and nothing else."""
    shapes = expected_shapes(cfg, padded)
    if names is not None:
        for name in names:
            if name not in shapes:
                raise ValueError(f"{where}: {name!r} is not a parameter of this model config")
        shapes = {name: shapes[name] for name in names}
    for name in state:
        if name not in shapes:
            raise ValueError(f"{where}: unexpected parameter {name!r} for this model config")
    for name, shape in shapes.items():
        if name not in state:
            raise ValueError(f"{where}: missing parameter {name!r}")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}: parameter {name!r} has shape {tuple(state[name].shape)}, config says {shape}")


# ----------------------------------------------------------------------------------------------- export
def _tokenizer_files(tokenizer_path: Path, out: Path, cfg: ModelConfig) -> tuple[int, int]:
    """Copy the SentencePiece model and write the configs that make it a LlamaTokenizer; returns (bos, eos)."""
    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer_path}: {tok.vocab_size} pieces do not fit model.vocab_size={cfg.vocab_size}")
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    special = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
               "unk_token": tok.id_to_piece(tok.unk_id)}
    added = {str(i): {"content": tok.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i in (tok.unk_id, tok.bos_id, tok.eos_id)}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": True, "legacy": False, "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_seq_len, "pad_token": None, "sp_model_kwargs": {}, "padding_side": "left",
        "added_tokens_decoder": added, **special})
    _write_json(out / "special_tokens_map.json", special)
    return tok.bos_id, tok.eos_id


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(state: Mapping[str, torch.Tensor], dtype: torch.dtype, out: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards with model.safetensors.index.json.

    Tensors are converted (renamed, cast, copied to CPU) one shard at a time, so exporting needs at most
    one shard of extra host memory.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = total = 0
    for name, t in state.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {to_hf_name(n): state[n].detach().to(device="cpu", dtype=dtype).contiguous().clone()
                   for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
    if len(shards) > 1:
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def export_hf(model_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]], model_cfg: ModelConfig,
              out_dir: str | Path, tokenizer_path: str | Path | None = None,
              dtype: torch.dtype | str = torch.float32,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              generation: Mapping[str, Any] | None = None) -> Path:
    """Write a folder that LlamaForCausalLM.from_pretrained (and AutoTokenizer, given a tokenizer) load; the
    padding rows of the vocabulary are left out.

    The folder is assembled under a temporary name next to `out_dir` and renamed into place when
    complete; an existing `out_dir` is replaced only then. `generation` adds sampling defaults to
    generation_config.json (e.g. {"do_sample": True, "temperature": 0.8, "top_p": 0.95}).
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"export dtype={dtype!r} is unknown (known: {', '.join(_DTYPES)})")
        dtype = _DTYPES[dtype]
    model_cfg.validate()
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
        else model_or_state_dict
    _check_state_dict(state, model_cfg, "export_hf")
    state = {name: t[:model_cfg.vocab_size] if name in VOCAB_ROWS else t for name, t in state.items()}

    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        bos, eos = 1, 2
        if tokenizer_path is not None:
            bos, eos = _tokenizer_files(Path(tokenizer_path), tmp, model_cfg)
        _write_weights(state, dtype, tmp, max_shard_bytes)
        _write_json(tmp / "config.json", hf_config(model_cfg, dtype, bos, eos))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": bos, "eos_token_id": eos, **(generation or {})})
    return out


# ----------------------------------------------------------------------------------------------- import
def _load_safetensors(path: Path, wanted: Optional[Callable[[str], bool]] = None) -> dict[str, torch.Tensor]:
    """The tensors of one file; with `wanted`, only those whose (Hugging Face) name it accepts are read."""
    try:
        if wanted is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys() if wanted(name)}
    except Exception as exc:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{path}: unreadable safetensors file ({exc})") from None


def _read_safetensors(folder: Path, wanted: Optional[Callable[[str], bool]] = None) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        tensors: dict[str, torch.Tensor] = {}
        shards = {fname for name, fname in weight_map.items() if wanted is None or wanted(name)}
        for fname in sorted(shards):
            shard = folder / fname
            if not shard.is_file():
                raise FileNotFoundError(f"{index}: shard not found: {shard}")
            tensors.update(_load_safetensors(shard, wanted))
        return tensors
    if single.is_file():
        return _load_safetensors(single, wanted)
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"{folder}: only pickle weights (*.bin/*.pt) found; convert them to safetensors first")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def import_hf(folder: str | Path,
              names: Optional[Collection[str]] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, llama_pt state dict) from a Hugging Face Llama folder, tensors in their stored dtype; the
    vocabulary padded with zero rows to the config's padded_vocab_size.

    `names`: read only these llama_pt parameters (e.g. those a pipeline stage keeps: the other tensors of
    the files are never read); each must be in the folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Hugging Face config not found: {config_path}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{config_path}: invalid JSON ({exc})") from None
    cfg = model_config_from_hf(config, where=str(config_path))
    wanted = None if names is None else _wanted(set(names))
    state = {}
    for name, tensor in _read_safetensors(folder, wanted).items():
        if _HF_IGNORED.match(name):
            continue
        try:
            state[from_hf_name(name)] = tensor
        except ValueError as exc:
            raise ValueError(f"{folder}: {exc}") from None
    _check_state_dict(state, cfg, str(folder), padded=False, names=names)
    padding = cfg.padded_vocab_size - cfg.vocab_size
    if padding:
        for name in VOCAB_ROWS:
            if name in state:
                state[name] = torch.cat([state[name], state[name].new_zeros(padding, state[name].shape[1])])
    return cfg, state


def _wanted(names: set[str]) -> Callable[[str], bool]:
    """Accepts the Hugging Face names of `names`, and names it cannot translate (import_hf reports those)."""
    def wanted(hf_name: str) -> bool:
        if _HF_IGNORED.match(hf_name):
            return False
        try:
            return from_hf_name(hf_name) in names
        except ValueError:
            return True
    return wanted
