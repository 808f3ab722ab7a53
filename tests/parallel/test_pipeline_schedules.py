"""The pipeline schedules as pure orders: complete, executable, their in-flight micro-batches and their bubble.

The bubble is measured on a simulated timeline (every forward of a chunk takes 1/v, every backward 2/v, each
action starts once its stage is free and its input has arrived) and compared with Narayanan et al. 2021,
Sec. 2.2: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v m+p-1) for interleaved 1F1B.
"""
from __future__ import annotations

import pytest

from llama_pt.parallel.pipeline.schedules import Action, executable, schedule_actions

CASES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4)]


def orders(name: str, p: int, m: int, v: int) -> list[list[Action]]:
    return [schedule_actions(name, p, s, m, v) for s in range(p)]


def simulate(stage_orders: list[list[Action]], v: int, forward: float = 1.0, backward: float = 2.0) -> list[float]:
    """Idle fraction per stage of the schedule run with the given per-layer-run times (chunks take 1/v)."""
    p = len(stage_orders)
    last = p * v - 1
    finished: dict[tuple[str, int, int], float] = {}
    free, position, busy = [0.0] * p, [0] * p, [0.0] * p
    while any(position[s] < len(stage_orders[s]) for s in range(p)):
        moved = False
        for s in range(p):
            while position[s] < len(stage_orders[s]):
                a = stage_orders[s][position[s]]
                k = a.chunk * p + s
                needs = [("F", k - 1, a.micro_batch)] if a.op == "F" and k > 0 else []
                if a.op == "B":
                    needs = [("F", k, a.micro_batch)] + ([("B", k + 1, a.micro_batch)] if k < last else [])
                if not all(n in finished for n in needs):
                    break
                start = max([free[s]] + [finished[n] for n in needs])
                duration = (forward if a.op == "F" else backward) / v
                finished[(a.op, k, a.micro_batch)] = free[s] = start + duration
                busy[s] += duration
                position[s] += 1
                moved = True
        assert moved, "deadlock"
    span = max(free)
    return [1 - b / span for b in busy]


@pytest.mark.parametrize("name,v", CASES)
@pytest.mark.parametrize("p", [2, 4])
def test_every_stage_runs_every_forward_and_backward_once_and_the_order_can_run(name, v, p):
    for m in (p, 2 * p, 3 * p):
        stage_orders = orders(name, p, m, v)
        assert executable(stage_orders, v)
        want = sorted((op, c, i) for op in "FB" for c in range(v) for i in range(m))
        for order in stage_orders:
            assert sorted((a.op, a.chunk, a.micro_batch) for a in order) == want


def test_a_wrong_order_is_caught():
    good = orders("1f1b", 2, 4, 1)
    broken = [good[0], [Action("B", 0, 0)] + [a for a in good[1] if a != Action("B", 0, 0)]]  # backward first
    assert not executable(broken, 1)
    swapped = [list(reversed(good[0])), good[1]]
    assert not executable(swapped, 1)


def in_flight(order: list[Action]) -> int:
    """The most micro-batches whose forward has run and whose backward has not (activations kept)."""
    live, most = 0, 0
    for a in order:
        live += 1 if a.op == "F" else -1
        most = max(most, live)
    return most


def test_1f1b_keeps_at_most_p_minus_s_micro_batches_gpipe_keeps_all():
    p, m = 4, 8
    assert [in_flight(o) for o in orders("1f1b", p, m, 1)] == [4, 3, 2, 1]
    assert [in_flight(o) for o in orders("gpipe", p, m, 1)] == [m] * p


@pytest.mark.parametrize("name,v", CASES)
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16)])
def test_simulated_bubble_equals_the_formula(name, v, p, m):
    idle = simulate(orders(name, p, m, v), v)
    want = (p - 1) / (v * m + p - 1)
    assert max(idle) == pytest.approx(want, rel=1e-12), (idle, want)
    assert min(idle) == pytest.approx(want, rel=1e-12)  # every stage idles the same share
