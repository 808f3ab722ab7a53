"""LoRA adapters and peft, checked by peft itself: our adapters load onto our Hugging Face export with our
logits, peft's adapters import into our model with peft's logits, and our merge equals merge_and_unload."""
import pytest
import torch

from llama_pt.adapters.lora import LoRASettings, lora_plan, merge
from llama_pt.adapters.peft_format import AdapterSpec, export_peft, import_peft
from llama_pt.hf_interop import export_hf
from llama_pt.model import Llama, ModelConfig
from llama_pt.model.module_plan import apply_module_plan

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CFG = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=256, multiple_of=32, max_seq_len=64)
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
REL_TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _adapted_model(spec: AdapterSpec, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(CFG)
    apply_module_plan(model, lora_plan(list(spec.targets), spec.settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)  # B starts at zero; a trained adapter does not
    return model.eval()


def _base_state(model: Llama) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".adapter." not in k}


def _hf_base(model: Llama, folder):
    export_hf(_base_state(model), CFG, folder, dtype=torch.float32)
    return transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def test_our_adapter_loads_in_peft_with_our_logits(tmp_path):
    spec = AdapterSpec(LoRASettings(rank=4, alpha=8.0, dropout=0.05), TARGETS)
    model = _adapted_model(spec)
    base = _hf_base(model, tmp_path / "base")
    export_peft({k: v for k, v in model.state_dict().items() if ".adapter." in k}, spec, tmp_path / "adapter",
                base_model=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), peft_model(tokens).logits
    assert rel_err(ours, theirs) <= REL_TOL


def test_a_peft_trained_adapter_imports_with_peft_logits(tmp_path):
    torch.manual_seed(3)
    plain = Llama(CFG)
    base = _hf_base(plain, tmp_path / "base")
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(base, config)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    tokens = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # a few real steps, so B is no longer zero and the head has moved
        loss = peft_model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.save_pretrained(tmp_path / "adapter")
    spec, tensors = import_peft(tmp_path / "adapter")
    assert spec.targets == ("w2", "wq", "wv") and spec.modules_to_save == ("output",)
    assert (spec.settings.rank, spec.settings.alpha) == (8, 16.0)
    ours = Llama(CFG)
    ours.load_state_dict(plain.state_dict())
    apply_module_plan(ours, lora_plan(list(spec.targets), spec.settings))
    missing = set(tensors) - set(ours.state_dict())
    assert not missing, missing
    ours.load_state_dict({**ours.state_dict(), **tensors})
    with torch.no_grad():
        theirs = peft_model.eval()(tokens).logits
        assert rel_err(ours.eval()(tokens), theirs) <= REL_TOL


def test_merged_weights_equal_merge_and_unload_bitwise(tmp_path):
    spec = AdapterSpec(LoRASettings(rank=4, alpha=8.0), TARGETS)
    model = _adapted_model(spec, seed=5)
    base = _hf_base(model, tmp_path / "base")
    export_peft({k: v for k, v in model.state_dict().items() if ".adapter." in k}, spec, tmp_path / "adapter")
    merged_peft = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    merge(model)
    from llama_pt.hf_interop import to_hf_name
    for name, value in model.state_dict().items():
        assert torch.equal(value, merged_peft[to_hf_name(name)]), name


def test_only_plain_lora_is_imported(tmp_path):
    spec = AdapterSpec(LoRASettings(rank=2, alpha=2.0), ("wq",))
    export_peft({}, spec, tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json")
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        import_peft(tmp_path / "a")
