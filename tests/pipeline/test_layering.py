"""The shape of data_pipeline's code: no import cycles among its modules, and no torch where the CLI,
the recipes, the steps and the tools are loaded."""
import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = "data_pipeline"
ROOT = Path(__file__).resolve().parents[2]
# A registry entry that names a module to import later: "data_pipeline.steps.lid:LanguageID".
_MODULE_STRING = re.compile(r"^data_pipeline(?:\.\w+)+(?::\w+)?$")


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name, for its __init__)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _closest(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module of the package, else the nearest package or module above it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its code (at the top, inside a
    function, or by name through a registry string)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.update(f"{source}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            targets.add(node.value.partition(":")[0])
    found = {_closest(t, modules) for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
    return {m for m in found if m is not None and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) for each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(group, graph) for group in groups]


def _path_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle inside ``group`` (modules that all reach each other) from its first module back to it."""
    start, members = group[0], set(group)
    path, seen = [start], {start}

    def walk(v: str) -> list[str] | None:
        for w in sorted(graph[v] & members):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                path.append(w)
                found = walk(w)
                if found:
                    return found
                path.pop()
        return None

    return walk(start) or group


def test_the_import_graph_is_read():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert {"data_pipeline.cli", "data_pipeline.task", "data_pipeline.steps.lid",
            "data_pipeline.tools.train_lm"} <= set(graph)
    assert "data_pipeline.task" in graph["data_pipeline.slurm"]  # from .task import ...
    assert "data_pipeline.step" in graph["data_pipeline.steps.lid"]  # from ..step import ...
    assert "data_pipeline.steps.lid" in graph["data_pipeline.steps"]  # "data_pipeline.steps.lid:LanguageID"
    assert "data_pipeline.tools.train_lm" in graph["data_pipeline.tools"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _cycles(graph) == []


def test_cli_recipes_steps_and_tools_load_without_torch():
    code = """
import importlib, pkgutil, sys
import data_pipeline
for module in pkgutil.walk_packages(data_pipeline.__path__, "data_pipeline."):
    importlib.import_module(module.name)
from data_pipeline.cli import build_parser
from data_pipeline.recipe import load_recipe
build_parser()
for recipe in ("demo", "llama1"):
    load_recipe(recipe, check_inputs=False)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded[:5]
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
