"""Hugging Face's Llama config.json and our ModelConfig, both ways (torch-free).

`hf_config` writes the config.json of a LlamaForCausalLM with the architecture of Llama(cfg), plus a
`llama_pt` entry recording how the SwiGLU width was derived and the vocabulary padding; vocab_size is the
real vocabulary (the folder's tables have no padding rows). `model_config_from_hf` reads one back, and
refuses with one line naming the field anything llama_pt cannot represent (biases, tied embeddings,
scaled or partial RoPE, another activation).
"""
from __future__ import annotations

from typing import Any, Mapping

from .fields import ConfigError
from .model import ModelConfig


def hf_config(cfg: ModelConfig, dtype: Any, bos_id: int = 1, eos_id: int = 2) -> dict[str, Any]:
    """The config.json of a LlamaForCausalLM with the same architecture as Llama(cfg); `dtype` a torch dtype
    or its name ("bfloat16")."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # read by transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": cfg.vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        # How llama_pt derives intermediate_size and pads the vocabulary, so that import_hf gives back the very
        # same ModelConfig.
        "llama_pt": {"multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
                     "vocab_multiple": cfg.vocab_multiple},
    }


def _ffn_shape(dim: int, intermediate: int, hint: Mapping[str, Any], where: str) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which ModelConfig.ffn_hidden_dim equals `intermediate`.

    Tried in order: the values llama_pt wrote at export, powers of two without multiplier (LLaMA-1/2
    style), and finally multiple_of=intermediate_size, which always fits.
    """
    base = int(2 * (4 * dim) / 3)
    candidates = []
    if "multiple_of" in hint:
        candidates.append((int(hint["multiple_of"]), hint.get("ffn_dim_multiplier")))
    candidates += [(2**k, None) for k in range(12, -1, -1)]
    candidates.append((intermediate, None if base <= intermediate else intermediate / base))
    for multiple_of, multiplier in candidates:
        cfg = ModelConfig(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                          ffn_dim_multiplier=multiplier)
        if cfg.ffn_hidden_dim == intermediate:
            return multiple_of, multiplier
    raise ConfigError(f"{where}: intermediate_size={intermediate} cannot be represented for hidden_size={dim}")


def model_config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig for a Hugging Face Llama config; ConfigError naming the first field llama_pt cannot represent."""
    def need(key: str):
        if key not in config:
            raise ConfigError(f"{where}: missing field {key}")
        return config[key]

    def refuse(key: str, value: Any, why: str):
        raise ConfigError(f"{where}: {key}={value!r} is not supported by llama_pt ({why})")

    if config.get("model_type", "llama") != "llama":
        refuse("model_type", config["model_type"], "only 'llama' is")
    if config.get("rope_scaling"):
        refuse("rope_scaling", config["rope_scaling"], "plain RoPE only")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters.rope_type", rope.get("rope_type", rope.get("type")), "plain RoPE only")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor", rope.get("partial_rotary_factor", config.get("partial_rotary_factor")),
               "RoPE on the full head only")
    for key, allowed, why in (("attention_bias", False, "projections have no bias"),
                              ("mlp_bias", False, "projections have no bias"),
                              ("tie_word_embeddings", False, "the output head is untied"),
                              ("hidden_act", "silu", "SwiGLU uses SiLU"),
                              ("attention_dropout", 0.0, "no dropout")):
        if key in config and config[key] != allowed:
            refuse(key, config[key], why)
    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if config.get("head_dim") not in (None, dim // n_heads):
        refuse("head_dim", config["head_dim"], f"must be hidden_size/num_attention_heads={dim // n_heads}")
    hint = config.get("llama_pt") or {}
    multiple_of, multiplier = _ffn_shape(dim, int(need("intermediate_size")), hint, where)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    try:
        return ModelConfig(
            dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=n_heads, vocab_size=int(need("vocab_size")),
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads), multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier, norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), max_seq_len=int(config.get("max_position_embeddings", 2048)),
            init_std=float(config.get("initializer_range", 0.02)),
            vocab_multiple=int(hint.get("vocab_multiple", ModelConfig.vocab_multiple)),
        ).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
