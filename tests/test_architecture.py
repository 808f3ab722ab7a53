"""The layering docs/ARCHITECTURE.md declares, checked against every import in llama_pt and data_pipeline."""
import ast
import subprocess
import sys
from pathlib import Path

from support import REPO

PACKAGES = ("llama_pt", "data_pipeline")


def declared_layering() -> dict[str, set[str]]:
    """room -> the rooms it may import, from the table between the layering markers of ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("<!-- BEGIN layering")[1].split("<!-- END layering -->")[0]
    rooms = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`")
        allowed = set() if cells[2] == "—" else {c.strip() for c in cells[2].split(",")}
        rooms[room] = {a if a == "data_pipeline" else f"llama_pt.{a}" for a in allowed}
    return rooms


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (top level or inside functions), relative imports made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def room_of(module: str, rooms: dict[str, set[str]]) -> str:
    if module.startswith("data_pipeline"):
        return "data_pipeline"
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def test_the_table_is_read():
    rooms = declared_layering()
    assert rooms["llama_pt.config"] == set() and "llama_pt.parallel" in rooms["llama_pt.blocks"]
    assert rooms["data_pipeline"] == {"llama_pt.config", "llama_pt.atomic", "llama_pt.tokenizer", "llama_pt.data"}


def test_every_room_is_declared():
    rooms = declared_layering()
    present = {room_of(module_name(p), rooms) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert present - {"llama_pt"} == set(rooms)


def test_no_import_runs_against_the_layering():
    rooms = declared_layering()
    wrong = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            source = room_of(module_name(path), rooms)
            for target in imported_modules(path):
                room = room_of(target, rooms)
                if room in (source, "llama_pt") or room not in rooms:
                    continue  # within the room, the package root, or a name imported from a module
                if room not in rooms.get(source, set()):
                    wrong.append(f"{path.relative_to(REPO)} imports {target} ({source} may not import {room})")
    assert not wrong, "\n".join(wrong)


def test_a_planted_upward_import_is_caught():
    """The check sees imports inside functions too: a model module importing the trainer is reported."""
    planted = REPO / "llama_pt" / "model" / "_planted_for_test.py"
    planted.write_text("def f():\n    from ..train import trainer\n")
    try:
        rooms = declared_layering()
        targets = imported_modules(planted)
        assert "llama_pt.train" in targets and room_of("llama_pt.train", rooms) not in rooms["llama_pt.model"]
    finally:
        planted.unlink()


def test_the_config_layer_imports_no_torch():
    code = ("import sys; import llama_pt.config, llama_pt.config.mixtures, llama_pt.atomic; "
            "from llama_pt.config import resolve, compose_config; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
