"""Predicted step time, tokens/s/GPU and MFU from FLOPs, bytes and bandwidths (docs/planner.md, "Step time").

One optimizer step on one GPU = k micro-batches of forward + backward, then the optimizer:

    step = k (t_fwd + t_bwd + TP comm exposed) + DP comm exposed + t_optimizer

- GEMMs: 6 FLOPs per local linear weight per token (2 forward, 4 backward), at peak x gemm_eff;
  `full` recomputation adds the layers' forward again (2 per weight per token).
- Attention: fused causal kernels skip the masked half and recompute the scores in backward
  (Dao et al. 2022): forward 2 s h_l, backward 5 s h_l FLOPs per token per layer (h_l: this rank's
  query width), at peak x attn_eff; `full` adds the forward once more. The model FLOPs used for MFU
  keep the conventional 12 L h s (llama_pt.model.flops_per_token).
- Elementwise ops (RMSNorm, residual adds, RoPE, SiLU x gate, the loss softmax) are memory-bound:
  their bytes at HBM bandwidth x hbm_eff; backward moves twice the forward's bytes; `selective`
  recomputes the norms, RoPE and SiLU x gate (the hand-written layer), `full` the whole forward.
- The optimizer step reads and writes 28 bytes per parameter of this rank's optimizer shard.
- TP communication (NVLink within a node): the forward's collectives are on the critical path; in
  backward, with parallel.overlap, each column group's re-gather hides behind its input-gradient
  matmul and the reduction of its input gradient behind its weight-gradient matmul, and only the
  excess is exposed; the duals of forward reduce-scatters stay exposed. Without overlap all is exposed.
- DP communication (InfiniBand across nodes, NVLink on one node): a gradient reduction overlaps the
  backward of its micro-batch (DeepSpeed's overlap_comm; the last one under ZeRO-0/1, each under
  ZeRO-2/3); ZeRO-1/2's all-gather of the updated weights after the step is exposed; ZeRO-3's
  all-gathers hide behind the forward and backward they prefetch for.

Pipeline parallelism (Narayanan et al. 2021, Sec. 2.2 and 3.3; docs/planner.md "Pipeline parallelism"):
the ranks of a pipeline move in lock step, so the slowest stage paces it. One micro-batch's slot on a rank is
its compute and exposed TP communication plus its point-to-point sends, which Megatron's 1F1B schedule runs
between compute steps, not beside them; a step runs m slots of the slowest stage plus the fill and drain:

    step = (m + (p-1)/V) x slot_max + DP exposed + t_optimizer  =  m slot_max / (1 - bubble) + ...

with the bubble (p-1)/(V m + p - 1) (pipeline.bubble_fraction). The data-parallel reduction of each stage's
gradients overlaps that stage's last backward, as above; the step waits for the slowest stage's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import flops_per_token
from .comm import DPVolume, TPVolume, dp_link, dp_volume, p2p_volume, tp_link, tp_volume
from .hardware import Accelerator
from .layout import Layout
from .memory import local_parameters
from .pipeline import Stage, p2p_link, whole_model

OPTIMIZER_BYTES_PER_PARAM = 28  # read grad (2) + master r/w (8) + two moments r/w (16) + write weight (2)


@dataclass
class StepTime:
    seconds: dict[str, float]       # exposed time per part; they add up to the step
    hidden: dict[str, float]        # communication time overlapped with computation
    tp: TPVolume                    # of the slowest pipeline stage (the whole model without PP)
    dp: DPVolume                    # of the stage whose data-parallel step is slowest
    tp_link: str
    dp_link: str
    model_flops_per_gpu: float      # per step, what MFU counts
    executed_flops_per_gpu: float   # per step, including recomputation and the kernels' real work
    tokens_per_step: int
    world_size: int
    peak: float
    p2p_bytes: float = 0.0          # per step, sent by one GPU of the slowest stage to its neighbour stages
    p2p_link: str = "none"
    bubble: float = 0.0             # the schedule's idle share of the pipelined part of the step
    slowest_stage: int = 0          # the pipeline rank that paces the step

    @property
    def step(self) -> float:
        return sum(self.seconds.values())

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / (self.step * self.world_size)

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / (self.step * self.peak)

    @property
    def hfu(self) -> float:
        return self.executed_flops_per_gpu / (self.step * self.peak)


def _local_widths(layout: Layout) -> tuple[int, int, int, int]:
    """This rank's query width, kv width, SwiGLU width and vocabulary slice."""
    m, t = layout.model, layout.tp
    kv_local = m.kv_heads // t if m.kv_heads >= t else 1
    return (m.n_heads // t) * m.head_dim, kv_local * m.head_dim, m.ffn_hidden_dim // t, m.padded_vocab_size // t


def elementwise_bytes_per_token(layout: Layout, stage: Optional[Stage] = None) -> dict[str, float]:
    """HBM bytes per token of the memory-bound ops, forward / backward / recomputation, on one GPU of
    pipeline `stage` (the whole model by default)."""
    m, t = layout.model, layout.tp
    stage = stage or whole_model(m.n_layers)
    r, e = (4, 2) if layout.precision == "bf16" else (4, 4)
    q_l, k_l, f_l, v_l = _local_widths(layout)
    rows = m.dim / t if layout.sp else m.dim         # residual-stream elements per token on this rank
    norms = 2 * (3 * r + e) * rows                     # read x, write y, cast y to the matmul dtype
    residual = 2 * (2 * r + e) * rows                  # read x and the linear output, write the sum
    rope = 2 * e * (q_l + k_l)                          # q and k: read and write
    swiglu = 5 * e * f_l                                # silu(a): read, write; silu(a) * u: read 2, write
    head = ((3 * r + e) * rows + (e + 4 + 4) * v_l) * stage.last  # final norm; logits cast to fp32, softmax
    L = stage.layers
    forward = L * (norms + residual + rope + swiglu) + head
    recompute = {"none": 0.0, "selective": L * (norms + rope + swiglu),
                 "full": L * (norms + residual + rope + swiglu)}[layout.activation]
    return {"forward": forward, "backward": 2 * forward, "recompute": recompute}


@dataclass
class MicroBatchTime:
    """One micro-batch's forward + backward on one GPU of a pipeline stage, in seconds."""
    gemm: float
    attention: float
    elementwise: float
    t_fwd: float              # the forward's compute: what ZeRO-3's gather can hide behind
    t_bwd: float              # the backward's compute: what a gradient reduction can hide behind
    tp_exposed: float
    tp_hidden: float
    p2p: float                # point-to-point sends, not overlapped (Megatron's 1F1B)
    executed_flops: float
    tp: TPVolume

    @property
    def slot(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.tp_exposed + self.p2p


def micro_batch_time(layout: Layout, gpu: Accelerator, stage: Stage) -> MicroBatchTime:
    m, t, T = layout.model, layout.tp, layout.micro_tokens
    q_l, k_l, f_l, v_l = _local_widths(layout)
    gemm_rate, attn_rate = gpu.peak_flops * gpu.gemm_eff, gpu.peak_flops * gpu.attn_eff
    hbm = gpu.hbm_bw * gpu.hbm_eff
    bw = {"nvlink": gpu.nvlink_bw * gpu.nvlink_eff, "ib": gpu.ib_bw * gpu.ib_eff}
    L = stage.layers

    # ---- compute ---------------------------------------------------------------------------------
    layer_weights = m.dim * (2 * q_l + 2 * k_l) + 3 * m.dim * f_l
    linear = L * layer_weights + v_l * m.dim * stage.last            # local matmul weights, head included
    recompute_gemm = 2 * T * L * layer_weights if layout.activation == "full" else 0.0
    attn_fwd = 2 * T * layout.seq_len * q_l * L
    attn_bwd = 5 * T * layout.seq_len * q_l * L + (attn_fwd if layout.activation == "full" else 0.0)
    ew = elementwise_bytes_per_token(layout, stage)
    t_fwd = 2 * T * linear / gemm_rate + attn_fwd / attn_rate + T * ew["forward"] / hbm
    t_bwd = ((4 * T * linear + recompute_gemm) / gemm_rate + attn_bwd / attn_rate
             + T * (ew["backward"] + ew["recompute"]) / hbm)

    # ---- tensor-parallel communication -----------------------------------------------------------
    tp, tp_l = tp_volume(layout, stage), tp_link(layout)
    tp_fwd = tp.forward / bw[tp_l]
    tp_bwd_total = tp.backward / bw[tp_l]
    if layout.overlap and t > 1:
        per_group = tp.per_group / bw[tp_l]
        exposed = tp.backward_blocking / bw[tp_l]
        for out in [q_l + 2 * k_l, 2 * f_l] * L + [v_l] * stage.last:
            matmul = 2 * T * m.dim * out / gemm_rate                     # dgrad or wgrad of the group
            exposed += tp.groups_overlapped * max(0.0, per_group - matmul)
        tp_bwd = exposed
    else:
        tp_bwd = tp_bwd_total

    p2p = p2p_volume(layout, stage) / bw[p2p_link(layout.world_size, layout.gpus_per_node)]
    return MicroBatchTime(gemm=(6 * T * linear + recompute_gemm) / gemm_rate,
                          attention=(attn_fwd + attn_bwd) / attn_rate,
                          elementwise=T * (ew["forward"] + ew["backward"] + ew["recompute"]) / hbm,
                          t_fwd=t_fwd, t_bwd=t_bwd, tp_exposed=tp_fwd + tp_bwd, tp_hidden=tp_bwd_total - tp_bwd, p2p=p2p,
                          executed_flops=6 * T * linear + recompute_gemm + attn_fwd + attn_bwd, tp=tp)


def _data_parallel_step(layout: Layout, gpu: Accelerator, stage: Stage, t_fwd: float, t_bwd: float
                        ) -> tuple[DPVolume, float, float, float]:
    """A stage's DP volume, its exposed and total DP seconds, and its optimizer seconds, per step."""
    k = layout.grad_accum
    bw = {"nvlink": gpu.nvlink_bw * gpu.nvlink_eff, "ib": gpu.ib_bw * gpu.ib_eff}
    dp, dp_l = dp_volume(layout, layout.zero_stage, stage), dp_link(layout)
    reduce_s, gather_s = dp.reduce_each / bw[dp_l], dp.gather_each / bw[dp_l]
    if layout.zero_stage == 3:
        exposed = k * (max(0.0, gather_s - t_fwd) + max(0.0, gather_s + reduce_s - t_bwd))
    else:
        exposed = dp.reduces * max(0.0, reduce_s - t_bwd) + dp.gathers * gather_s
    psi = local_parameters(layout.model, layout.tp, stage)
    opt_params = -(-psi // layout.dp) if layout.zero_stage >= 1 else psi
    t_opt = opt_params * OPTIMIZER_BYTES_PER_PARAM / (gpu.hbm_bw * gpu.hbm_eff)
    return dp, exposed, dp.reduces * reduce_s + dp.gathers * gather_s, t_opt


def step_time(layout: Layout, gpu: Accelerator) -> StepTime:
    if not gpu.has_timing:
        raise ValueError(f"no timing data for {gpu.name} (known: the planner's GPU table)")
    k, p = layout.grad_accum, layout.pp
    stages = layout.stages
    # stages with the same layers and ends take the same time: compute each kind once
    kinds = {(s.chunk_layers, s.first, s.last): s for s in stages}
    times = {key: micro_batch_time(layout, gpu, s) for key, s in kinds.items()}
    per_stage = [times[(s.chunk_layers, s.first, s.last)] for s in stages]
    slowest = max(range(p), key=lambda r: per_stage[r].slot)
    mb = per_stage[slowest]
    dp_steps = [_data_parallel_step(layout, gpu, s, times[key].t_fwd, times[key].t_bwd) for key, s in kinds.items()]
    dp, dp_exposed, dp_total, t_opt = max(dp_steps, key=lambda x: x[1] + x[3])

    seconds = {"gemm": k * mb.gemm, "attention": k * mb.attention, "elementwise": k * mb.elementwise,
               "optimizer": t_opt, "tp_comm_exposed": k * mb.tp_exposed, "dp_comm_exposed": dp_exposed}
    if p > 1:
        seconds.update(p2p_comm_exposed=k * mb.p2p, pipeline_bubble=(p - 1) / layout.vp * mb.slot)
    hidden = {"tp_comm": k * mb.tp_hidden, "dp_comm": dp_total - dp_exposed}
    tokens = layout.global_batch_tokens
    model_flops = flops_per_token(layout.model, layout.seq_len) * tokens / layout.world_size
    executed = k * sum(t.executed_flops for t in per_stage) / p
    return StepTime(seconds=seconds, hidden=hidden, tp=mb.tp, dp=dp, tp_link=tp_link(layout), dp_link=dp_link(layout),
                    model_flops_per_gpu=model_flops, executed_flops_per_gpu=executed, tokens_per_step=tokens,
                    world_size=layout.world_size, peak=gpu.peak_flops, p2p_bytes=k * p2p_volume(layout, stages[slowest]),
                    p2p_link=p2p_link(layout.world_size, layout.gpus_per_node) if p > 1 else "none",
                    bubble=layout.bubble, slowest_stage=slowest)
