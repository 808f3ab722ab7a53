"""Run under torchrun: the hand-written layer at TP=2 (with and without SP) against autograd and one process.

For each case every rank builds the single-process reference (same seed), then the parallelized model
in each activation mode, runs one step on the same batch and records: loss and every full gradient's
relative error against the reference and against the parallel `none` mode, the bytes one layer saves for
backward in each mode (saved-tensor hooks) next to the formula, the communication counter of the step
per mode, and the timeline of the `selective` backward. The LoRA cases add adapters to the reference and
to the parallel model alike (`with_lora`); their gradients are those of A and B (and of the base where
the case trains it). tests/ops/test_layer_dist.py asserts on it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_pt.adapters.lora import PROJECTIONS, LoRASettings, lora_plan
from llama_pt.model import Llama, ModelConfig
from llama_pt.model.module_plan import apply_module_plan
from llama_pt.blocks.memory import layer_activation_bytes, measure_saved_bytes
from llama_pt.blocks.modes import ACTIVATION_MODES, apply_activation_mode
from llama_pt.config import ParallelConfig
from llama_pt.parallel import (COMM_COUNTER, ParallelState, full_gradients, make_loss_fn, parallelize,
                               record_timeline)
from llama_pt.parallel.timeline import Event

SEQ, BATCH = 64, 2
# name: (sequence_parallel, overlap, n_kv_heads, bf16 autocast)
CASES = {
    "tp2": (False, True, 4, False),
    "tp2_sp": (True, True, 4, False),
    "tp2_sp_gqa": (True, True, 2, False),
    "tp2_sp_kv1": (True, True, 1, False),
    "tp2_kv1_no_overlap": (False, False, 1, False),
    "tp2_sp_no_overlap": (True, False, 2, False),
    "tp2_sp_bf16": (True, True, 2, True),
    "tp2_lora": (False, True, 4, False),
    "tp2_sp_lora": (True, True, 2, False),
    "tp2_sp_kv1_lora": (True, True, 1, False),
    "tp2_kv1_lora_no_overlap": (False, False, 1, False),
    "tp2_sp_lora_trained_base": (True, True, 2, False),
    "tp2_sp_lora_dropout": (True, True, 2, False),
    "tp2_sp_lora_bf16": (True, True, 2, True),
}
# LoRA on all seven projections of every layer (name: dropout, base trained); B is set nonzero.
LORA_RANK, LORA_ALPHA = 8, 16.0
LORA = {
    "tp2_lora": (0.0, False),
    "tp2_sp_lora": (0.0, False),
    "tp2_sp_kv1_lora": (0.0, False),
    "tp2_kv1_lora_no_overlap": (0.0, False),
    "tp2_sp_lora_trained_base": (0.0, True),
    "tp2_sp_lora_dropout": (0.1, False),
    "tp2_sp_lora_bf16": (0.0, False),
}
DROPOUT_SEED = 11  # the random state every forward starts from: every layout draws the same masks


def model_config(n_kv_heads: int) -> ModelConfig:
    # dim 256, 8 heads of 32, SwiGLU hidden 704: small, but every dimension is a real multiple.
    return ModelConfig(dim=256, n_heads=8, n_kv_heads=n_kv_heads, n_layers=2, vocab_size=512, multiple_of=64,
                       max_seq_len=SEQ)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def events_json(events: list[Event]) -> list[dict]:
    return [{"name": e.name, "kind": e.kind, "seq": e.seq, "t": e.time_ns} for e in events]


def with_lora(model: Llama, name: str, pstate: Optional[ParallelState] = None) -> Llama:
    """`model` (built after torch.manual_seed(0), parallelized when pstate is given) with the LoRA of case
    `name`: A as lora_plan initialises it (the same full A in every layout), B nonzero (the same full values,
    this rank's shard of them), the base frozen unless the case trains it."""
    dropout, trained_base = LORA[name]
    apply_module_plan(model, lora_plan(list(PROJECTIONS), LoRASettings(LORA_RANK, LORA_ALPHA, dropout), pstate))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("lora_B"):
                spec = getattr(p, "tp_shard", None)
                shape = list(p.shape)
                if spec is not None:
                    shape[spec.dim] *= spec.chunks
                full = 0.05 * torch.randn(shape, generator=g)
                p.copy_(full if spec is None else spec.take(full))
    for param_name, p in model.named_parameters():
        p.requires_grad_(trained_base or ".adapter." in param_name)
    return model


def run_case(name: str) -> dict:
    sp, overlap, kv, bf16 = CASES[name]
    cfg = model_config(kv)
    pstate = ParallelState(ParallelConfig(tensor_parallel=2, sequence_parallel=sp, overlap=overlap), cfg, SEQ)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    lora = name in LORA

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    torch.manual_seed(0)
    ref = with_lora(Llama(cfg), name) if lora else Llama(cfg)
    torch.manual_seed(DROPOUT_SEED)
    with autocast():
        ref_loss = F.cross_entropy(ref(inputs).float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    out = {"sp": sp, "overlap": overlap, "kv": kv, "bf16": bf16, "modes": {},
           "lora": None if not lora else {"rank": LORA_RANK, "dropout": LORA[name][0], "trained_base": LORA[name][1]}}
    grads_by_mode = {}
    for mode in ACTIVATION_MODES:
        torch.manual_seed(0)
        model = parallelize(Llama(cfg), pstate)
        model = apply_activation_mode(with_lora(model, name, pstate) if lora else model, mode, pstate)
        COMM_COUNTER.reset()
        torch.manual_seed(DROPOUT_SEED)
        with record_timeline() as events:
            with autocast():
                loss = make_loss_fn(pstate)(model(inputs), targets)
            loss.backward()
        comm_summary = {k: [v["calls"], str(v["bytes"])] for k, v in COMM_COUNTER.summary().items()}
        grads = full_gradients(model, pstate)
        grads_by_mode[mode] = grads

        # One layer alone: the bytes it saves for backward, measured and by formula.
        layer = model.layers[0]
        local_seq = SEQ // 2 if sp else SEQ
        x = torch.randn(BATCH, local_seq, cfg.dim, requires_grad=True)
        with autocast():
            _, measured = measure_saved_bytes(lambda: layer(x, model.rope_cos[:SEQ], model.rope_sin[:SEQ]), model)
        adapters = {} if not lora else dict(lora_rank=LORA_RANK, lora_dropout=LORA[name][0] > 0,
                                            trained_base=LORA[name][1])
        formula = layer_activation_bytes(mode, seq=SEQ, batch=BATCH, dim=cfg.dim, ffn_dim=cfg.ffn_hidden_dim,
                                         n_heads=cfg.n_heads, n_kv_heads=kv, tp=2, sequence_parallel=sp,
                                         overlap=overlap, precision="bf16_autocast" if bf16 else "fp32", **adapters)
        out["modes"][mode] = {
            "loss_rel_err": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grad_rel_err_vs_ref": {n: rel_err(g, ref_grads[n]) for n, g in grads.items()},
            "grad_names_match": sorted(grads) == sorted(ref_grads),
            "saved_bytes": measured, "formula_bytes": formula, "comm": comm_summary,
            "timeline": events_json(events) if mode == "selective" else [],
        }
    out["selective_vs_none"] = {n: rel_err(g, grads_by_mode["none"][n]) for n, g in grads_by_mode["selective"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", required=True, choices=sorted(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in args.cases:
        result = run_case(name)
        tmp = args.out / f"{name}.rank{rank}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out / f"{name}.rank{rank}.json")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
