"""The LLaMA model in plain PyTorch; its configuration and presets live in the torch-free llama_pt.config."""
from ..config import PRESETS, ConfigError, ModelConfig, count_parameters, flops_per_token, get_preset
from .llama import KVCache, Llama

__all__ = ["ConfigError", "KVCache", "Llama", "ModelConfig", "PRESETS", "count_parameters",
           "flops_per_token", "get_preset"]
