"""LoRA in one process (llama_pt.adapters.lora): every activation mode against autograd through the merged
weight W + (alpha / r) B A, merge / unmerge, and dropout.

TP=2 and TP=2+SP are checked against one process in tests/ops/test_layer_dist.py (torchrun)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from llama_pt.adapters.lora import (PROJECTIONS, AdaptedLinear, LoRASettings, LowRankUpdate, adapter_of,
                                    dropout_noise, lora_plan, lora_transform, merge, unmerge)
from llama_pt.blocks import apply_activation_mode
from llama_pt.blocks.modes import ACTIVATION_MODES
from llama_pt.model import Llama, ModelConfig
from llama_pt.model.module_plan import apply_module_plan
from llama_pt.parallel import ColumnParallelLinear, ShardSpec, TPContext

TINY = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=256, multiple_of=32, max_seq_len=64)
SETTINGS = LoRASettings(rank=4, alpha=8.0)
FP32_REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def lora_model(settings: LoRASettings = SETTINGS, mode: str = "none", freeze: bool = True) -> Llama:
    """TINY with LoRA on all seven projections of every layer and a nonzero B (as after some training);
    everything else frozen unless `freeze` is False."""
    torch.manual_seed(0)
    model = apply_module_plan(Llama(TINY), lora_plan(list(PROJECTIONS), settings))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    for name, p in model.named_parameters():
        p.requires_grad_(not freeze or ".adapter." in name)
    return apply_activation_mode(model, mode)


def tokens(seed: int = 2, batch: int = 2, seq: int = 33) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_of(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, TINY.vocab_size), batch[:, 1:].reshape(-1))


def adapted_paths(model: Llama) -> list[str]:
    return [name for name, m in model.named_modules() if adapter_of(m) is not None]


def merged_reference(model: Llama, batch: torch.Tensor, base_grads: bool):
    """Loss and gradients by autograd through W + (alpha / r) B A written out, in a plain Llama: A and B (and,
    with `base_grads`, every base parameter) are leaves; {name: grad} in the adapted model's names."""
    plain = Llama(TINY)
    leaves = {name: p.detach().clone().requires_grad_(base_grads or ".adapter." in name)
              for name, p in model.named_parameters()}
    params = {name: t for name, t in leaves.items() if ".adapter." not in name}
    for path in adapted_paths(model):
        scale = adapter_of(model.get_submodule(path)).scale
        a, b = leaves[f"{path}.adapter.lora_A"], leaves[f"{path}.adapter.lora_B"]
        params[f"{path}.weight"] = leaves[f"{path}.weight"] + scale * (b @ a)
    loss = loss_of(functional_call(plain, params, (batch[:, :-1],)), batch)
    loss.backward()
    return loss.item(), {name: t.grad for name, t in leaves.items() if t.requires_grad}


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen_base", "trained_base"])
def test_every_mode_equals_autograd_through_the_merged_weight(freeze):
    batch = tokens()
    for mode in ACTIVATION_MODES:
        model = lora_model(mode=mode, freeze=freeze)
        assert type(model.layers[0].attention.wq) is AdaptedLinear and len(adapted_paths(model)) == 7 * TINY.n_layers
        loss = loss_of(model(batch[:, :-1]), batch)
        loss.backward()
        ref_loss, ref = merged_reference(model, batch, base_grads=not freeze)
        assert abs(loss.item() - ref_loss) <= FP32_REL_TOL * abs(ref_loss), mode
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert sorted(grads) == sorted(ref), mode
        if freeze:  # the base gets no gradient at all; A and B of all 14 projections do
            assert all(p.grad is None for name, p in model.named_parameters() if ".adapter." not in name)
            assert len(grads) == 2 * 7 * TINY.n_layers
        errors = {name: rel_err(g, ref[name]) for name, g in grads.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= FP32_REL_TOL, (mode, worst, errors[worst])


def test_merge_gives_the_adapted_logits_and_unmerge_restores_the_weights_bitwise():
    model = lora_model(mode="selective")
    batch = tokens()[:, :-1]
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if ".adapter." not in name}
    with torch.no_grad():
        adapted = model(batch)
        merge(model)
        assert adapted_paths(model) == [] and not any(".adapter." in n for n, _ in model.named_parameters())
        merged = model(batch)
        # the merged model is a plain one: its logits are the adapted model's (the updates now in W)
        assert rel_err(merged, adapted) <= FP32_REL_TOL
        assert not torch.equal(model.layers[0].attention.wq.weight, weights["layers.0.attention.wq.weight"])
        model.eval()  # a mode change while merged reaches the adapters on unmerge
        unmerge(model)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters() if ".adapter." not in name)
    assert len(adapted_paths(model)) == 7 * TINY.n_layers
    assert not any(m.training for m in model.modules() if isinstance(m, LowRankUpdate))
    with torch.no_grad():
        assert torch.equal(model(batch), adapted)


def test_dropout_changes_training_outputs_only():
    """Against the same model without dropout, in each mode (with autograd: the hand-written path of
    `selective`): different in training, bitwise equal in evaluation."""
    batch = tokens()[:, :-1]
    for mode in ACTIVATION_MODES:
        plain, model = lora_model(mode=mode), lora_model(LoRASettings(rank=4, alpha=8.0, dropout=0.1), mode)
        assert rel_err(model(batch), plain(batch)) > 1e-3, mode
        plain.eval(), model.eval()
        assert torch.equal(model(batch), plain(batch)), mode


def test_dropout_backward_of_each_mode_equals_autograd_with_the_same_draws():
    """The same random state draws the same masks in every mode (the hand-written layer draws them as
    F.dropout does, in autograd's order), so loss and A, B gradients agree as without dropout."""
    settings = LoRASettings(rank=4, alpha=8.0, dropout=0.25)
    batch = tokens()
    results = {}
    for mode in ACTIVATION_MODES:
        model = lora_model(settings, mode)
        torch.manual_seed(7)
        loss = loss_of(model(batch[:, :-1]), batch)
        loss.backward()
        results[mode] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_loss, ref = results["none"]
    for mode in ("selective", "full"):
        loss, grads = results[mode]
        assert abs(loss - ref_loss) <= FP32_REL_TOL * abs(ref_loss), mode
        assert sorted(grads) == sorted(ref) and len(grads) == 2 * 7 * TINY.n_layers
        errors = {name: rel_err(g, ref[name]) for name, g in grads.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= FP32_REL_TOL, (mode, worst, errors[worst])


def test_dropout_noise_is_f_dropout_and_a_row_shard_takes_its_columns_of_the_full_draw():
    x = torch.randn(2, 3, 8)
    torch.manual_seed(0)
    want = F.dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(x * dropout_noise(x, 0.5), want)
    for index in (0, 1):  # the input columns of a row-parallel layer on TP rank `index` of 2
        torch.manual_seed(0)
        noise = dropout_noise(x[..., 4 * index:4 * index + 4], 0.5, ShardSpec(1, 2, index))
        assert torch.equal(x[..., 4 * index:4 * index + 4] * noise, want[..., 4 * index:4 * index + 4])


def test_lora_refuses_what_it_cannot_adapt():
    with pytest.raises(TypeError, match="bias"):
        lora_transform(SETTINGS)("layers.0.attention.wq", torch.nn.Linear(8, 8))
    weight = torch.nn.Parameter(torch.zeros(4, 8))
    weight.tp_shard, weight.kv_replicated = ShardSpec(0, 1, 0), True  # a kv head replicated over TP ranks
    with pytest.raises(ValueError, match="ParallelState"):
        lora_transform(SETTINGS)("layers.0.attention.wk", ColumnParallelLinear(weight, TPContext(None, False, True)))
