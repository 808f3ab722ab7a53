"""The evaluation commands (llama_pt.evaluation):
    python -m llama_pt.pretrained perplexity MODEL --manifest held_out.json [--seq-len 2048]
        (the trainer's held-out loss: consecutive windows over the shards)
    python -m llama_pt.pretrained perplexity MODEL (--text wiki.test.raw | --manifest M) --stride 512 [--seq-len 2048]
        (sliding window, as WikiText is usually scored: Hugging Face's "Perplexity of fixed-length models")
    python -m llama_pt.pretrained eval MODEL --tasks demo_piqa data/eval/demo_arc.yaml llama1_zero_shot [--limit N]
        (lm-evaluation-harness: task files, the tasks of data/eval/, lm-eval's tasks, the LLaMA paper's suites)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path


def add_evaluation_parsers(sub) -> None:
    ppl = sub.add_parser("perplexity", help="perplexity: held-out shards in order, or a sliding window (--stride)")
    ppl.add_argument("model")
    source = ppl.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="a held-out manifest: the tokens of its shards, in order")
    source.add_argument("--text", help="a UTF-8 text file, tokenized with BOS first (needs --stride)")
    ppl.add_argument("--seq-len", type=int, default=None,
                     help="window length (the recipe's max_length); default: the model's max_seq_len")
    ppl.add_argument("--stride", type=int, default=None,
                     help="sliding windows starting every STRIDE tokens, each token scored once")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-batches", type=int, default=None, help="consecutive windows only: stop after N batches")
    ppl.add_argument("--tokenizer", default=None, help="for --text: tokenizer.model (default: the model's)")
    ppl.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks; prints lm-eval's table (acc, acc_norm, ...)")
    ev.add_argument("model")
    ev.add_argument("--tasks", nargs="+", required=True,
                    help="task files (.yaml), tasks of data/eval/, suites (llama1_zero_shot, llama1_closed_book_qa, "
                         "llama1_race, llama1_mmlu, llama1) or lm-eval task names; spaces or commas between them")
    ev.add_argument("--limit", type=int, default=None, help="at most N items per task")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    ev.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on the CPU), float32, bfloat16, float16")
    ev.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the model's)")


def perplexity_command(args) -> str:
    from ..data import load_manifest
    from ..evaluation import evaluate_perplexity, stream_of, strided_perplexity
    from ..evaluation.harness import pick_device
    from ..tokenizer import Tokenizer
    from .loading import load_model, load_model_and_tokenizer
    if args.text and args.stride is None:
        raise ValueError("--text needs --stride (sliding-window perplexity); held-out shards take --manifest")
    if args.stride is not None and args.max_batches is not None:
        raise ValueError("--max-batches is for consecutive windows (no --stride)")
    device = pick_device(args.device)
    if args.text:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
        tokens = Tokenizer(tokenizer).encode(Path(args.text).read_text(encoding="utf-8"), bos=True)
    else:
        model = load_model(args.model, device)
        prefixes = [p for s in load_manifest(args.manifest)["sources"] for p in s["prefixes"]]
    seq_len = args.seq_len or model.cfg.max_seq_len
    if args.stride is None:
        result = evaluate_perplexity(model, prefixes, seq_len, args.batch_size, max_batches=args.max_batches,
                                     device=device)
    else:
        result = strided_perplexity(model, tokens if args.text else stream_of(prefixes), seq_len, args.stride,
                                    args.batch_size, device=device)
    return json.dumps(result)


def eval_command(args) -> str:
    """Every task checked and its data found before the model is loaded; then lm-eval's table per shot count."""
    from lm_eval.utils import make_table

    from ..evaluation.tasks import build_tasks, evaluate_tasks, resolve_names, spec_name, task_manager
    from .lm_eval_model import PretrainedLM
    names = [name for given in args.tasks for name in given.split(",") if name]
    entries = resolve_names(names)
    specs = {spec_name(spec): spec for spec, _ in entries}
    manager = task_manager(list(specs.values()))
    lm_eval_log = logging.getLogger("lm_eval")
    level = lm_eval_log.level
    lm_eval_log.setLevel(logging.ERROR)  # building lm-eval's tasks warns about their metrics' defaults
    try:
        built = dict(zip(specs, build_tasks(list(specs.values()), manager)))
    finally:
        lm_eval_log.setLevel(level)
    lm = PretrainedLM(args.model, args.tokenizer, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    tables = []
    for results in evaluate_tasks(lm, [(built[spec_name(spec)], shots) for spec, shots in entries], manager,
                                  args.limit):
        tables.append(make_table(results))
        if results.get("groups"):
            tables.append(make_table(results, "groups"))
    return "\n".join(tables)
