"""Bytes each GPU sends per training step, by collective (docs/parallelism.md's tables, plus ZeRO).

Ring convention (NCCL's bus bandwidth): in a group of n ranks an all-reduce of N bytes sends
2(n-1)/n N per rank, an all-gather with an N-byte output or a reduce-scatter with an N-byte input
(n-1)/n N.

Tensor parallelism (per micro-batch, A = T h e: one [b, s, h] activation in the matmul dtype,
Korthikanti et al. 2022, Sec. 4.2.2): TP all-reduces 2 A per layer forward and backward; TP+SP
all-gathers and reduce-scatters the same bytes, and overlap re-gathers each column group's input in
backward. docs/parallelism.md counts every call; `tp_volume` is its table summed.

Data parallelism (per optimizer step, G = gradient bytes and P = weight bytes this rank holds): plain
all-reduce 2(d-1)/d G once per step; ZeRO-1 a reduce-scatter of G at the accumulation boundary and an
all-gather of the updated weights P; ZeRO-2 reduce-scatters on every micro-batch's backward (DeepSpeed
keeps no full gradient) plus the all-gather; ZeRO-3 gathers the weights for every micro-batch's forward
and backward and reduce-scatters every backward: 3 x (d-1)/d P per micro-batch, 1.5x plain data
parallelism (Rajbhandari et al. 2020, Sec. 7.2).

Pipeline parallelism: a stage's TP volume is that of its layers (the embedding's all-reduce on the first
stage, the head's column group and the loss on the last), its DP volume that of its parameters; the
point-to-point messages are llama_pt.plan.pipeline's (p2p_message_bytes, p2p_sends_per_micro_batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .layout import Layout
from .memory import STATE_BYTES, local_parameters
from .pipeline import Stage, p2p_message_bytes, p2p_sends_per_micro_batch, whole_model


def ring(n: int) -> float:
    """(n-1)/n: the share of a buffer each rank sends in an all-gather or reduce-scatter."""
    return (n - 1) / n


@dataclass(frozen=True)
class TPVolume:
    """Per micro-batch, bytes sent by one rank over the tensor-parallel group."""
    forward: float            # on the critical path (every layer waits for it)
    backward_blocking: float  # duals of the forward reduce-scatters, norm and replicated-kv gradients
    per_group: float          # per column group: each collective that can hide behind one of its matmuls
    groups_overlapped: int    # collectives per column group that overlap a matmul (re-gather, input grad)
    n_groups: int             # column groups: q/k/v and w1/w3 per layer, and the output head

    @property
    def backward(self) -> float:
        return self.backward_blocking + self.per_group * self.groups_overlapped * self.n_groups


def tp_volume(layout: Layout, stage: Optional[Stage] = None) -> TPVolume:
    """Per micro-batch, over the TP group, on one rank of pipeline `stage` (the whole model by default)."""
    m, t, T = layout.model, layout.tp, layout.micro_tokens
    stage = stage or whole_model(m.n_layers)
    L, h = stage.layers, m.dim
    if t == 1:
        return TPVolume(0.0, 0.0, 0.0, 0, 0)
    e = 2 if layout.precision == "bf16" else 4
    A = T * h * e
    emb = 4 * T * h * stage.first        # the embedding's output is float32
    loss = 2 * ring(t) * 12 * T * stage.last  # max, then (sum of exponentials, target logit)
    kv_rep = t // m.kv_heads if m.kv_heads < t else 1
    kv = 2 * L * 2 * ring(kv_rep) * 4 * m.head_dim * h if kv_rep > 1 else 0.0
    groups = 2 * L + stage.last
    if not layout.sp:
        forward = 2 * ring(t) * (2 * L * A + emb) + loss
        per_group = 2 * ring(t) * A      # all-reduce of the group's input gradient
        return TPVolume(forward, kv, per_group, 1, groups)
    forward = ring(t) * (groups * A + 2 * L * A + emb) + loss
    blocking = ring(t) * (2 * L * A + emb) + groups * 2 * ring(t) * 4 * h + kv
    per_group = ring(t) * A              # re-gather of the input (overlap only) / reduce-scatter of its gradient
    return TPVolume(forward, blocking, per_group, 2 if layout.overlap else 1, groups)


@dataclass(frozen=True)
class DPVolume:
    """Per optimizer step, bytes sent by one rank over its data-parallel group."""
    reduce_each: float        # one gradient reduction (all-reduce or reduce-scatter)
    reduces: int              # how many per step (1, or one per micro-batch under ZeRO-2/3)
    gather_each: float        # one weight all-gather
    gathers: int              # 0; 1 after the step (ZeRO-1/2); 2 per micro-batch (ZeRO-3)

    @property
    def total(self) -> float:
        return self.reduce_each * self.reduces + self.gather_each * self.gathers


def dp_volume(layout: Layout, zero_stage: int, stage: Optional[Stage] = None) -> DPVolume:
    """Per optimizer step, over the DP group, on one rank of pipeline `stage` (the whole model by default)."""
    d, k = layout.dp, layout.grad_accum
    if d == 1:
        return DPVolume(0.0, 0, 0.0, 0)
    psi = local_parameters(layout.model, layout.tp, stage)
    w, g, _ = STATE_BYTES[layout.precision]
    G, P = psi * g, psi * w
    if zero_stage == 0:
        return DPVolume(2 * ring(d) * G, 1, 0.0, 0)
    if zero_stage == 1:
        return DPVolume(ring(d) * G, 1, ring(d) * P, 1)
    if zero_stage == 2:
        return DPVolume(ring(d) * G, k, ring(d) * P, 1)
    return DPVolume(ring(d) * G, k, ring(d) * P, 2 * k)


def p2p_volume(layout: Layout, stage: Stage) -> float:
    """Per micro-batch, bytes one GPU of pipeline `stage` sends to its neighbour stages (activations forward,
    gradients backward): 2 V b s h x 4 / t under SP for a middle stage (pipeline.p2p_message_bytes)."""
    message = p2p_message_bytes(layout.micro_batch, layout.seq_len, layout.model.dim, layout.tp, layout.sp)
    return p2p_sends_per_micro_batch(stage, layout.pp) * message


def dp_link(layout: Layout) -> str:
    """Data-parallel groups (ranks with the same TP rank) span nodes as soon as there is more than one."""
    return "nvlink" if layout.nodes == 1 else "ib"


def tp_link(layout: Layout) -> str:
    """TP groups are t consecutive ranks: within a node when t divides the GPUs of a node."""
    return "nvlink" if layout.tp <= layout.gpus_per_node and layout.gpus_per_node % layout.tp == 0 else "ib"
