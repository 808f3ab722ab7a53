"""The torch-free config layer: the error every bad setting raises and the typed config sections."""
from .fields import ConfigError, reject_unknown_fields

__all__ = ["ConfigError", "reject_unknown_fields"]
