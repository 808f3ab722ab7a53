"""Precision constants and error measures shared by the CUDA tests.

bf16 keeps 8 significant bits (7 stored + the implicit one), so rounding a real number to the nearest
bf16 value changes it by a relative amount of at most the unit roundoff u = 2^-8 = 3.9e-3. Each test
states which roundings can separate the two computations it compares and derives its bound from u.
"""
from __future__ import annotations

import torch

U_BF16 = 2.0 ** -8

# The hand-written layer against autograd under bf16 autocast, gradients per parameter, norm-wise
# relative: both round matmul outputs and activations to bf16 at the same places except inside RoPE's
# backward (float32 in the hand-written layer) and the order in which the q, k, v (and gate, up) input
# gradients are added. A rounding's relative RMS error is about u / sqrt(3) = 2.3e-3; a handful of
# independent roundings in quadrature gives a few 1e-3 (measured 5e-3 to 8e-3 on CPU). 1.5e-2 is the
# bound of the CPU test (tests/ops/test_layer_backward.py); a wrong backward term errs by more (a dropped
# RMSNorm projection term: 8e-2 there).
LAYER_GRAD_RTOL = 1.5e-2
# The same comparison for the loss: the forward passes run the same matmuls on the same bf16 operands
# (autograd's SDPA call may dispatch to another fused attention kernel than the hand-written layer's
# direct call); the loss is a mean over thousands of tokens, in which independent bf16 roundings of the
# logits average out: far below u.
LAYER_LOSS_RTOL = 1e-3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error ||got - want|| / ||want||, in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()
