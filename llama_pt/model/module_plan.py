"""Transforming a model from outside: a plan maps module paths to what replaces the module found there.

A plan is a sequence of (pattern, transform) pairs. A pattern is a module path as `named_modules` gives
it, where `*` stands for one path component (`layers.*.attention.wq`) and a leading `*` for any prefix
(`*norm`). Entries are applied in order, each to every module its pattern matches, so a later entry sees
what earlier ones put in place. A transform is called as `transform(path, module)` and returns the module
to put at that path (the same one when it only marks or hooks it). Tensor parallelism
(llama_pt.parallel.tensor_parallel) is such a plan; adapters that wrap linear layers are another.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch.nn as nn

Transform = Callable[[str, nn.Module], nn.Module]


def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\*", r"[^.]+")
    if pattern.startswith("*"):
        body = r"(?:.+\.)?[^.]*" + body[len(r"[^.]+"):]
    return re.compile(body + r"\Z")


def matching_paths(model: nn.Module, pattern: str) -> list[str]:
    """Paths of the submodules of `model` that `pattern` names, in `named_modules` order."""
    regex = _regex(pattern)
    return [name for name, _ in model.named_modules() if name and regex.match(name)]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def _inside(path: str, within: str) -> bool:
    return path == within or path.startswith(within + ".")


def apply_module_plan(model: nn.Module, plan: Iterable[tuple[str, Transform]],
                      within: Optional[str] = None) -> nn.Module:
    """Apply every entry of `plan` to `model` in place; returns the model. A pattern that names no module
    is an error (a plan written for another architecture).

    `within`: apply the plan only to the modules at or under this path (a model transformed part by part as
    it is materialized, llama_pt.train.model_setup); a pattern naming nothing there is then no error."""
    for pattern, transform in plan:
        paths = matching_paths(model, pattern)
        if within is not None:
            paths = [path for path in paths if _inside(path, within)]
        elif not paths:
            raise ValueError(f"module plan: {pattern!r} names no module of {type(model).__name__}")
        for path in paths:
            module = model.get_submodule(path)
            new = transform(path, module)
            if new is not module:
                replace_module(model, path, new)
    return model
