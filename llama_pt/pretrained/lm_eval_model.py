"""lm-evaluation-harness's model "llama_pt": a checkpoint folder or a Hugging Face folder, with our tokenizer.

Importing this module registers it; then, in Python,
    lm_eval.simple_evaluate(model="llama_pt", model_args="pretrained=runs/demo/hf,dtype=float32", tasks=[...])
runs lm-eval's tasks on it, as `python -m llama_pt.pretrained eval` does (llama_pt.evaluation.harness has
how requests become tokens and scores).
"""
from __future__ import annotations

from typing import Optional

import torch
from lm_eval.api.registry import register_model

from ..evaluation.harness import LlamaPtLM, pick_device
from ..tokenizer import Tokenizer
from .loading import _DTYPES, load_model_and_tokenizer


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on a GPU, float32 on the CPU; else float32, bfloat16 or float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is none of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@register_model("llama_pt")
class PretrainedLM(LlamaPtLM):
    """`pretrained`: a checkpoint folder (adapters left unmerged, as trained) or a Hugging Face folder; its
    tokenizer from `tokenizer`, else the folder's, else the training manifest's. `device`: auto (a CUDA GPU
    when torch sees one), cpu, cuda, cuda:N; `dtype`: auto (bf16 on a GPU, fp32 on the CPU) or a name."""

    def __init__(self, pretrained: str, tokenizer: Optional[str] = None, device: str = "auto",
                 dtype: str = "auto", batch_size: int | str = 8, max_length: Optional[int] = None):
        where = pick_device(device)
        model, tokenizer_path = load_model_and_tokenizer(pretrained, tokenizer, where)
        for p in model.parameters():  # the weights in dtype; the RoPE tables (buffers) stay float32
            p.data = p.data.to(pick_dtype(dtype, where))
        super().__init__(model, Tokenizer(tokenizer_path), batch_size,
                         max_length=None if max_length is None else int(max_length))
