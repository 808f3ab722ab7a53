"""The plan of a run (memory, step time, communication) and its text report; train.py's start-up check.

    plan = make_plan(run, get_gpu("a100_80gb"), world_size=2048, gpus_per_node=8)
    print(format_report(plan)); plan.fits

    report = check_fits(run, world_size, device)   # in the trainer, before building anything

`run` is the resolved llama_pt.config.RunConfig (or a composed config dict, resolved the same way).
    if not report.fits: raise ConfigError(report.refusal())
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Union

from ..config import ACTIVATION_MODES, ZERO_STAGES, RunConfig, count_parameters
from .hardware import Accelerator, cpu_host, gpu_from_device_name
from .layout import Layout, layout_from_config
from ..adapters.nf4 import NF4_BYTES_PER_PARAMETER
from .memory import STATE_BYTES, MemoryPlan, memory_plan, memory_plans, trainable_parameters
from .throughput import StepTime, step_time

GIB = 1024 ** 3


@dataclass
class Plan:
    layout: Layout
    gpu: Accelerator
    memory: MemoryPlan
    by_zero_stage: dict[int, int]        # peak bytes at each ZeRO stage (others as configured)
    by_activation: dict[str, int]        # peak bytes with each activation mode (others as configured)
    time: Optional[StepTime]             # None when the accelerator has no timing data (CPU, unknown GPU) or
                                         # under PEFT (the time model is full training's)
    stage_peaks: tuple[int, ...] = ()    # peak bytes of each pipeline rank (one entry without PP)

    @property
    def fullest_stage(self) -> int:
        """The pipeline rank whose memory `memory` is (the one with the highest peak)."""
        return max(range(len(self.stage_peaks)), key=self.stage_peaks.__getitem__) if self.stage_peaks else 0

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.gpu.memory_bytes

    def refusal(self) -> str:
        """One line: why the run cannot fit, with the numbers and what would fit instead."""
        mem, gib = self.memory, lambda b: f"{b / GIB:.1f}"  # noqa: E731
        parts = ", ".join(f"{name} {gib(v)}" for name, v in (*mem.states.items(),
                          ("activations", sum(mem.activations.values())), ("buffers", sum(mem.buffers.values()))))
        hints = [f"parallel.zero_stage={s}" for s in ZERO_STAGES
                 if s != self.layout.zero_stage and self.by_zero_stage[s] <= self.gpu.memory_bytes]
        hints += [f"model.activation={a}" for a in ACTIVATION_MODES
                  if a != self.layout.activation and self.by_activation[a] <= self.gpu.memory_bytes]
        tp = "" if self.layout.peft.method == "qlora" else ", raise parallel.tensor_parallel"
        hint = (f"; would fit with {' or '.join(hints)}" if hints else "; no ZeRO stage or activation mode alone "
                f"fits: add GPUs{tp} or lower train.micro_batch_size")
        per = "per process" if self.gpu.key == "cpu" else "per GPU"
        return (f"the run does not fit: predicted peak {gib(mem.peak)} GiB {per} > {gib(self.gpu.memory_bytes)} GiB "
                f"on {self.gpu.name} ({parts} GiB){hint}")

    def to_dict(self) -> dict[str, Any]:
        out = {"gpu": self.gpu.name, "world_size": self.layout.world_size, "fits": self.fits,
               "capacity_bytes": self.gpu.memory_bytes, "peak_bytes": self.memory.peak,
               "states": self.memory.states, "activations": self.memory.activations,
               "buffers": self.memory.buffers, "step_temporaries": self.memory.step_temporaries,
               "by_zero_stage": self.by_zero_stage, "by_activation": self.by_activation}
        if self.layout.pp > 1:
            out.update(pipeline_parallel=self.layout.pp, virtual_stages=self.layout.vp,
                       pipeline_schedule=self.layout.schedule, stage_layers=[s.chunk_layers for s in self.layout.stages],
                       stage_peak_bytes=list(self.stage_peaks), bubble=self.layout.bubble)
        if self.time is not None:
            out.update(step_seconds=self.time.seconds, hidden_seconds=self.time.hidden, step_time=self.time.step,
                       tokens_per_s_per_gpu=self.time.tokens_per_s_per_gpu, mfu=self.time.mfu, hfu=self.time.hfu,
                       tp_bytes_per_step=self.layout.grad_accum * (self.time.tp.forward + self.time.tp.backward),
                       dp_bytes_per_step=self.time.dp.total, p2p_bytes_per_step=self.time.p2p_bytes)
        return out


def make_plan(cfg: Union[RunConfig, Mapping[str, Any]], gpu: Accelerator, world_size: int, gpus_per_node: int,
              device_type: str = "cuda") -> Plan:
    """The plan of the run `cfg` (pipeline parallelism from its parallel.* fields) on world_size GPUs."""
    layout = layout_from_config(cfg, world_size, gpus_per_node, device_type)
    return plan_layout(layout, gpu)


def plan_layout(layout: Layout, gpu: Accelerator) -> Plan:
    """The plan of a layout already built (make_plan, or the search's candidates)."""
    plans = memory_plans(layout, gpu.reserve_bytes)
    memory = max(plans, key=lambda plan: plan.peak)
    by_stage = {s: memory_plan(layout, gpu.reserve_bytes, zero_stage=s).peak for s in (0, 1, 2, 3)}
    by_mode = {a: memory_plan(replace(layout, activation=a), gpu.reserve_bytes).peak for a in ACTIVATION_MODES}
    timing = step_time(layout, gpu) if gpu.has_timing and layout.peft.method == "none" else None
    return Plan(layout, gpu, memory, by_stage, by_mode, timing, tuple(plan.peak for plan in plans))


def check_fits(cfg: Union[RunConfig, Mapping[str, Any]], world_size: int, device, gpus_per_node: Optional[int] = None) -> Plan:
    """The planner's verdict for this process's device (train.py calls it before building anything).

    `device`: a torch.device or name. CUDA: the GPU table entry for the device name, with the memory the
    device reports. CPU: each local process gets its share of the host's memory. gpus_per_node defaults
    to torchrun's LOCAL_WORLD_SIZE.
    """
    import torch
    device = torch.device(device)
    local = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = gpu_from_device_name(torch.cuda.get_device_name(device), props.total_memory)
    else:
        gpu = cpu_host(local)
    return make_plan(cfg, gpu, world_size, local, device.type)


def _table(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label.ljust(width)}  {value}" for label, value in rows]


def _pipeline_lines(plan: Plan) -> list[str]:
    """The stage split, in-flight micro-batches and bubble, and every rank's peak (pipeline parallelism only)."""
    lay = plan.layout
    if lay.pp == 1:
        return []
    v = f" x {lay.vp} chunks" if lay.vp > 1 else ""
    lines = [f"pipeline: {lay.pp} stages{v}, {lay.schedule}, {lay.grad_accum} micro-batches per step: bubble "
             f"{lay.bubble:.1%}; embedding = {lay.embedding_layers:g} layers, head = {lay.head_layers:g} layers "
             f"in the split"]
    for s, peak in zip(lay.stages, plan.stage_peaks):
        ends = (" + embedding" if s.first else "") + (" + head" if s.last else "")
        chunks = "+".join(map(str, s.chunk_layers))
        lines.append(f"  stage {s.rank:3d}: layers {chunks}{ends}, micro-batches in flight "
                     f"{'+'.join(map(str, s.in_flight))}, peak {peak / GIB:.2f} GiB")
    return lines + [""]


def _memory_lines(plan: Plan) -> list[str]:
    lay, mem, gib = plan.layout, plan.memory, lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    psi = trainable_parameters(lay, lay.stages[plan.fullest_stage])
    w, g, o = STATE_BYTES[lay.precision]
    opt = "fp32 master + Adam m, v" if lay.precision == "bf16" else "Adam m, v"
    def sharded(stage: int) -> str:
        return f" / {lay.dp} (ZeRO-{lay.zero_stage})" if lay.zero_stage >= stage and lay.dp > 1 else ""
    if lay.peft.method == "none":
        rows = [(f"weights ({psi / 1e9:.3g}B local parameters x {w} B{sharded(3)})", gib(mem.states["weights"]))]
    else:
        base = (f"NF4 projections {NF4_BYTES_PER_PARAMETER:.4f} B/param, the rest {w} B" if lay.peft.method == "qlora"
                else f"{w} B per parameter")
        saved = "".join(f" + {name}" for name in lay.peft.modules_to_save)
        rows = [(f"frozen base ({base}{sharded(3)})", gib(mem.states["frozen_base"])),
                (f"weights ({psi / 1e6:.1f}M trainable: LoRA r={lay.peft.rank}{saved} x {w} B{sharded(3)})",
                 gib(mem.states["weights"]))]
    rows += [(f"gradients ({g} B{sharded(2)})", gib(mem.states["gradients"])),
            (f"optimizer ({opt}: {o} B{sharded(1)})", gib(mem.states["optimizer"])),
            (f"activations ({lay.activation}, {'in-flight micro-batches' if lay.pp > 1 else 'one micro-batch'} of "
             f"{lay.micro_batch} x {lay.seq_len})",
             gib(sum(mem.activations.values())))]
    rows += [(f"  {name}", gib(v)) for name, v in mem.activations.items()]
    rows += [("temporary buffers", gib(sum(mem.buffers.values())))]
    rows += [(f"  {name}", gib(v)) for name, v in mem.buffers.items()]
    rows += [("peak during forward/backward", gib(mem.train_peak)),
             ("peak during the optimizer step", gib(mem.step_peak) + "  (" + ", ".join(
                 f"{k} {v / GIB:.2f}" for k, v in mem.step_temporaries.items()) + ")"),
             (f"capacity of {plan.gpu.name}", gib(plan.gpu.memory_bytes) + ("  -> fits" if plan.fits else
              "  -> DOES NOT FIT") + f" ({mem.peak / plan.gpu.memory_bytes:.0%} used)")]
    where = f" on pipeline stage {plan.fullest_stage}, the fullest" if lay.pp > 1 else ""
    lines = [f"memory per GPU (GiB){where}"] + _table(rows)
    fit = lambda b: "fits" if b <= plan.gpu.memory_bytes else "no"  # noqa: E731
    lines.append("  peak by ZeRO stage:      " + "   ".join(
        f"{s}: {b / GIB:.1f} ({fit(b)})" for s, b in plan.by_zero_stage.items()))
    lines.append("  peak by activation mode: " + "   ".join(
        f"{a}: {b / GIB:.1f} ({fit(b)})" for a, b in plan.by_activation.items()))
    return lines


def _time_lines(plan: Plan) -> list[str]:
    tm, gpu, lay = plan.time, plan.gpu, plan.layout
    if tm is None:
        if lay.peft.method != "none":
            return [f"step time: not modelled for peft.method={lay.peft.method} (the time model is full training's)"]
        return [f"step time: no prediction for {gpu.name} (no peak FLOP/s and bandwidth table entry)"]
    step = tm.step
    link_bw = {"nvlink": f"NVLink {gpu.nvlink_bw / 1e9:.0f} GB/s x {gpu.nvlink_eff:.2f}",
               "ib": f"InfiniBand {gpu.ib_bw / 1e9:.0f} GB/s x {gpu.ib_eff:.2f}"}
    labels = {"gemm": f"GEMMs ({gpu.gemm_eff:.1%} of {gpu.peak_flops / 1e12:.0f} TFLOP/s)",
              "attention": f"attention kernels ({gpu.attn_eff:.0%} of peak)",
              "elementwise": f"elementwise ops ({gpu.hbm_bw / 1e12:.2f} TB/s x {gpu.hbm_eff:.2f})",
              "optimizer": "optimizer step",
              "tp_comm_exposed": f"TP communication exposed ({link_bw[tm.tp_link]})",
              "dp_comm_exposed": f"DP communication exposed ({link_bw[tm.dp_link]})",
              "p2p_comm_exposed": f"pipeline send/receive ({link_bw.get(tm.p2p_link, '')})",
              "pipeline_bubble": f"pipeline bubble ({tm.bubble:.1%} of the pipelined part)"}
    rows = [(labels[k], f"{v:8.3f} s  {v / step:6.1%}") for k, v in tm.seconds.items()]
    rows.append(("step", f"{step:8.3f} s"))
    k = lay.grad_accum
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    dp_kind = "all-reduce" if lay.zero_stage == 0 else "reduce-scatter"
    tp = (f"TP {gb(k * (tm.tp.forward + tm.tp.backward))} over {tm.tp_link} (forward {gb(k * tm.tp.forward)}, "
          f"exposed; backward {gb(k * tm.tp.backward)}, {tm.hidden['tp_comm']:.3f} s of it hidden behind matmuls)"
          if lay.tp > 1 else "TP none (tensor_parallel=1)")
    dp = (f"DP {gb(tm.dp.total)} over {tm.dp_link}: {tm.dp.reduces} x {dp_kind} {gb(tm.dp.reduce_each)}"
          + (f" + {tm.dp.gathers} x all-gather {gb(tm.dp.gather_each)}" if tm.dp.gathers else "")
          + f"; {tm.hidden['dp_comm']:.3f} s hidden behind backward" if lay.dp > 1 else "DP none (one replica)")
    comm = [f"communication per GPU per step: {tp}", f"  {dp}"]
    if lay.pp > 1:
        comm.append(f"  P2P {gb(tm.p2p_bytes)} over {tm.p2p_link} (activations forward, gradients backward; "
                    f"stage {tm.slowest_stage}, the slowest, paces the pipeline)")
    rows_tp = [f"throughput: {tm.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
               f"{tm.tokens_per_s_per_gpu * lay.world_size:,.0f} tokens/s in all; "
               f"MFU {tm.mfu:.1%} (FLOPs executed, with recomputation and causal skipping: {tm.hfu:.1%} of peak)"]
    return ["step time (one optimizer step)"] + _table(rows) + comm + rows_tp


def format_report(plan: Plan, steps: Optional[int] = None) -> str:
    lay, gpu = plan.layout, plan.gpu
    n = count_parameters(lay.model)
    sp = " + sequence parallel" if lay.sp else ""
    peft = (f"; {lay.peft.method} r={lay.peft.rank} on {' '.join(lay.peft.targets)}" if lay.peft.method != "none"
            else "")
    head = [f"plan: {n / 1e9:.2f}B-parameter LLaMA ({lay.model.n_layers} layers, dim {lay.model.dim}) on "
            f"{lay.nodes} node(s) x {lay.gpus_per_node} = {lay.world_size} x {gpu.name}",
            f"layout: TP {lay.tp}{sp}{' (overlap)' if lay.overlap and lay.tp > 1 else ''} x DP {lay.dp}"
            f"{f' x PP {lay.pp}' if lay.pp > 1 else ''}, "
            f"ZeRO-{lay.zero_stage}, activations {lay.activation}, {lay.precision}; seq {lay.seq_len}, "
            f"micro-batch {lay.micro_batch}, {lay.grad_accum} micro-batches per step, "
            f"{lay.global_batch_tokens:,} tokens per step{peft}", ""]
    lines = head + _pipeline_lines(plan) + _memory_lines(plan) + [""] + _time_lines(plan)
    if steps and plan.time is not None:
        hours = steps * plan.time.step / 3600
        lines.append(f"train.steps={steps:,}: {steps * lay.global_batch_tokens:.3g} tokens in {hours:,.1f} h "
                     f"({hours / 24:.1f} days)")
    return "\n".join(lines)
