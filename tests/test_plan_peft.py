"""The `peft` config section and the planner's LoRA / QLoRA memory (docs/planner.md, "LoRA and QLoRA"): the
config's one-line errors, the frozen base against the bytes a real NF4 model holds, and the fit checks of the
QLoRA paper's claims (Dettmers et al. 2023) through `python -m llama_pt.plan`."""
import pytest
import torch

from llama_pt.adapters.nf4 import NF4Linear, nf4_storage_bytes
from llama_pt.blocks.memory import layer_activation_bytes
from llama_pt.config import ConfigError, PeftConfig, compose_config, count_parameters, resolve
from llama_pt.model import Llama
from llama_pt.model.module_plan import apply_module_plan
from llama_pt.plan import format_report, get_gpu, make_plan
from llama_pt.plan.__main__ import main
from llama_pt.plan.layout import layout_from_config
from llama_pt.plan.memory import (activation_bytes, frozen_base_bytes, projection_shapes, state_bytes,
                                  trainable_parameters)

GIB = 1024 ** 3
PROJECTIONS = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
# The paper's Guanaco recipe (qlora's scripts/finetune_guanaco_*.sh): micro-batch 1, targets of 512 tokens,
# gradient checkpointing, 16 sequences per step; r 64, alpha 16 on every linear layer (configs/peft).
GUANACO = ["train.seq_len=512", "train.global_batch_tokens=8192", "train.micro_batch_size=1",
           "++model.activation=full", "peft.dropout=0.05"]


def tiny(*overrides):
    return compose_config(["model=tiny", "train.seq_len=16", "train.global_batch_tokens=128",
                           "train.micro_batch_size=4", *overrides])


def plan_cli(capsys, *args):
    code = main([*args, "nodes=1", "gpus_per_node=1"])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("overrides,message", [
    (["peft=qlora", "peft.targets=[wq,wx]"], "peft.targets: 'wx' is not one of wq, wk, wv, wo, w1, w2, w3"),
    (["peft=lora", "peft.rank=0"], "peft.rank=0 must be a positive integer"),
    (["peft=lora", "peft.rank=-4"], "peft.rank=-4 must be a positive integer"),
    (["peft=qlora", "parallel.tensor_parallel=2"],
     "peft.method=qlora with parallel.tensor_parallel=2 is unsupported"),
    (["peft=lora", "peft.modules_to_save=[embeddings]"], "peft.modules_to_save: 'embeddings' is not one of"),
    (["peft.method=dora"], "peft.method='dora' is unknown (known: none, lora, qlora)"),
])
def test_bad_peft_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve(tiny(*overrides), world_size=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_peft_groups_select_and_default_to_full_training():
    assert resolve(tiny()).peft == PeftConfig()
    run = resolve(tiny("peft=qlora", "peft.modules_to_save=[tok_embeddings,output]", "++model.activation=full"))
    assert run.peft == PeftConfig(method="qlora", rank=64, alpha=16, dropout=0.1,
                                  targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
                                  modules_to_save=("tok_embeddings", "output"))
    assert resolve(tiny("peft=lora", "parallel.tensor_parallel=2"), world_size=2).peft.method == "lora"


def test_trainable_parameters_are_the_low_rank_factors_and_saved_modules():
    lay = layout_from_config(tiny("peft=lora", "peft.rank=4", "peft.targets=[wq,w2]"), 1, 1, "cuda")
    m = lay.model  # dim 64, 4 heads of 16, 2 kv heads, ffn 192
    assert projection_shapes(m, 1)["wq"] == (64, 64) and projection_shapes(m, 1)["w2"] == (64, 192)
    assert trainable_parameters(lay) == m.n_layers * 4 * ((64 + 64) + (64 + 192))
    saved = layout_from_config(tiny("peft=lora", "peft.rank=4", "peft.targets=[wq,w2]",
                                    "peft.modules_to_save=[output]"), 1, 1, "cuda")
    assert trainable_parameters(saved) == trainable_parameters(lay) + m.padded_vocab_size * m.dim
    states = state_bytes(lay, 0)
    psi = trainable_parameters(lay)
    assert (states["weights"], states["gradients"], states["optimizer"]) == (2 * psi, 2 * psi, 12 * psi)
    assert states["frozen_base"] == 2 * count_parameters(m)  # every base parameter, bf16, weights only
    assert frozen_base_bytes(saved) == 2 * (count_parameters(m) - m.padded_vocab_size * m.dim)
    # tensor parallelism: A of a column-parallel (wq) and B of a row-parallel (w2) projection are whole
    tp = layout_from_config(tiny("peft=lora", "peft.rank=4", "peft.targets=[wq,w2]", "parallel.tensor_parallel=2"),
                            2, 2, "cuda")
    assert trainable_parameters(tp) == m.n_layers * 4 * ((32 + 64) + (64 + 96))


def test_qlora_frozen_base_is_what_an_nf4_model_holds():
    """The planner's frozen base of a QLoRA `tiny` (projections of 64 x 32 to 192 x 64 weights) equals the bytes
    of the model with every projection an NF4Linear: the NF4 buffers plus the rest in bf16."""
    cfg = tiny("peft=qlora", "++model.activation=full")  # the selective layer reads dense weights
    lay = layout_from_config(cfg, 1, 1, "cuda")
    torch.manual_seed(0)
    model = Llama(lay.model)
    apply_module_plan(model, [(f"layers.*.{p}", lambda _, m: NF4Linear.from_linear(m)) for p in PROJECTIONS])
    nf4 = sum(m.storage_bytes() for m in model.modules() if isinstance(m, NF4Linear))
    rest = sum(p.numel() for p in model.parameters()) * 2  # embeddings, head, norms: bf16
    assert frozen_base_bytes(lay) == nf4 + rest
    shapes = projection_shapes(lay.model, 1).values()
    assert nf4 == lay.model.n_layers * sum(nf4_storage_bytes(r * c) for r, c in shapes)


def test_adapter_activations_come_from_the_layer_formula():
    lay = layout_from_config(tiny("peft=lora", "peft.rank=8", "peft.dropout=0", "++model.activation=selective"),
                             1, 1, "cuda")
    m = lay.model
    kw = dict(seq=16, batch=4, dim=m.dim, ffn_dim=m.ffn_hidden_dim, n_heads=m.n_heads, n_kv_heads=m.kv_heads,
              precision="bf16_autocast")
    lora = dict(lora_rank=8, lora_targets=lay.peft.targets, lora_dropout=False, trained_base=False)
    parts = activation_bytes(lay)
    assert parts["layers"] == m.n_layers * layer_activation_bytes("selective", **kw, **lora)
    assert parts["layers"] - m.n_layers * layer_activation_bytes("selective", **kw) == m.n_layers * 7 * 64 * 8 * 2
    assert parts["head_input"] == 0  # frozen head
    full = layout_from_config(tiny("peft=qlora", "peft.rank=8", "peft.dropout=0", "++model.activation=full"),
                              1, 1, "cuda")
    assert activation_bytes(full)["recompute"] == layer_activation_bytes("none", **kw, **lora)


def test_llama_65b_qlora_fits_on_one_48gb_gpu(capsys):
    """QLoRA, abstract and Sec. 1: a 65B model finetuned on a single 48 GB GPU."""
    for gpu in ("a6000", "l40s"):
        code, out = plan_cli(capsys, "+experiment=llama1_65b", "peft=qlora", *GUANACO, f"gpu={gpu}")
        assert code == 0 and "-> fits" in out, out
    plan = make_plan(compose_config(["+experiment=llama1_65b", "peft=qlora", *GUANACO]), get_gpu("a6000"), 1, 1)
    states = plan.memory.states
    assert states["frozen_base"] / GIB == pytest.approx(32.09, abs=0.01)       # NF4 projections + bf16 vocab
    assert trainable_parameters(plan.layout) == 80 * 64 * (4 * 2 * 8192 + 3 * (8192 + 22016))
    assert 47.5 * GIB < plan.memory.peak <= 48 * GIB                           # at the optimizer step
    assert plan.time is None and "not modelled for peft.method=qlora" in format_report(plan)


def test_llama2_13b_on_one_24gb_gpu_fits_with_qlora_not_with_lora(capsys):
    for gpu in ("rtx4090", "a10", "l4"):
        code, out = plan_cli(capsys, "model=llama2_13b", "peft=qlora", *GUANACO, f"gpu={gpu}")
        assert code == 0 and "-> fits" in out, out
    code, out = plan_cli(capsys, "model=llama2_13b", "peft=lora", *GUANACO, "gpu=rtx4090")
    assert code == 1 and "the run does not fit" in out and "frozen_base 24.2" in out  # 13.0B x 2 B alone
    assert "raise parallel.tensor_parallel" in out
    code, out = plan_cli(capsys, "model=llama2_7b", "peft=lora", *GUANACO, "gpu=rtx4090")
    assert code == 0, out


def test_the_papers_formula_figures():
    """Sec. 1 and 3: double quantisation saves 0.373 bits per parameter, about 3 GB for 65B; Sec. 1: 16-bit
    finetuning of 65B needs more than 780 GB (at 12 bytes per parameter)."""
    lay = layout_from_config(compose_config(["+experiment=llama1_65b", "peft=qlora", "++model.activation=full"]), 1, 1)
    sizes = [r * c for r, c in projection_shapes(lay.model, 1).values()] * lay.model.n_layers
    saving = sum(n * (0.5 + 4 / 64) - nf4_storage_bytes(n) for n in sizes)
    assert saving / 3e9 == pytest.approx(1, abs=0.01)
    assert 12 * count_parameters(lay.model) / 780e9 == pytest.approx(1, abs=0.01)
