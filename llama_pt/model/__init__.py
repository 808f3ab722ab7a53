"""The LLaMA model in plain PyTorch; its configuration and presets live in the torch-free llama_pt.config."""
from ..config import PRESETS, ConfigError, ModelConfig, count_parameters, flops_per_token, get_preset
from .llama import KVCache, Llama
from .vocab import VOCAB_ROWS, mask_padded_vocab

__all__ = ["ConfigError", "KVCache", "Llama", "ModelConfig", "PRESETS", "VOCAB_ROWS", "count_parameters",
           "flops_per_token", "get_preset", "mask_padded_vocab"]
