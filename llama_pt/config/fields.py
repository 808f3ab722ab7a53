"""The error every bad setting raises, and the checks shared by every typed config section.

Torch-free: the data pipeline, the planner and the launcher check import it without torch.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line that names the field."""


def reject_unknown_fields(cls, values: Mapping[str, Any], prefix: str) -> None:
    """ConfigError naming the first key of ``values`` that is not a field of the dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not a known field (known: {', '.join(sorted(known))})")
