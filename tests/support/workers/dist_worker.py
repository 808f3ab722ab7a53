"""Run under torchrun: parallel model vs. a single-process reference computed in the same process.

Each rank builds the reference Llama (same seed on every rank) and the parallelized copy, runs one
forward/backward step on the same global batch (split over data-parallel ranks), and writes
<out>/<case>.rank<r>.json: loss, per-parameter gradient relative errors, logits errors, float64 forward
errors, state-dict round trips, the communication counter, and the recorded timeline of the step.
tests/parallel/test_parallel_dist.py launches it and makes the assertions.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_pt.model import Llama, ModelConfig
from llama_pt.config import ParallelConfig
from llama_pt.parallel import (COMM_COUNTER, ParallelState, full_gradients, full_state_dict,
                               gather_logits, load_full_state_dict, make_loss_fn, parallelize, record_timeline,
                               write_chrome_trace)

SEQ, GLOBAL_BATCH = 16, 4
MARKS = ("tensor_model_parallel", "sequence_parallel", "kv_replicated")
# name: (tensor_parallel, sequence_parallel, overlap, n_kv_heads, bf16 autocast)
CASES = {
    "tp2": (2, False, True, 2, False),
    "tp2_no_overlap": (2, False, False, 2, False),
    "tp2_sp": (2, True, True, 2, False),
    "tp2_sp_no_overlap": (2, True, False, 2, False),
    "tp2_kv1": (2, False, True, 1, False),
    "tp2_sp_kv1": (2, True, False, 1, False),
    "tp4_sp_kv2": (4, True, True, 2, False),
    "tp2_sp_bf16": (2, True, True, 2, True),
    "tp2_vocab500": (2, False, True, 2, False),
}
# Cases with a vocabulary that is padded (500 -> 512): the last rank's slice ends in 12 padding ids.
VOCAB = {"tp2_vocab500": 500}


def model_config(n_kv_heads: int, vocab_size: int = 512) -> ModelConfig:
    return ModelConfig(dim=64, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2, vocab_size=vocab_size, multiple_of=32,
                       max_seq_len=64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def members(group) -> list[int]:
    """Global ranks of a group, in group-rank order, as the group itself reports them (None: this rank)."""
    if group is None:
        return [dist.get_rank()]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, dist.get_rank(), group=group)
    return out


def describe(pstate: ParallelState, model: torch.nn.Module) -> dict:
    """The mpu's answers, the groups' real members, local shapes and parameter marks."""
    return {
        "mpu": {"tp_rank": pstate.get_tensor_model_parallel_rank(), "dp_rank": pstate.get_data_parallel_rank(),
                "tp_size": pstate.get_model_parallel_world_size(), "dp_size": pstate.get_data_parallel_world_size(),
                "dp_ranks": pstate.get_data_parallel_group_ranks(),
                "src": pstate.get_tensor_model_parallel_src_rank(),
                "tp_members": members(pstate.get_tensor_model_parallel_group()),
                "dp_members": members(pstate.get_data_parallel_group()),
                "kv_members": members(pstate.kv_replica_group)},
        "local_shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "marks": {n: [bool(getattr(p, a, False)) for a in MARKS] for n, p in model.named_parameters()},
    }


def average_over_dp(model: torch.nn.Module, loss: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """Plain data parallelism (ZeRO comes from DeepSpeed): mean loss and gradients over the DP group."""
    loss = loss.detach().clone()
    for tensor in [loss] + [p.grad for p in model.parameters()]:
        dist.all_reduce(tensor, group=pstate.dp_group)
        tensor /= pstate.dp_size
    return loss


def float64_forward(cfg: ModelConfig, pstate: ParallelState, inputs, targets) -> dict:
    torch.manual_seed(0)
    ref = Llama(cfg).double()
    torch.manual_seed(0)
    model = parallelize(Llama(cfg).double(), pstate)
    with torch.no_grad():
        want, local = ref(inputs), model(inputs)
        got = gather_logits(local, pstate)
        loss = make_loss_fn(pstate)(local, targets)
        want_loss = F.cross_entropy(want[..., :cfg.vocab_size].reshape(-1, cfg.vocab_size), targets.reshape(-1))
    return {"fp64_logits_max_abs_err": (got - want).abs().max().item(),
            "fp64_loss_abs_err": abs(loss.item() - want_loss.item())}


def run_case(name: str, out: Path) -> dict:
    t, sp, overlap, kv, bf16 = CASES[name]

    def autocast():  # forward only; backward runs outside autocast, as in training
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    cfg = model_config(kv, VOCAB.get(name, 512))
    pstate = ParallelState(ParallelConfig(tensor_parallel=t, sequence_parallel=sp, overlap=overlap), cfg, SEQ)
    tokens = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    b = GLOBAL_BATCH // pstate.dp_size
    rows = slice(pstate.dp_rank * b, (pstate.dp_rank + 1) * b)

    # Single-process reference on the whole global batch.
    torch.manual_seed(0)
    ref = Llama(cfg)
    init_state = {k: v.clone() for k, v in ref.state_dict().items()}
    with autocast():
        ref_logits = ref(inputs)
        # The first vocab_size logits alone: the padding ids are left out by truncation, not by the mask.
        ref_loss = F.cross_entropy(ref_logits[..., :cfg.vocab_size].reshape(-1, cfg.vocab_size).float(),
                                   targets.reshape(-1))
    ref_loss.backward()

    torch.manual_seed(0)
    model = parallelize(Llama(cfg), pstate)
    result = {"tp": t, "dp": pstate.dp_size, "sp": sp, "overlap": overlap, "kv": kv, "bf16": bf16, "batch": b,
              "vocab": cfg.vocab_size, "padded_vocab": cfg.padded_vocab_size,
              "seq": SEQ, "dim": cfg.dim, "ffn_hidden": cfg.ffn_hidden_dim, "n_layers": cfg.n_layers,
              "head_dim": cfg.head_dim, "kv_replicas": pstate.kv_replicas, **describe(pstate, model)}
    result["state_dict_exact"] = all(torch.equal(v, init_state[k]) for k, v in full_state_dict(model, pstate).items())

    loss_fn = make_loss_fn(pstate)
    COMM_COUNTER.reset()
    with record_timeline() as events:
        with autocast():
            logits = model(inputs[rows])
            loss = loss_fn(logits, targets[rows])
        loss.backward()
    result["comm"] = {k: {"calls": v["calls"], "bytes": str(v["bytes"])} for k, v in COMM_COUNTER.summary().items()}
    result["timeline"] = str(out / f"timeline_{name}_rank{pstate.rank}.json")
    write_chrome_trace(events, result["timeline"], pid=pstate.rank)

    global_loss = average_over_dp(model, loss, pstate) if pstate.dp_size > 1 else loss.detach()
    result["loss"], result["ref_loss"] = global_loss.item(), ref_loss.item()
    result["loss_rel_err"] = abs(global_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    result["logits_rel_err"] = rel_err(gather_logits(logits.detach(), pstate), ref_logits[rows].detach())
    grads = full_gradients(model, pstate)
    ref_params = dict(ref.named_parameters())
    result["grad_rel_err"] = {n: rel_err(g, ref_params[n].grad) for n, g in grads.items()}
    result["grad_names_match"] = sorted(grads) == sorted(ref_params)

    # Loading a full state dict into a differently initialised parallel model gives the same shards.
    torch.manual_seed(123)
    other = parallelize(Llama(cfg), pstate)
    load_full_state_dict(other, init_state)
    result["load_roundtrip_exact"] = all(torch.equal(v, init_state[k])
                                         for k, v in full_state_dict(other, pstate).items())
    result.update(float64_forward(cfg, pstate, inputs[rows], targets[rows]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", required=True, choices=sorted(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in args.cases:
        result = run_case(name, args.out)
        tmp = args.out / f"{name}.rank{rank}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out / f"{name}.rank{rank}.json")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
