"""DeepSpeed ZeRO stage 1 and 2 over the data-parallel group (Rajbhandari et al. 2020, Sec. 5.1-5.2).

`ZeroDataParallel` gives `deepspeed.initialize` our (tensor-parallel) model, our torch AdamW (so no
fused-Adam JIT build), and our ParallelState as `mpu`: DeepSpeed then partitions the optimizer state
(stage 1) and the gradients (stage 2) over `mpu.get_data_parallel_group()`, and clips by the global
norm over DP and TP (`mpu.get_model_parallel_group()`, counting parameters by their
`tensor_model_parallel` mark). Its micro-batch size and gradient accumulation are ours; the learning
rate is ours too (set on the optimizer's groups before the step that uses it; DeepSpeed has no scheduler).

Precision: ``bf16=True`` (the GPU default) is DeepSpeed's bf16 mode: the model's weights and gradients
in bf16, fp32 master weights and moments in the partitioned optimizer, gradient accumulation in fp32.
On CPU the run is fp32 throughout.

What DeepSpeed 0.19 sends over the DP group (runtime/zero/stage_1_and_2.py; docs/parallelism.md
has the formulas the tests check): gradients are copied into buckets of `parallel.bucket_size`
elements and each full bucket is ALL-REDUCED (averaged) over DP - with the default
``use_multi_rank_bucket_allreduce`` even the reduce-scatter path ends in an all-reduce; each rank
then keeps its partition. Stage 2 does that during every micro-batch's backward (gradient hooks),
stage 1 once per step: after the last backward, or, with ``overlap_comm``, in the hooks of the last
backward. After the update, each parameter group's flat fp32 (or bf16) buffer is all-gathered.
``overlap_comm`` moves the bucket reductions to a side CUDA stream; on CPU there are no streams and
DeepSpeed's collectives block, so there it only changes when they are issued.

Checkpoints (`partition_fragments`) hold what each rank owns, with no communication: DeepSpeed links
every parameter to its share of the rank's flat fp32 partition (deepspeed/utils/tensor_fragment.py:
``param._hp_mapping``, a ``tensor_fragment`` set up by ``link_hp_params`` in
runtime/zero/stage_1_and_2.py ``_link_all_hp_params``, BF16_Optimizer likewise). Its
``lp_fragment_address`` (start, numel) is the range of the flattened (TP-local) parameter in this
partition, ``get_hp_fragment()`` the fp32 master values of that range and ``get_hp_fragment(key)`` the
Adam moment's (views of the flat partition and of AdamW's state for it). Those ranges, keyed by full
parameter name, become chunks of the global tensors (checkpoint_layout.py, fragment_tensor.py), so
the checkpoint loads at any TP/DP layout, with or without ZeRO. Loading reads into the same views in
place, then `load_partition_fragments` sets AdamW's step and refreshes the model's weights from the
fp32 partitions with DeepSpeed's ``update_lp_params`` (one all-gather per parameter group, as after a
step). `state_tensors` / `load_state_tensors` give and take whole TP shards instead, assembled by
DeepSpeed's per-parameter API (deepspeed.utils.safe_get_full_fp32_param, safe_get_full_optimizer_state
and their setters: an all-reduce over DP per tensor), for inspection and tests.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from ..config import ParallelConfig
from .data_parallel import ADAM_KEYS, init_adamw_state, trainable_parameters
from .fragment_tensor import FlatFragment
from .state import ParallelState


def skip_shm_comm_op_build() -> None:
    """The one place DeepSpeed is patched. DeepSpeed's TorchBackend JIT-compiles a shared-memory
    all-reduce kernel when it starts (50-100 s on CPU), used only by inference_all_reduce; training
    never calls it. Make `build_shm_op` return None, DeepSpeed's own answer when the op is unavailable.
    (`import deepspeed.comm.torch as m` would bind the `torch` attribute of deepspeed.comm, hence sys.modules.)"""
    import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch in sys.modules)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def deepspeed_config(pcfg: ParallelConfig, micro_batch: int, grad_accumulation: int, dp_size: int,
                     grad_clip: float, bf16: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accumulation,
        "train_batch_size": micro_batch * grad_accumulation * dp_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": pcfg.zero_stage, "overlap_comm": pcfg.overlap,
                              "contiguous_gradients": pcfg.overlap, "reduce_scatter": True,
                              "reduce_bucket_size": pcfg.bucket_size, "allgather_bucket_size": pcfg.bucket_size},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


class ZeroDataParallel:
    """The data-parallel engine of llama_pt.parallel.data_parallel, implemented by DeepSpeed ZeRO."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, pstate: ParallelState,
                 micro_batch: int, grad_accumulation: int, grad_clip: float, bf16: bool):
        if pstate.config.zero_stage not in (1, 2):
            raise ValueError(f"ZeroDataParallel needs parallel.zero_stage 1 or 2, not {pstate.config.zero_stage}")
        skip_shm_comm_op_build()
        import deepspeed
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        config = deepspeed_config(pstate.config, micro_batch, grad_accumulation, pstate.dp_size, grad_clip, bf16)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                 mpu=pstate, dist_init_required=False)
        self.module, self.pstate, self.grad_accumulation = self.engine.module, pstate, grad_accumulation
        # Moments exist from the start (as after torch's lazy init), so checkpoints can be read into them;
        # DeepSpeed links each parameter's fragment of them once (its private lazy-link step).
        init_adamw_state(self.optimizer.optimizer)
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def forward(self, inputs: torch.Tensor, **layout) -> torch.Tensor:
        return self.engine(inputs, **layout)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """DeepSpeed scales by 1 / gradient_accumulation_steps and reduces (stage 2: every micro-batch)."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # off the accumulation boundary DeepSpeed only counts the micro-step

    def backward_from(self, output: torch.Tensor, grad: torch.Tensor, last: bool) -> None:
        """Backward of a pipeline stage's output from the gradient the next stage sent (scaled there already):
        DeepSpeed's backward of the scalar sum(output * grad), whose gradient with respect to the output is
        `grad` exactly, unscaled (scale_wrt_gas=False)."""
        self.engine.backward((output * grad).sum(), scale_wrt_gas=False)
        if not last:
            self.engine.step()

    def discard_gradients(self) -> None:
        """Make this step's update skip on every rank: the reduced gradient partitions turn non-finite, so the
        global norm does and DeepSpeed skips the update (call after the last backward)."""
        for grads in self.optimizer.averaged_gradients.values():
            for g in grads if isinstance(grads, list) else [grads]:
                g.fill_(float("nan"))

    def reduce_gradients(self) -> None:
        """DeepSpeed has reduced them by the end of the last backward."""

    def local_gradients(self) -> dict[str, torch.Tensor]:
        """{name: DP-reduced gradient of this rank's TP shard}, assembled from the ZeRO partitions."""
        from deepspeed.utils import safe_get_full_grad
        return {n: safe_get_full_grad(p).clone() for n, p in self.module.named_parameters()}

    def step(self, lr: float) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("ZeroDataParallel.step: DeepSpeed is not at a gradient accumulation boundary "
                               "(each step must have exactly gradient_accumulation_steps micro-batches)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # DeepSpeed skips the update itself when the global norm is not finite
        return float(self.engine.get_global_grad_norm())

    # ---- checkpoint access -------------------------------------------------------------------
    def _step_count(self) -> torch.Tensor:
        steps = {float(s["step"]) for s in self.optimizer.optimizer.state.values()}
        if len(steps) != 1:
            raise RuntimeError(f"optimizer groups disagree on the step count: {sorted(steps)}")
        return torch.tensor(steps.pop())

    def partition_fragments(self) -> dict[str, Any]:
        """{"model": {name: FlatFragment}, "optim": {name: {"step": tensor, "exp_avg": FlatFragment,
        "exp_avg_sq": FlatFragment}}}: the range of each flattened (TP-local) parameter that this rank's
        ZeRO partition holds, as views of the fp32 master weights and moments (empty where it holds none)."""
        step = float(self._step_count())
        model, optim = {}, {}
        for name, p in trainable_parameters(self.module).items():
            mapping = p._hp_mapping  # set by DeepSpeed for every parameter of its groups; None: not in this partition
            if mapping is None:
                empty = FlatFragment(0, torch.empty(0, dtype=torch.float32, device=p.device))  # fp32 as the partitions
                model[name], moments = empty, dict.fromkeys(ADAM_KEYS, empty)
            else:
                start = mapping.lp_fragment_address.start
                model[name] = FlatFragment(start, mapping.get_hp_fragment())
                moments = {k: FlatFragment(start, mapping.get_hp_fragment(k)) for k in ADAM_KEYS}
            optim[name] = {"step": torch.tensor(step), **moments}
        return {"model": model, "optim": optim}

    def load_partition_fragments(self, tensors: dict[str, Any]) -> None:
        """After a load into `partition_fragments()`'s views: AdamW's step from the checkpoint, and the
        model's weights from the fp32 partitions (DeepSpeed's update_lp_params: an all-gather per group)."""
        steps = {float(s["step"]) for s in tensors["optim"].values()}
        if len(steps) != 1:
            raise ValueError(f"checkpoint parameters disagree on the optimizer step count: {sorted(steps)}")
        step = steps.pop()
        for state in self.optimizer.optimizer.state.values():
            state["step"].fill_(step)
        self.optimizer.update_lp_params()

    def state_tensors(self) -> dict[str, Any]:
        """Whole TP shards assembled from the DP partitions (a collective over DP per tensor: call on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        model, optim = {}, {}
        for name, p in trainable_parameters(self.module).items():
            model[name] = safe_get_full_fp32_param(p)
            optim[name] = {"step": self._step_count(),
                           **{k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}}
        return {"model": model, "optim": optim}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        """Write fp32 master weights, moments and the step into the partitions, and the weights into the model."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        steps = {float(s["step"]) for s in tensors["optim"].values()}
        if len(steps) != 1:
            raise ValueError(f"checkpoint parameters disagree on the optimizer step count: {sorted(steps)}")
        step = steps.pop()
        with torch.no_grad():
            for name, p in trainable_parameters(self.module).items():
                master = tensors["model"][name]
                safe_set_full_fp32_param(p, master)
                for key in ADAM_KEYS:
                    safe_set_full_optimizer_state(p, tensors["optim"][name][key], key)
                p.data.copy_(master)  # every DP rank holds the whole (TP-local) weight in ZeRO 1 and 2
            for state in self.optimizer.optimizer.state.values():
                state["step"].fill_(step)

    def close(self) -> None:
        self.engine.destroy()
