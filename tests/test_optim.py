"""AdamW groups and the cosine schedule of the LLaMA paper (Section 2.3)."""
import math

import pytest

from llama_pt.model import Llama, get_preset
from llama_pt.train.optim import OptimConfig, learning_rate, parameter_groups


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_on_matrices_only(decay_embeddings):
    model = Llama(get_preset("tiny"))
    decay, no_decay = parameter_groups(model, OptimConfig(decay_embeddings=decay_embeddings))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    undecayed = _names(model, no_decay["params"])
    assert all(n.endswith("norm.weight") or n in ("tok_embeddings.weight", "output.weight") for n in undecayed)
    assert any(n.endswith("attention_norm.weight") for n in undecayed)
    assert ("tok_embeddings.weight" in undecayed) == (not decay_embeddings)
    assert "layers.0.attention.wq.weight" in _names(model, decay["params"])


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1)
    total = 10001  # steps 0 .. 10000: 2000 of warmup, then 8000 steps of cosine after the peak at 2000
    assert learning_rate(0, total, cfg) == pytest.approx(3e-4 / 2000)
    assert learning_rate(1999, total, cfg) == pytest.approx(3e-4)
    assert learning_rate(2000, total, cfg) == pytest.approx(3e-4)
    assert learning_rate(6000, total, cfg) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5))
    assert learning_rate(total - 1, total, cfg) == pytest.approx(3e-5, rel=1e-12)  # the last trained step
    assert learning_rate(total - 2, total, cfg) > 3e-5 * (1 + 1e-9)
    lrs = [learning_rate(s, total, cfg) for s in range(2000, total, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(2500, total, cfg) == pytest.approx(
        3e-5 + 0.5 * 2.7e-4 * (1 + math.cos(math.pi * 500 / 8000)))


def test_a_short_run_ends_at_ten_percent():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(learning_rate(s, 5, cfg), 12) for s in range(5)] == [0.5, 1.0, 1.0, 0.55, 0.1]
