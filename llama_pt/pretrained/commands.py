"""Commands on a trained model (MODEL is a checkpoint folder or a Hugging Face folder):
    python -m llama_pt.pretrained export CHECKPOINT OUT_DIR [--dtype bfloat16]
    python -m llama_pt.pretrained sample MODEL --prompt "The" [--tokens 64 --temperature 0.8 --top-p 0.95]
    python -m llama_pt.pretrained perplexity MODEL --manifest held_out.json [--seq-len 2048]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..model import Llama
from ..train.checkpoint import CheckpointError
from .loading import export_checkpoint, is_hf_folder, load_checkpoint_model, load_hf_model, load_model, tokenizer_of_checkpoint


def _model_and_tokenizer(model_path: str, given: Optional[str]) -> tuple[Llama, Path]:
    """The model, and its tokenizer: --tokenizer, else the HF folder's, else the training manifest's."""
    if is_hf_folder(model_path):
        model, found = load_hf_model(model_path), Path(model_path) / "tokenizer.model"
        found = found if found.is_file() else None
    else:
        model, state = load_checkpoint_model(model_path)
        found = tokenizer_of_checkpoint(state)
    tokenizer = Path(given) if given else found
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer found for {model_path}: pass --tokenizer")
    return model, tokenizer


def _sample(args) -> str:
    from ..generate import sample_text
    from ..tokenizer import Tokenizer
    model, tokenizer_path = _model_and_tokenizer(args.model, args.tokenizer)
    return sample_text(model, Tokenizer(tokenizer_path), args.prompt, max_new_tokens=args.tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _perplexity(args) -> str:
    from ..data import load_manifest
    from ..evaluate import evaluate_perplexity
    model = load_model(args.model)
    prefixes = [p for s in load_manifest(args.manifest)["sources"] for p in s["prefixes"]]
    seq_len = args.seq_len or model.cfg.max_seq_len
    result = evaluate_perplexity(model, prefixes, seq_len, args.batch_size, max_batches=args.max_batches)
    return json.dumps(result)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_pt.pretrained", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a Hugging Face Llama folder from a checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the training manifest's)")
    sample = sub.add_parser("sample", help="continue a prompt (temperature + top-p sampling, KV cache)")
    sample.add_argument("model")
    sample.add_argument("--prompt", default="")
    sample.add_argument("--tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-p", type=float, default=0.95)
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--tokenizer", default=None)
    ppl = sub.add_parser("perplexity", help="held-out perplexity over the shards of a manifest")
    ppl.add_argument("model")
    ppl.add_argument("--manifest", required=True)
    ppl.add_argument("--seq-len", type=int, default=None)
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-batches", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            print(export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.tokenizer))
        elif args.command == "sample":
            print(_sample(args))
        else:
            print(_perplexity(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

