"""Commands on a trained model (MODEL is a checkpoint folder or a Hugging Face folder):
    python -m llama_pt.pretrained export CHECKPOINT OUT_DIR [--dtype bfloat16]     (adapters merged in)
    python -m llama_pt.pretrained export-peft CHECKPOINT OUT_DIR [--dtype float32]  (adapters as a peft folder)
    python -m llama_pt.pretrained export-gguf MODEL OUT.gguf [--type f16]  (llama.cpp's format; docs/gguf.md)
    python -m llama_pt.pretrained sample MODEL --prompt "The" [--tokens 64 --temperature 0.8 --top-p 0.95]
    python -m llama_pt.pretrained perplexity MODEL --manifest held_out.json [--seq-len 2048] [--stride 512]
    python -m llama_pt.pretrained eval MODEL --tasks demo_piqa llama1_zero_shot [--limit N]   (lm-eval; .evaluation_commands)
    python -m llama_pt.pretrained resize MODEL NEW.model OUT [--init subtoken_mean] [--base-tokenizer OLD.model]

Arithmetic on weights (.weight_arithmetic; outputs are Hugging Face folders):
    python -m llama_pt.pretrained make-delta BASE TARGET OUT      (Vicuna-style release: BASE + OUT = TARGET)
    python -m llama_pt.pretrained apply-delta BASE DELTA OUT      (TARGET again, bit for bit)
    python -m llama_pt.pretrained average OUT MODEL [MODEL ...] [--weights 1 3 ...]   (a model soup)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..gguf_export import GGUF_TYPES
from ..train.checkpoint import CheckpointError
from .loading import export_checkpoint, export_peft_checkpoint, load_model_and_tokenizer
from .evaluation_commands import add_evaluation_parsers, eval_command, perplexity_command
from .chat import add_chat_parser, chat_command
from .resize import add_resize_parser, resize_command


def _sample(args) -> str:
    from ..generate import sample_text
    from ..tokenizer import Tokenizer
    model, tokenizer_path = load_model_and_tokenizer(args.model, args.tokenizer)
    return sample_text(model, Tokenizer(tokenizer_path), args.prompt, max_new_tokens=args.tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _export_gguf(args) -> Path:
    """The model (adapters merged) as a GGUF file; one line on stderr names the weights written in f16 because
    their rows do not fill the requested type's blocks."""
    from ..adapters.lora import merge
    from ..gguf_export import export_gguf
    model, tokenizer_path = load_model_and_tokenizer(args.model, args.tokenizer)
    merge(model)
    result = export_gguf(model.state_dict(), model.cfg, args.out, tokenizer_path, args.type,
                         name=Path(args.model).resolve().name)
    if result.fallbacks:
        print(f"note: {len(result.fallbacks)} weight(s) written as f16, their rows not a multiple of {args.type}'s "
              f"block of {result.block}: {', '.join(result.fallbacks)}", file=sys.stderr)
    return result.path


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
    to_gguf = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp (adapters merged in)")
    to_gguf.add_argument("model")
    to_gguf.add_argument("out")
    to_gguf.add_argument("--type", default="f16", choices=list(GGUF_TYPES),
                         help="type of the 2-D weights (norms stay f32); default f16")
    to_gguf.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the model's, as for sample)")
    sample = sub.add_parser("sample", help="continue a prompt (temperature + top-p sampling, KV cache)")
    sample.add_argument("model")
    sample.add_argument("--prompt", default="")
    sample.add_argument("--tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-p", type=float, default=0.95)
    sample.add_argument("--seed", type=int, default=None)
    sample.add_argument("--tokenizer", default=None)
    add_evaluation_parsers(sub)
    _add_weight_arithmetic(sub)
    add_resize_parser(sub)
    add_chat_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "chat":
            return chat_command(args)
        if args.command in WEIGHT_ARITHMETIC:
            print(_weight_arithmetic(args))
        elif args.command == "export":
            print(export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.tokenizer))
        elif args.command == "export-peft":
            print(export_peft_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.base_out))
        elif args.command == "export-gguf":
            print(_export_gguf(args))
        elif args.command == "sample":
            print(_sample(args))
        elif args.command == "resize":
            print(resize_command(args))
        elif args.command == "perplexity":
            print(perplexity_command(args))
        else:
            print(eval_command(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

