"""Pipeline schedules: which forward and backward pass each stage runs when, and their execution.

A schedule is a pure function (p stages, this stage s, m micro-batches, v chunks per stage) -> the list of
this stage's `Action`s; model chunk v of stage s is global chunk k = v p + s.

- GPipe (Huang et al. 2019, Sec. 2.2): every micro-batch's forward, then every backward. Idle fraction
  (p-1)/(m+p-1); each stage keeps the activations of all m micro-batches.
- 1F1B (Narayanan et al. 2021, Sec. 2.2.1, PipeDream-Flush): stage s runs p-s-1 warm-up forwards, then one
  forward and one backward in turn, then the remaining backwards. Same bubble as GPipe, but at most p-s
  micro-batches in flight on stage s (stage 0 holds p).
- Interleaved 1F1B (Sec. 2.2.2): v model chunks per stage; the forwards go over the chunks in groups of p
  micro-batches (chunk (j // p) % v of micro-batch (j // (p v)) p + j % p for the j-th forward), the
  backwards likewise from the last chunk down; warm-up 2 (p-s-1) + (v-1) p forwards. Idle fraction
  (p-1)/(v m + p-1) at the cost of v times the transfers. Needs m a multiple of p.

`run_schedule` executes a stage's actions with llama_pt.parallel.pipeline.p2p (asynchronous sends,
blocking receives in the order above; `executable` checks an order against its data dependencies), and
records what it did in a StageTimeline. The gradient of each chunk's output reaches its backward scaled as
the last stage's loss was (by the engine's 1/micro-batches), so earlier stages backpropagate it unscaled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .p2p import BACKWARD, FORWARD, StageLink
from .timeline import StageTimeline


@dataclass(frozen=True)
class Action:
    op: str          # "F" (forward) or "B" (backward)
    chunk: int       # this stage's model chunk (virtual stage), 0..v-1
    micro_batch: int


def gpipe(p: int, s: int, m: int, v: int = 1) -> list[Action]:
    return [Action("F", 0, i) for i in range(m)] + [Action("B", 0, i) for i in range(m)]


def one_f_one_b(p: int, s: int, m: int, v: int = 1) -> list[Action]:
    warm = min(p - s - 1, m)
    order = [Action("F", 0, i) for i in range(warm)]
    for i in range(m - warm):
        order += [Action("F", 0, warm + i), Action("B", 0, i)]
    return order + [Action("B", 0, i) for i in range(m - warm, m)]


def interleaved_1f1b(p: int, s: int, m: int, v: int) -> list[Action]:
    if m % p:
        raise ValueError(f"interleaved 1F1B needs the micro-batches ({m}) to be a multiple of the stages ({p})")
    total = m * v

    def micro_batch(j: int) -> int:
        return (j // (p * v)) * p + j % p

    forwards = [Action("F", (j // p) % v, micro_batch(j)) for j in range(total)]
    backwards = [Action("B", v - 1 - (j // p) % v, micro_batch(j)) for j in range(total)]
    warm = min(2 * (p - s - 1) + (v - 1) * p, total)
    order = forwards[:warm]
    for i in range(total - warm):
        order += [forwards[warm + i], backwards[i]]
    return order + backwards[total - warm:]


SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved_1f1b": interleaved_1f1b}


def schedule_actions(name: str, p: int, s: int, m: int, v: int = 1) -> list[Action]:
    return SCHEDULES[name](p, s, m, v)


def executable(orders: list[list[Action]], v: int) -> bool:
    """Whether every stage's order (orders[s]) can run to the end when sends never block and receives wait:
    F of global chunk k needs F of chunk k-1 done (on its stage); B of k needs B of k+1 and F of k done."""
    p = len(orders)
    done: set[tuple[str, int, int]] = set()
    position = [0] * p
    last = p * v - 1
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while position[s] < len(orders[s]):
                a = orders[s][position[s]]
                k = a.chunk * p + s
                needs = [("F", k - 1, a.micro_batch)] if a.op == "F" and k > 0 else []
                if a.op == "B":
                    needs = [("F", k, a.micro_batch)] + ([("B", k + 1, a.micro_batch)] if k < last else [])
                if not all(n in done for n in needs):
                    break
                done.add((a.op, k, a.micro_batch))
                position[s] += 1
                progress = True
    return all(position[s] == len(orders[s]) for s in range(p))


def run_schedule(actions: list[Action], p: int, s: int, v: int, m: int, link: StageLink,
                 forward: Callable[[int, int, Optional[torch.Tensor]], torch.Tensor],
                 loss: Callable[[int, torch.Tensor], torch.Tensor],
                 backward: Callable[[torch.Tensor, Optional[torch.Tensor], bool], None],
                 timeline: Optional[StageTimeline] = None) -> list[torch.Tensor]:
    """Run stage s's actions. `forward(chunk, micro_batch, hidden)` -> the chunk's output (hidden is None on
    global chunk 0); `loss(micro_batch, logits)` -> the scalar loss (last global chunk); `backward(output,
    grad, last)`: backward from a loss (grad None) or from an output and its gradient, `last` on a chunk's
    last micro-batch. Returns the detached losses of the last global chunk's micro-batches (empty elsewhere)."""
    timeline = timeline if timeline is not None else StageTimeline(s)
    last_chunk = p * v - 1
    kept: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
    losses: list[torch.Tensor] = []
    for a in actions:
        k = a.chunk * p + s
        if a.op == "F":
            hidden = None
            if k > 0:
                started = time.perf_counter_ns()
                hidden = link.recv(s - 1, k - 1, FORWARD).requires_grad_()
                timeline.record("recv_F", a.chunk, a.micro_batch, started)
            started = time.perf_counter_ns()
            out = forward(a.chunk, a.micro_batch, hidden)
            if k == last_chunk:
                out = loss(a.micro_batch, out)
                losses.append(out.detach())
            timeline.record("F", a.chunk, a.micro_batch, started)
            if k < last_chunk:
                link.send(out, s + 1, k, FORWARD)
            kept[(a.chunk, a.micro_batch)] = (hidden, out)
        else:
            hidden, out = kept.pop((a.chunk, a.micro_batch))
            grad = None
            if k < last_chunk:
                started = time.perf_counter_ns()
                grad = link.recv(s + 1, k, BACKWARD)
                timeline.record("recv_B", a.chunk, a.micro_batch, started)
            started = time.perf_counter_ns()
            backward(out, grad, a.micro_batch == m - 1)
            timeline.record("B", a.chunk, a.micro_batch, started)
            if k > 0:
                link.send(hidden.grad, s - 1, k - 1, BACKWARD)
    link.wait_sends()
    return losses
