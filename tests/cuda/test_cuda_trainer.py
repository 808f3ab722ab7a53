"""Twenty trainer steps on a CUDA GPU in bf16: activation mode `selective` against `none`.

The runs go through the whole trainer as train.py drives it (tests/support.make_config: Hydra
composition, the token-shard fixtures of tests/conftest.py, llama_pt.train.entry.run_training), one
process, the `demo` preset (1.1M parameters) at sequence 128 with two micro-batches per step.

Tolerances, u = 2^-8: the first step's loss is a forward pass of the same weights through the same
kernels in both modes, so it agrees far below u (LAYER_LOSS_RTOL). After that the weights follow two
AdamW trajectories driven by gradients that agree to bf16 precision (LAYER_GRAD_RTOL per step). AdamW
divides each update by the gradient's own running scale, so a relative gradient difference delta moves
each update by about delta relative, and the loss by about delta times the loss decrease per step (a few
percent of the loss here, at lr 1e-3 where the loss falls smoothly): ~1e-3 relative per step at most
(measured 7e-5 with the CPU kernels). STEP_RTOL = 2u = 7.8e-3 bounds that with room to spare; a wrong
backward term keeps the selective run from learning or moves it by O(1).
"""
from __future__ import annotations

import pytest

from cuda_tolerances import LAYER_LOSS_RTOL, U_BF16

pytestmark = pytest.mark.cuda

try:  # Hydra composes the config; the data loader needs fasteners: packages a bare GPU image may lack
    from support import losses, make_config

    from llama_pt.train.entry import run_training
except ModuleNotFoundError as missing:
    pytest.skip(f"the trainer's path needs {missing.name!r}, not installed here (make gpu-check installs it from "
                f".whl/, written by make gpu-wheels)", allow_module_level=True)

STEPS = 20
STEP_RTOL = 2 * U_BF16


def test_twenty_bf16_steps_selective_follow_none(tmp_path, token_corpus):
    runs = {}
    for mode in ("none", "selective"):
        cfg = make_config(tmp_path / mode, token_corpus, "model=demo", f"model.activation={mode}",
                          "model.attention=sdpa", "train.device=cuda", "train.precision=bf16",
                          f"train.steps={STEPS}", "train.seq_len=128", "train.global_batch_tokens=2048",
                          "train.micro_batch_size=8", "optim.lr=1e-3")
        runs[mode] = losses(run_training(cfg)["out_dir"])
    none, selective = runs["none"], runs["selective"]
    assert sorted(none) == sorted(selective) == list(range(1, STEPS + 1))
    assert abs(selective[1] - none[1]) <= LAYER_LOSS_RTOL * none[1], (selective[1], none[1])
    for step in none:
        assert abs(selective[step] - none[step]) <= STEP_RTOL * none[step], (step, selective[step], none[step])
    assert none[STEPS] < 0.75 * none[1] and selective[STEPS] < 0.75 * selective[1]  # both learn
