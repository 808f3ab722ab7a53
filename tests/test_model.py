"""The LLaMA module against the paper's published sizes and its own definitions."""
import math

import pytest
import torch

from llama_pt.model import PRESETS, ConfigError, Llama, ModelConfig, count_parameters, get_preset
from llama_pt.model.llama import RMSNorm, apply_rope, rope_tables


@pytest.mark.parametrize("preset, published", [
    ("llama1_7b", 6.7e9), ("llama1_13b", 13.0e9), ("llama1_33b", 32.5e9), ("llama1_65b", 65.2e9)])
def test_llama1_presets_match_published_parameter_counts(preset, published):
    # The paper truncates to one decimal in billions (Table 2): 65,285,660,672 parameters -> "65.2B".
    assert math.floor(count_parameters(get_preset(preset)) / 1e8) == round(published / 1e8)


@pytest.mark.parametrize("preset, hidden", [("llama1_7b", 11008), ("llama1_65b", 22016), ("llama2_70b", 28672),
                                            ("llama3_8b", 14336)])
def test_ffn_hidden_size_rounding(preset, hidden):
    assert get_preset(preset).ffn_hidden_dim == hidden


@pytest.mark.parametrize("preset", ["tiny", "demo", "llama_125m", "padded"])
def test_parameter_counter_equals_module(preset):
    cfg = get_preset(preset) if preset != "padded" else ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=1000)
    with torch.device("meta"):
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


def test_gqa_shapes_and_forward():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, multiple_of=16, max_seq_len=32)
    model = Llama(cfg)
    assert model.layers[0].attention.wk.weight.shape == (2 * 8, 64)
    logits = model(torch.randint(0, 100, (3, 10)))
    assert logits.shape == (3, 10, 128)  # the vocabulary of 100 padded to a multiple of 64


def test_vocabulary_is_padded_with_zero_rows():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=1000)
    assert (cfg.vocab_multiple, cfg.padded_vocab_size) == (64, 1024)
    assert ModelConfig(**{**cfg.to_dict(), "vocab_multiple": 1}).padded_vocab_size == 1000
    model = Llama(cfg)
    for table in (model.tok_embeddings.weight, model.output.weight):
        assert table.shape == (1024, 64)
        assert torch.count_nonzero(table[1000:]) == 0 and torch.count_nonzero(table[:1000]) == 1000 * 64
    assert all(p.padded_vocab_size == p.vocab_size for p in PRESETS.values())  # no preset is padded
    with pytest.raises(ConfigError, match="model.vocab_multiple=0"):
        ModelConfig.from_dict({**cfg.to_dict(), "vocab_multiple": 0})


def test_model_config_stored_before_padding_existed_still_loads():
    """A checkpoint's model_config without vocab_multiple: tables of exactly vocab_size rows."""
    stored = {k: v for k, v in get_preset("tiny").to_dict().items() if k != "vocab_multiple"}
    assert ModelConfig.from_stored(stored) == get_preset("tiny")  # equal to the preset: a resume goes on
    odd = ModelConfig.from_stored({**stored, "vocab_size": 1000})
    assert (odd.vocab_multiple, odd.padded_vocab_size) == (1, 1000)
    assert ModelConfig.from_stored(get_preset("demo").to_dict()) == get_preset("demo")


def test_causality():
    torch.manual_seed(0)
    model = Llama(get_preset("tiny"))
    x = torch.randint(0, 512, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 7) % 512
    assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-6)
    assert not torch.allclose(model(x)[0, 8:], model(y)[0, 8:], atol=1e-6)


def test_rmsnorm_definition():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data.uniform_()
    x = torch.randn(4, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_is_a_relative_rotation():
    # <R(m) q, R(n) k> depends only on m - n (Su et al. 2021, Section 3.4).
    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()
    assert math.isclose(score(5, 2), score(40, 37), rel_tol=1e-5)
    assert not math.isclose(score(5, 2), score(5, 3), rel_tol=1e-3)


@pytest.mark.parametrize("changes, field", [
    (dict(dim=65), "n_heads"), (dict(n_kv_heads=3), "n_kv_heads"), (dict(n_heads=0), "n_heads")])
def test_invalid_model_config_names_the_field(changes, field):
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=100)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**base, **changes})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="model.preset='nope'"):
        get_preset("nope")


def test_sequence_beyond_rope_table_is_refused():
    model = Llama(get_preset("tiny"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 257, dtype=torch.long))
