"""Same weights, same logits as transformers' LlamaForCausalLM; HF folders exported and imported."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from llama_pt.hf_interop import NAME_MAP, export_hf, hf_config, import_hf, to_hf_name
from llama_pt.model import VOCAB_ROWS, ConfigError, Llama, ModelConfig
from llama_pt.tokenizer import Tokenizer, train_sentencepiece

TOL = 1e-5
CONFIGS = {
    "mha": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128),
    "gqa_ffn_mult_theta": ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=300, multiple_of=16,
                                      ffn_dim_multiplier=1.3, rope_theta=500000.0, norm_eps=1e-5,
                                      max_seq_len=128),
    "mqa": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=200, multiple_of=64,
                       rope_theta=1e6, max_seq_len=128),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_model(cfg: ModelConfig, seed: int = 0) -> Llama:
    """All parameters random, norm weights included, so a swapped or misplaced tensor shows in the logits; the
    padding rows of the vocabulary zero, as in every Llama."""
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
            if name in VOCAB_ROWS:
                p[cfg.vocab_size:] = 0.0
    return model


def hf_model(cfg: ModelConfig, state: dict, attn: str) -> LlamaForCausalLM:
    values = {k: v for k, v in hf_config(cfg, torch.float32).items()
              if k not in ("architectures", "model_type", "torch_dtype", "dtype", "llama_pt")}
    model = LlamaForCausalLM._from_config(LlamaConfig(**values), attn_implementation=attn, dtype=torch.float32)
    model.load_state_dict({to_hf_name(k): v[:cfg.vocab_size] if k in VOCAB_ROWS else v for k, v in state.items()},
                          strict=True)
    return model.eval()


def logits_pair(ours: Llama, hf: LlamaForCausalLM, seq: int = 96, seed: int = 1):
    """Our logits over the real vocabulary (the padding ids' columns trimmed) and transformers'."""
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ours(tokens)[..., :ours.cfg.vocab_size], hf(tokens).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_weights_same_logits(name, attn):
    cfg = CONFIGS[name]
    ours = random_model(cfg)
    a, b = logits_pair(ours, hf_model(cfg, ours.state_dict(), attn))
    assert b.std() > 0.1  # far from uniform: the comparison has something to compare
    assert rel_err(a, b) <= TOL, f"{name}/{attn}: relative error {rel_err(a, b):.2e}"


def test_interleaved_rope_layout_would_be_caught():
    """Meta's original checkpoints pair dims (2i, 2i+1); loading those unpermuted must fail parity."""
    cfg = CONFIGS["mha"]
    ours = random_model(cfg)
    state = dict(ours.state_dict())
    hd = cfg.head_dim
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # rotate-half order -> interleaved order
    for i in range(cfg.n_layers):
        for w in ("wq", "wk"):
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = state[key].view(-1, hd, cfg.dim)[:, perm].reshape(-1, cfg.dim)
    a, b = logits_pair(ours, hf_model(cfg, state, "eager"))
    assert rel_err(a, b) > 100 * TOL


def test_name_map_covers_every_parameter_once():
    cfg = CONFIGS["gqa_ffn_mult_theta"]
    ours = set(Llama(cfg).state_dict())
    hf = set(hf_model(cfg, Llama(cfg).state_dict(), "eager").state_dict())
    assert {to_hf_name(n) for n in ours} == hf
    assert len({hf_name for _, hf_name in NAME_MAP}) == len(NAME_MAP)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    texts = [Path("/usr/share/common-licenses", n).read_text(encoding="utf-8") for n in ("GPL-3", "Apache-2.0")]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "spm", 600)


def test_export_loads_in_transformers(tmp_path, tokenizer_path):
    cfg = CONFIGS["gqa_ffn_mult_theta"]
    cfg = ModelConfig(**{**cfg.to_dict(), "vocab_size": 600})
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf", tokenizer_path=tokenizer_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left behind
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    c = hf.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.rms_norm_eps, c.max_position_embeddings, c.vocab_size) == \
        (96, cfg.ffn_hidden_dim, 3, 6, 2, 1e-5, 128, 600)
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.tie_word_embeddings is False
    a, b = logits_pair(ours, hf)
    assert rel_err(a, b) <= TOL
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)


def test_exported_tokenizer_encodes_like_ours(tmp_path, tokenizer_path):
    cfg = ModelConfig(**{**CONFIGS["mha"].to_dict(), "vocab_size": 600})
    out = export_hf(Llama(cfg), cfg, tmp_path / "hf", tokenizer_path=tokenizer_path)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(tokenizer_path)
    assert type(hf_tok).__name__ in ("LlamaTokenizer", "LlamaTokenizerFast")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (1, 2, 0)
    texts = [Path("/usr/share/common-licenses", n).read_text(encoding="utf-8").strip()
             for n in ("GPL-3", "MPL-2.0", "LGPL-2.1")]  # MPL and LGPL were not in the training text
    texts += ["Digits 2024 and 3.14159", "unseen 🦙 Ωμέγα ﬁ", "two  spaces\tand\ttabs\n\n\nnewlines"]
    for text in texts:
        ids = ours.encode(text, bos=True)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids, skip_special_tokens=True) == text


def test_import_round_trip_is_bitwise(tmp_path):
    cfg = CONFIGS["gqa_ffn_mult_theta"]
    ours = random_model(cfg)
    # Tiny shards force the sharded layout (index + several files).
    out = export_hf(ours.state_dict(), cfg, tmp_path / "hf", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    cfg2, state = import_hf(out)
    assert cfg2 == cfg
    original = ours.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    again = Llama(cfg2)
    again.load_state_dict(state)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    a, b = logits_pair(again.eval(), hf)
    assert rel_err(a, b) <= TOL


def test_padded_vocabulary_is_trimmed_on_export_and_padded_on_import(tmp_path):
    """Vocabulary 1000 padded to 1024 in llama_pt; 1000 rows in the folder, as transformers expects."""
    cfg = ModelConfig(**{**CONFIGS["gqa_ffn_mult_theta"].to_dict(), "vocab_size": 1000})
    assert cfg.padded_vocab_size == 1024
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1000
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.model.embed_tokens.weight.shape == hf.lm_head.weight.shape == (1000, 96)
    a, b = logits_pair(ours, hf)
    assert a.shape == b.shape == (2, 96, 1000) and rel_err(a, b) <= TOL
    cfg2, state = import_hf(out)
    assert cfg2 == cfg
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())  # zero padding rows come back
    assert state["output.weight"].shape == (1024, 96)


def test_bf16_export_and_reimport(tmp_path):
    cfg = CONFIGS["mha"]
    ours = random_model(cfg)
    out = export_hf(ours, cfg, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, state = import_hf(out)
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.to(torch.bfloat16))
               for k, v in ours.state_dict().items())


def test_import_folder_written_by_transformers(tmp_path):
    """A folder saved by transformers itself (its own config.json format) continues in llama_pt."""
    hf_cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "saved")
    cfg, state = import_hf(tmp_path / "saved")
    assert (cfg.ffn_hidden_dim, cfg.kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len) == \
        (176, 2, 20000.0, 1e-5, 64)
    ours = Llama(cfg)
    ours.load_state_dict(state)
    a, b = logits_pair(ours.eval(), hf, seq=48)
    assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("tie_word_embeddings", True),
    ("hidden_act", "gelu"),
    ("head_dim", 32),
    ("model_type", "mistral"),
])
def test_import_refuses_what_it_cannot_represent(tmp_path, field, value):
    cfg = CONFIGS["mha"]
    out = export_hf(Llama(cfg), cfg, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config[field] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        import_hf(out)
    message = str(info.value)
    assert field in message and "config.json" in message and "\n" not in message


def test_import_and_export_errors(tmp_path, tokenizer_path):
    cfg = CONFIGS["mha"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path)
    out = export_hf(Llama(cfg), cfg, tmp_path / "hf")
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        import_hf(out)
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        import_hf(out)
    state = Llama(cfg).state_dict()
    del state["layers.1.ffn_norm.weight"]
    with pytest.raises(ValueError, match="layers.1.ffn_norm.weight"):
        export_hf(state, cfg, tmp_path / "broken")
    wrong = ModelConfig(**{**cfg.to_dict(), "vocab_size": 300})
    with pytest.raises(ValueError, match="tok_embeddings.weight"):
        export_hf(Llama(cfg), wrong, tmp_path / "broken")
    with pytest.raises(ValueError, match="vocab_size=256"):  # 600 tokenizer pieces, 256 embedding rows
        export_hf(Llama(cfg), cfg, tmp_path / "broken", tokenizer_path=tokenizer_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_replaces_existing_folder_atomically(tmp_path):
    cfg = CONFIGS["mha"]
    first, second = random_model(cfg, seed=1), random_model(cfg, seed=2)
    export_hf(first, cfg, tmp_path / "hf")
    (tmp_path / "hf" / "stale.txt").write_text("old")
    export_hf(second, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    _, state = import_hf(tmp_path / "hf")
    assert torch.equal(state["output.weight"], second.state_dict()["output.weight"])
