"""Commands on a trained model (MODEL is a checkpoint folder or a Hugging Face folder):
    python -m llama_pt.pretrained export CHECKPOINT OUT_DIR [--dtype bfloat16]     (adapters merged in)
    python -m llama_pt.pretrained export-peft CHECKPOINT OUT_DIR [--dtype float32]  (adapters as a peft folder)
    python -m llama_pt.pretrained sample MODEL --prompt "The" [--tokens 64 --temperature 0.8 --top-p 0.95]
    python -m llama_pt.pretrained perplexity MODEL --manifest held_out.json [--seq-len 2048]
    python -m llama_pt.pretrained resize MODEL NEW.model OUT [--init subtoken_mean] [--base-tokenizer OLD.model]

Arithmetic on weights (.weight_arithmetic; outputs are Hugging Face folders):
    python -m llama_pt.pretrained make-delta BASE TARGET OUT      (Vicuna-style release: BASE + OUT = TARGET)
    python -m llama_pt.pretrained apply-delta BASE DELTA OUT      (TARGET again, bit for bit)
    python -m llama_pt.pretrained average OUT MODEL [MODEL ...] [--weights 1 3 ...]   (a model soup)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..model import Llama
from ..train.checkpoint import CheckpointError
from .loading import export_checkpoint, export_peft_checkpoint, is_hf_folder, load_checkpoint_model, load_hf_model, load_model, tokenizer_of_checkpoint
from .resize import add_resize_parser, resize_command


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


WEIGHT_ARITHMETIC = ("make-delta", "apply-delta", "average")


def _add_weight_arithmetic(sub) -> None:
    make = sub.add_parser("make-delta", help="write TARGET - BASE (a delta folder; apply-delta restores TARGET)")
    make.add_argument("base")
    make.add_argument("target")
    make.add_argument("out_dir")
    apply = sub.add_parser("apply-delta", help="write BASE + DELTA: the target of make-delta, bit for bit")
    apply.add_argument("base")
    apply.add_argument("delta")
    apply.add_argument("out_dir")
    average = sub.add_parser("average", help="write the weighted average of models (a model soup)")
    average.add_argument("out_dir")
    average.add_argument("models", nargs="+")
    average.add_argument("--weights", nargs="+", type=float, default=None,
                         help="one per model, normalised to sum 1 (default: equal)")


def _weight_arithmetic(args) -> Path:
    from .weight_arithmetic import apply_delta, average_models, make_delta
    if args.command == "make-delta":
        return make_delta(args.base, args.target, args.out_dir)
    if args.command == "apply-delta":
        return apply_delta(args.base, args.delta, args.out_dir)
    return average_models(args.out_dir, args.models, args.weights)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_pt.pretrained", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a Hugging Face Llama folder from a checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the training manifest's)")
    export_peft = sub.add_parser("export-peft", help="write an adapter checkpoint's adapters as a peft LoRA folder")
    export_peft.add_argument("checkpoint")
    export_peft.add_argument("out_dir")
    export_peft.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export_peft.add_argument("--base-out", default=None,
                             help="where to write the grown base (runs that used train.init_tokenizer)")
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
    _add_weight_arithmetic(sub)
    add_resize_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command in WEIGHT_ARITHMETIC:
            print(_weight_arithmetic(args))
        elif args.command == "export":
            print(export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.tokenizer))
        elif args.command == "export-peft":
            print(export_peft_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.base_out))
        elif args.command == "sample":
            print(_sample(args))
        elif args.command == "resize":
            print(resize_command(args))
        else:
            print(_perplexity(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

