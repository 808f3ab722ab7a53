"""A Llama as one GGUF file that llama.cpp runs, and the file read back.

The format is ggml's GGUF (specification: ggml's docs/gguf.md); the file holds what llama.cpp's own converter
(convert_hf_to_gguf.py, `LlamaModel`) writes for a Hugging Face Llama with a SentencePiece tokenizer, written
with the `gguf` package (gguf-py, from the llama.cpp repository):

- metadata: `general.architecture` = "llama", `general.name`, `general.file_type` (gguf.LlamaFileType),
  `general.quantization_version`; `llama.context_length` (model.max_seq_len), `llama.embedding_length`,
  `llama.block_count`, `llama.feed_forward_length`, `llama.attention.head_count`, `llama.attention.head_count_kv`
  (n_kv_heads, grouped-query attention), `llama.attention.layer_norm_rms_epsilon`, `llama.rope.freq_base`
  (rope_theta), `llama.rope.dimension_count` (head_dim) and `llama.vocab_size`.
- the tokenizer: `tokenizer.ggml.model` = "llama" (SentencePiece) with `tokenizer.ggml.pre` = "default"; `.tokens`
  (the pieces, "▁" for a space, byte pieces as "<0x0A>"), `.scores` and `.token_type` (SentencePiece's piece types,
  which llama.cpp numbers alike: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte); the bos, eos
  and unknown ids; `add_bos_token` true and `add_eos_token` false (LLaMA's convention, as `sample` encodes);
  `add_space_prefix` and `remove_extra_whitespaces` from the model's normalizer spec. When model.vocab_size exceeds
  the tokenizer's pieces, ids past them are "[PAD<id>]" pieces of type unused and score -10000, as the
  converter writes them. llama.cpp's SentencePiece tokenizer applies no normalisation rule: it encodes like ours
  for LLaMA's "identity" normalizer (llama_pt.tokenizer), not for NFKC ones.
- the tensors under llama.cpp's names (gguf.TENSOR_NAMES: token_embd, blk.N.attn_q, ..., output_norm, output),
  the embedding and the head trimmed to model.vocab_size rows (the padding rows of llama_pt.model.vocab are
  left out, as in a Hugging Face folder).

Rotary embeddings: ggml's LLaMA RoPE (GGML_ROPE_TYPE_NORMAL) rotates adjacent pairs of a head's dimensions
(2j, 2j + 1); ours rotates (j, j + head_dim/2) by the same angle (llama_pt.model.llama, "rotate half", the layout
of Hugging Face's Llama). The rows of wq and wk are therefore reordered within each head, halves to pairs: row
h * head_dim/2 + j goes to 2j + h (`interleave_heads`), the reordering llama.cpp's converter applies to Hugging
Face weights. q and k are permuted alike, so q.k is unchanged and wv, wo need nothing.

Types (`--type`): norm weights and other 1-D tensors are always f32; 2-D weights take the requested type: f32, f16,
bf16 (rounded to nearest even, as ggml), q8_0 or q4_0 (blocks of 32 values along a row with an f16 scale, quantised
by gguf.quants: its Q8_0 is bit-exact with ggml's reference, its Q4_0 the same algorithm as ggml's reference). A
block type needs the row length (a weight's input size) to be a multiple of its block size; a weight whose rows are
not is written in f16 instead, as llama.cpp's converter falls back, and `GGUFExport.fallbacks` names it (the
command prints one line).

The file is written under a temporary name and renamed when complete (llama_pt.atomic), one tensor converted at
a time: the export needs the model plus one converted tensor of host memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import gguf
import numpy as np
import torch

from ..atomic import atomic_path
from ..config import ModelConfig
from ..model import VOCAB_ROWS, Llama
from ..tokenizer import Tokenizer

QType = gguf.GGMLQuantizationType
# --type -> (the 2-D weights' GGML type, general.file_type)
GGUF_TYPES: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
FALLBACK = QType.F16

_T = gguf.MODEL_TENSOR
# llama_pt name -> llama.cpp's (gguf.TENSOR_NAMES) for the tensors of each layer, then those outside the layers.
_LAYER_NAMES = (("attention_norm", _T.ATTN_NORM), ("attention.wq", _T.ATTN_Q), ("attention.wk", _T.ATTN_K),
                ("attention.wv", _T.ATTN_V), ("attention.wo", _T.ATTN_OUT), ("ffn_norm", _T.FFN_NORM),
                ("feed_forward.w1", _T.FFN_GATE), ("feed_forward.w2", _T.FFN_DOWN), ("feed_forward.w3", _T.FFN_UP))
PAD_SCORE = -10000.0


def tensor_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(llama_pt name, GGUF name) of every tensor of the file, in the order written (llama.cpp's converter's)."""
    def theirs(tensor: gguf.MODEL_TENSOR, layer: int = 0) -> str:
        return gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"

    pairs = [("tok_embeddings.weight", theirs(_T.TOKEN_EMBD))]
    for i in range(cfg.n_layers):
        pairs += [(f"layers.{i}.{ours}.weight", theirs(tensor, i)) for ours, tensor in _LAYER_NAMES]
    return pairs + [("norm.weight", theirs(_T.OUTPUT_NORM)), ("output.weight", theirs(_T.OUTPUT))]


def interleave_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection [n_heads * head_dim, in] reordered within each head from the rotate-half layout
    (dimension j paired with j + head_dim/2) to ggml's adjacent pairs (2j, 2j + 1)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def deinterleave_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleave_heads`: adjacent pairs back to halves."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads_of(name: str, cfg: ModelConfig) -> Optional[int]:
    """The head count whose rows `name` holds if it is a q or k projection, else None."""
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.kv_heads
    return None


def tensor_type(shape: tuple[int, ...], requested: QType) -> QType:
    """The GGML type a tensor of `shape` is written in: f32 for 1-D tensors, the requested type for 2-D ones whose
    row length is a multiple of its block size, else f16."""
    if len(shape) == 1:
        return QType.F32
    return requested if shape[-1] % gguf.GGML_QUANT_SIZES[requested][0] == 0 else FALLBACK


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, each tensor's GGML type (GGUF names), and the 2-D weights that fell
    back to f16 because their rows do not fill the requested type's blocks."""
    path: Path
    types: dict[str, str]
    fallbacks: list[str]
    block: int  # values per block of the requested type (1 for f32, f16, bf16)


def _vocabulary(tokenizer_path: Path, vocab_size: int) -> dict[str, Any]:
    """Pieces, scores, types, special ids and normalizer flags of a SentencePiece model, padded to vocab_size."""
    from sentencepiece import sentencepiece_model_pb2
    tok = Tokenizer(tokenizer_path)  # refuses a missing or unreadable file with one line
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{tokenizer_path}: {tok.vocab_size} pieces do not fit model.vocab_size={vocab_size}")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_path.read_bytes())
    padding = range(len(proto.pieces), vocab_size)
    return {
        "tokens": [p.piece for p in proto.pieces] + [f"[PAD{i}]" for i in padding],
        "scores": [p.score for p in proto.pieces] + [PAD_SCORE] * len(padding),
        "types": [int(p.type) for p in proto.pieces] + [int(gguf.TokenType.UNUSED)] * len(padding),
        "bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id,
        "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
    }


def _write_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: gguf.LlamaFileType,
                    vocab: Mapping[str, Any]) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab["add_space_prefix"])
    writer.add_remove_extra_whitespaces(vocab["remove_extra_whitespaces"])


def _check_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """ValueError naming the first parameter missing from `state`, extra in it (an adapter not merged) or of
    another shape than Llama(cfg)'s."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Llama(cfg).state_dict().items()}
    for name in state:
        if name not in shapes:
            raise ValueError(f"export_gguf: parameter {name!r} is not one of Llama's (adapters must be merged first)")
    for name, shape in shapes.items():
        if name not in state:
            raise ValueError(f"export_gguf: missing parameter {name!r}")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"export_gguf: parameter {name!r} has shape {tuple(state[name].shape)}, "
                             f"config says {shape}")


def _file_array(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> np.ndarray:
    """A llama_pt tensor as the float32 array the GGUF file stores before conversion: vocabulary rows trimmed,
    q and k rows interleaved."""
    t = tensor.detach().to(device="cpu", dtype=torch.float32)
    if name in VOCAB_ROWS:
        t = t[:cfg.vocab_size]
    heads = _heads_of(name, cfg)
    if heads is not None:
        t = interleave_heads(t, heads)
    return t.contiguous().numpy()


def export_gguf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, out: str | Path, tokenizer_path: str | Path,
                gguf_type: str = "f16", name: str = "llama_pt") -> GGUFExport:
    """Write a llama_pt state dict (padded vocabulary, as Llama(cfg) holds it; adapters merged) as a GGUF file.

    `gguf_type` is a key of GGUF_TYPES; `name` goes to general.name.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type {gguf_type!r} is unknown (known: {', '.join(GGUF_TYPES)})")
    requested, file_type = GGUF_TYPES[gguf_type]
    cfg.validate()
    vocab = _vocabulary(Path(tokenizer_path), cfg.vocab_size)
    _check_state(state, cfg)
    names = tensor_names(cfg)

    # Tensor infos first (their byte sizes follow from shapes and types), then each tensor converted and
    # written in turn: gguf.GGUFWriter's streaming order.
    plan = []
    for ours, theirs in names:
        shape = (cfg.vocab_size, cfg.dim) if ours in VOCAB_ROWS else tuple(state[ours].shape)
        plan.append((ours, theirs, shape, tensor_type(shape, requested)))
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _write_metadata(writer, cfg, name, file_type, vocab)
            for _, theirs, shape, qtype in plan:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(theirs, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for ours, _, _, qtype in plan:
                writer.write_tensor_data(gguf.quants.quantize(_file_array(ours, state[ours], cfg), qtype))
        finally:
            writer.close()
    return GGUFExport(out, {theirs: qtype.name.lower() for _, theirs, _, qtype in plan},
                      [theirs for _, theirs, shape, qtype in plan if len(shape) == 2 and qtype != requested],
                      gguf.GGML_QUANT_SIZES[requested][0])


@dataclass
class GGUFContents:
    """A GGUF file read back: its metadata (key -> value), and its tensors under llama_pt names, dequantised to
    float32 with the q/k rows in llama_pt's order, and their GGML types."""
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    types: dict[str, str]


def read_gguf(path: str | Path) -> GGUFContents:
    """Read a file `export_gguf` wrote (gguf.GGUFReader, gguf.quants.dequantize); the vocabulary rows are not
    padded."""
    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    n_heads = metadata["llama.attention.head_count"]
    cfg = ModelConfig(dim=metadata["llama.embedding_length"], n_layers=metadata["llama.block_count"],
                      n_heads=n_heads, n_kv_heads=metadata["llama.attention.head_count_kv"],
                      vocab_size=metadata["llama.vocab_size"])
    ours_of = {theirs: ours for ours, theirs in tensor_names(cfg)}
    tensors, types = {}, {}
    for t in reader.tensors:
        if t.name not in ours_of:
            raise ValueError(f"{path}: tensor {t.name!r} is not one of a llama_pt model")
        ours = ours_of[t.name]
        value = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        heads = _heads_of(ours, cfg)
        tensors[ours] = deinterleave_heads(value, heads) if heads is not None else value
        types[ours] = t.tensor_type.name.lower()
    return GGUFContents(metadata, tensors, types)
