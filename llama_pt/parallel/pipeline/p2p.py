"""Point-to-point transfers between pipeline stages: activations forward, their gradients backward.

Sends are asynchronous (`dist.isend`) and waited for at the end of the step, so a stage never blocks on a
send; receives block, in the order the schedule needs them. Each transfer carries a tag naming the model chunk
boundary and the direction, so transfers between the same two ranks in both directions (the interleaved
schedule wraps from the last stage to the first) never match the wrong receive; between one pair the
transfers of one tag arrive in the order they were sent (gloo and NCCL), which is micro-batch order in every
schedule here. `bytes_sent` counts what this rank sent: per micro-batch and boundary one activation
[micro-batch, seq (/ t under sequence parallelism), dim] forward and one gradient of it backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..state import ParallelState

FORWARD, BACKWARD = 0, 1


class StageLink:
    """This rank's transfers to the previous and next stage (same TP and DP rank)."""

    def __init__(self, pstate: ParallelState, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.pstate, self.shape, self.dtype, self.device = pstate, shape, dtype, device
        self.pending: list[tuple[torch.Tensor, dist.Work]] = []
        self.bytes_sent = 0

    @staticmethod
    def tag(boundary: int, direction: int) -> int:
        """`boundary` k: between model chunks k and k+1."""
        return 2 * boundary + direction

    def send(self, tensor: torch.Tensor, to_stage: int, boundary: int, direction: int) -> None:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, self.pstate.stage_rank(to_stage), tag=self.tag(boundary, direction))
        self.pending.append((tensor, work))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, from_stage: int, boundary: int, direction: int) -> torch.Tensor:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.recv(buf, self.pstate.stage_rank(from_stage), tag=self.tag(boundary, direction))
        return buf

    def wait_sends(self) -> None:
        for _, work in self.pending:
            work.wait()
        self.pending = []
