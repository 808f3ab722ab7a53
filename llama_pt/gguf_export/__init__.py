"""GGUF files for llama.cpp (.export) and llama.cpp itself running them (.llamacpp)."""
from .export import GGUF_TYPES, GGUFContents, GGUFExport, export_gguf, read_gguf

__all__ = ["GGUF_TYPES", "GGUFContents", "GGUFExport", "export_gguf", "read_gguf"]
