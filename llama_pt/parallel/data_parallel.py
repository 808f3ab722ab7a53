"""Data parallelism and the optimizer step: one interface, two engines.

Per optimizer step the trainer calls, for each of its micro-batches,
``loss = loss_fn(engine.forward(x), y); engine.backward(loss, last=...)``, then ``engine.step(lr)``,
which returns the global gradient norm (before clipping); when that norm is not finite, both engines
skip the update and discard the gradients (llama_pt.train.step_guard builds on this). The engine owns the reduction of the
gradients over the data-parallel (DP) group, clipping by the global norm over TP x DP, and AdamW
(our torch optimizer; its learning rate is set by the trainer every step).

- `PlainDataParallel`: one process, or ``parallel.zero_stage=0``. Every rank holds all optimizer state.
  Each gradient is summed over the DP group by one all-reduce and divided by the DP size. With
  ``parallel.overlap`` the all-reduce of a parameter is issued asynchronously from its post-accumulate
  hook during the LAST micro-batch's backward (gloo and NCCL progress it while backward goes on) and
  waited for in `step`; without, all are issued after backward.
- `ZeroDataParallel` (zero.py): DeepSpeed ZeRO stage 1 or 2.

Global norm: a parameter marked ``tensor_model_parallel`` holds different values on each TP rank and
counts on every rank; a replicated one (norm weights) counts on TP rank 0 only; the squares are summed
over the TP group (DeepSpeed's rule, deepspeed/runtime/utils.py ``is_model_parallel_parameter``). After
the DP reduction the gradients are equal on all DP ranks, so no DP sum is needed; pipeline stages hold
disjoint parameters, so the squares are summed over the PP group too (a NaN on one stage reaches all).
One process (TP and PP size 1) uses torch.nn.utils.clip_grad_norm_ itself.

Checkpoint access: `state_tensors()` returns {"model": {name: tensor}, "optim": {name: {"step",
"exp_avg", "exp_avg_sq"}}} with the rank's TP shard of every parameter, unpartitioned over DP, keyed
by the full parameter name; `load_state_tensors(tensors)` writes such a dict back.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .state import ParallelState

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the AdamW state torch would create at the first step (zero moments, step 0) where missing.

    Done eagerly so checkpoints can be read and written before any step; AdamW skips its own
    initialisation for parameters that already have state, so the updates are unchanged.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the parameters that train (requires_grad), in module order."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def counted_in_norm(param: torch.nn.Parameter, pstate: ParallelState) -> bool:
    """Whether this rank's copy of `param` is part of the global gradient norm (counted once over TP)."""
    return bool(getattr(param, "tensor_model_parallel", False)) or pstate.tp_rank == 0


def global_grad_norm(params: list[torch.nn.Parameter], pstate: ParallelState) -> torch.Tensor:
    """L2 norm of the full model's gradient, from this rank's shards (call on every TP rank)."""
    grads = [p.grad for p in params if p.grad is not None and counted_in_norm(p, pstate)]
    device = params[0].device
    sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum() \
        if grads else torch.zeros((), device=device)
    if pstate.tp_size > 1:
        dist.all_reduce(sq, group=pstate.tp_group)
    if pstate.pp_size > 1:  # every stage holds other parameters: their squares add up
        dist.all_reduce(sq, group=pstate.pp_group)
    return sq.sqrt()


def clip_by_global_norm(params: list[torch.nn.Parameter], max_norm: float, pstate: ParallelState) -> torch.Tensor:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad_norm_'s rule); return the norm."""
    if pstate.tp_size == 1 and pstate.pp_size == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    norm = global_grad_norm(params, pstate)
    if max_norm:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return norm


class PlainDataParallel:
    """All-reduce data parallelism (or one process) around a model and a torch optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, pstate: ParallelState,
                 grad_accumulation: int, grad_clip: float, overlap: bool):
        self.module, self.optimizer, self.pstate = model, optimizer, pstate
        self.grad_accumulation, self.grad_clip = grad_accumulation, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.overlap = overlap and pstate.dp_size > 1
        self._last_micro_batch = False
        self._pending: list[tuple[torch.Tensor, Any]] = []
        self._reduced = True
        init_adamw_state(optimizer)
        if self.overlap:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._reduce_async)

    def _reduce_async(self, param: torch.nn.Parameter) -> None:
        if self._last_micro_batch:
            self._pending.append((param.grad, dist.all_reduce(param.grad, group=self.pstate.dp_group,
                                                              async_op=True)))

    def forward(self, inputs: torch.Tensor, **layout) -> torch.Tensor:
        """The model's logits; `layout`: its positions and documents (llama_pt.model.Llama.forward), if any."""
        return self.module(inputs, **layout)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's mean loss, scaled by 1 / (micro-batches per step)."""
        self._last_micro_batch, self._reduced = last, False
        try:
            (loss / self.grad_accumulation).backward()
        finally:
            self._last_micro_batch = False

    def backward_from(self, output: torch.Tensor, grad: torch.Tensor, last: bool) -> None:
        """Backward of a pipeline stage's output from its gradient, sent by the next stage (already scaled by
        1 / (micro-batches per step) there: llama_pt.parallel.pipeline.schedules)."""
        self._last_micro_batch, self._reduced = last, False
        try:
            torch.autograd.backward(output, grad)
        finally:
            self._last_micro_batch = False

    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over the DP group (waits for the overlapped all-reduces)."""
        if self._reduced:
            return
        dp = self.pstate.dp_size
        if dp > 1:
            if not self.overlap:
                self._pending = [(p.grad, dist.all_reduce(p.grad, group=self.pstate.dp_group, async_op=True))
                                 for p in self.params if p.grad is not None]
            for grad, work in self._pending:
                work.wait()
                grad.div_(dp)
            self._pending = []
        self._reduced = True

    def discard_gradients(self) -> None:
        """Make this step's update skip: the reduced gradients turn non-finite, so the global norm does
        (summed over TP and the pipeline's stages, every rank skips). Call after the last backward."""
        self.reduce_gradients()
        for p in self.params:
            if p.grad is not None:
                p.grad.fill_(math.nan)

    def local_gradients(self) -> dict[str, torch.Tensor]:
        """{name: DP-reduced gradient of this rank's TP shard} (call between the last backward and step)."""
        self.reduce_gradients()
        return {n: p.grad for n, p in self.module.named_parameters() if p.grad is not None}

    def step(self, lr: float) -> float:
        """Reduce, clip, update; a non-finite global norm discards the gradients instead (no update,
        the moments and AdamW's step count unchanged), as DeepSpeed does under ZeroDataParallel."""
        self.reduce_gradients()
        norm = float(clip_by_global_norm(self.params, self.grad_clip, self.pstate))
        if math.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ---- checkpoint access -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Any]:
        """The live tensors of what trains (frozen parameters, e.g. a LoRA base, are not part of it): DCP
        saves from them and loads into them in place."""
        named = trainable_parameters(self.module)
        return {"model": {name: p.detach() for name, p in named.items()},
                "optim": {name: self.optimizer.state[p] for name, p in named.items()}}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        live = self.state_tensors()
        with torch.no_grad():
            for name, value in tensors["model"].items():
                if value is not live["model"][name]:
                    live["model"][name].copy_(value)
            for name, state in tensors["optim"].items():
                for key, value in state.items():
                    if value is not live["optim"][name][key]:
                        live["optim"][name][key].copy_(value)

    def close(self) -> None:
        """Release resources (none here; ZeroDataParallel removes DeepSpeed's hooks)."""
