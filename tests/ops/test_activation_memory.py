"""Bytes saved for backward per layer: the measurement itself, and measured == formula in one process
(without and with LoRA adapters).

The TP=2 and TP=2+SP settings are measured in tests/ops/test_layer_dist.py (torchrun).
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from llama_pt.adapters.lora import PROJECTIONS, LoRASettings, lora_plan
from llama_pt.model import Llama, ModelConfig
from llama_pt.model.module_plan import apply_module_plan
from llama_pt.blocks.memory import layer_activation_bytes, measure_saved_bytes
from llama_pt.blocks.modes import ACTIVATION_MODES, apply_activation_mode

SEQ, BATCH = 32, 2
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16_autocast": torch.float32}


def test_measurement_counts_storages_once_and_leaves_weights_out():
    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    # x is saved by the linear (the weight is not counted) and again, as views, by the two muls: once.
    _, nbytes = measure_saved_bytes(lambda: (lin(x).sum() + (x.view(24) * x.view(24)).sum()), lin)
    assert nbytes == 3 * 8 * 4
    # Autocast's bf16 copy of the weight is not an activation; the bf16 copy of x is (3*8*2 bytes).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, nbytes = measure_saved_bytes(lambda: lin(x), lin)
    assert nbytes == 3 * 8 * 2
    # An op saving only parameters (w * w saves w twice) saves no activation.
    _, nbytes = measure_saved_bytes(lambda: lin.weight * lin.weight, lin)
    assert nbytes == 0
    # Nor is autocast's copy of a frozen weight (not cached, no autograd history: recognised by its values).
    lin.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, nbytes = measure_saved_bytes(lambda: lin(x), lin)
    assert nbytes == 0


def _measure(cfg: ModelConfig, mode: str, precision: str, lora: Optional[LoRASettings] = None,
             targets: tuple[str, ...] = (), trained_base: bool = True) -> int:
    """Bytes layer 0 saves (LoRA on `targets` with `lora`'s settings, in training mode, if given; all but
    the adapters frozen unless `trained_base`)."""
    torch.manual_seed(0)
    model = Llama(cfg)
    if lora is not None:
        apply_module_plan(model, lora_plan(list(targets), lora))
    for name, p in model.named_parameters():
        p.requires_grad_(trained_base or ".adapter." in name)
    model = apply_activation_mode(model.to(DTYPES[precision]), mode)
    x = torch.randn(BATCH, SEQ, cfg.dim, dtype=DTYPES[precision], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        _, nbytes = measure_saved_bytes(lambda: model.layers[0](x, model.rope_cos[:SEQ], model.rope_sin[:SEQ]), model)
    return nbytes


@pytest.mark.parametrize("precision", sorted(DTYPES))
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_measured_bytes_equal_the_formula_one_process(precision, n_kv_heads):
    cfg = ModelConfig(dim=128, n_heads=4, n_kv_heads=n_kv_heads, n_layers=1, vocab_size=256, multiple_of=64,
                      max_seq_len=SEQ)
    for mode in ACTIVATION_MODES:
        measured = _measure(cfg, mode, precision)
        formula = layer_activation_bytes(mode, seq=SEQ, batch=BATCH, dim=cfg.dim, ffn_dim=cfg.ffn_hidden_dim,
                                         n_heads=cfg.n_heads, n_kv_heads=n_kv_heads, precision=precision)
        assert abs(measured - formula) <= 0.02 * formula, (mode, measured, formula)


def test_formula_orders_the_modes_and_checks_its_arguments():
    shape = dict(seq=2048, batch=1, dim=4096, ffn_dim=11008, n_heads=32)
    none, selective, full = (layer_activation_bytes(m, **shape) for m in ("none", "selective", "full"))
    assert full == 2048 * 4096 * 4                      # the float32 layer input
    assert full < selective < none
    # Korthikanti et al.: sequence parallelism divides every term by t (here the layer input: exactly).
    assert layer_activation_bytes("full", **shape, tp=8, sequence_parallel=True) == full // 8
    sp8 = layer_activation_bytes("selective", **shape, tp=8, sequence_parallel=True)
    assert sp8 == selective // 8
    with pytest.raises(ValueError, match="activation mode 'x'"):
        layer_activation_bytes("x", **shape)
    with pytest.raises(ValueError, match="precision 'int8'"):
        layer_activation_bytes("none", **shape, precision="int8")


@pytest.mark.parametrize("precision", sorted(DTYPES))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("targets", [tuple(PROJECTIONS), ("wq", "wv", "w2")], ids=["all", "q_v_w2"])
@pytest.mark.parametrize("trained_base", [True, False], ids=["trained_base", "frozen_base"])
def test_measured_bytes_with_lora_equal_the_formula_one_process(precision, dropout, targets, trained_base):
    """LoRA rank 8 (u per projection; with dropout the masks, and in `none` autograd's noise and dropped
    inputs; a frozen base keeps less in `none`): measured == formula, to the byte, in every mode."""
    cfg = ModelConfig(dim=128, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=256, multiple_of=64, max_seq_len=SEQ)
    for mode in ACTIVATION_MODES:
        measured = _measure(cfg, mode, precision, LoRASettings(rank=8, alpha=16.0, dropout=dropout), targets,
                            trained_base)
        formula = layer_activation_bytes(mode, seq=SEQ, batch=BATCH, dim=cfg.dim, ffn_dim=cfg.ffn_hidden_dim,
                                         n_heads=cfg.n_heads, n_kv_heads=2, precision=precision, lora_rank=8,
                                         lora_targets=targets, lora_dropout=dropout > 0, trained_base=trained_base)
        assert measured == formula, (mode, measured, formula)


def test_lora_terms_of_the_formula():
    shape = dict(seq=2048, batch=1, dim=4096, ffn_dim=11008, n_heads=32, precision="bf16_autocast")
    for mode in ACTIVATION_MODES:
        assert layer_activation_bytes(mode, **shape, lora_rank=16, lora_targets=()) == \
            layer_activation_bytes(mode, **shape)
    # selective: u [s, b, 16] in bf16 per projection; with dropout one byte per input element of each
    assert layer_activation_bytes("selective", **shape, lora_rank=16) - layer_activation_bytes("selective", **shape) \
        == 7 * 2048 * 16 * 2
    masks = 2048 * (5 * 4096 + 4096 + 11008)
    assert layer_activation_bytes("selective", **shape, lora_rank=16, lora_dropout=True) - \
        layer_activation_bytes("selective", **shape, lora_rank=16) == masks
    assert layer_activation_bytes("full", **shape, lora_rank=16, lora_dropout=True) == \
        layer_activation_bytes("full", **shape)
    with pytest.raises(ValueError, match="LoRA target 'wx'"):
        layer_activation_bytes("none", **shape, lora_rank=16, lora_targets=("wq", "wx"))
