"""What is evaluated: lm-eval task files over local data, the tasks shipped in data/eval/, lm-eval's own tasks by
name, and the LLaMA paper's benchmark suites (Touvron et al. 2023, Sec. 3) by name with the paper's shot counts.

A task file is lm-evaluation-harness's YAML task format (`lm_eval.config.task.TaskConfig`'s fields) whose
`dataset_path: json` reads local JSON or JSON-lines files named in `dataset_kwargs.data_files`, relative to
the YAML file's folder. `load_task_file` checks a file before any model is loaded or data read by lm-eval:
an unknown field, a missing one, a data file that is not there, or an item without a field that the prompt
templates use (doc_to_text, doc_to_target, doc_to_choice, Jinja as lm-eval renders them) is one
`TaskFileError` line naming the file and the field.

The suites (`SUITES`) name lm-eval's tasks for the paper's tables: Table 3's zero-shot common-sense
reasoning (Sec. 3.1: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC easy and challenge, OpenBookQA), Tables 4-5's
closed-book question answering at 0, 1, 5 and 64 shots (Sec. 3.2: NaturalQuestions, TriviaQA), Table 6's
reading comprehension (Sec. 3.3: RACE, zero-shot; lm-eval's `race` is RACE-high) and Table 9's MMLU (Sec. 3.6,
5-shot). lm-eval fetches their data from the Hugging Face hub; offline (HF_HUB_OFFLINE=1) only what the
datasets cache holds is used, and `build_tasks` names every task whose data is not there in one line before
any model is loaded. lm-eval's `acc_norm` is the paper's completion likelihood normalised by its number of
characters (Sec. 3, after Gao et al. 2021); the paper's other normalisation for OpenBookQA and BoolQ,
P(completion | context) / P(completion | "Answer:"), is not one of lm-eval's metrics for these tasks.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional, Union, get_args

from jinja2 import Environment, meta, nodes
from lm_eval import simple_evaluate
from lm_eval.api.group import Group
from lm_eval.api.instance import OutputType
from lm_eval.api.model import LM
from lm_eval.api.task import Task
from lm_eval.config.task import TaskConfig
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's YAML loader (include:, !function), lm-eval pinned

SHIPPED_TASKS = Path(__file__).resolve().parents[2] / "data" / "eval"

# (lm-eval task or group, shots) per suite: the paper's Tables 3, 4-5, 6 and 9.
SUITES: dict[str, tuple[tuple[str, int], ...]] = {
    "llama1_zero_shot": tuple((task, 0) for task in ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande",
                                                      "arc_easy", "arc_challenge", "openbookqa")),
    "llama1_closed_book_qa": tuple((task, shots) for task in ("nq_open", "triviaqa") for shots in (0, 1, 5, 64)),
    "llama1_race": (("race", 0),),
    "llama1_mmlu": (("mmlu", 5),),
}
SUITES["llama1"] = tuple(entry for suite in list(SUITES.values()) for entry in suite)

TEMPLATE_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice")
_JINJA = Environment()

# A task to run: a checked local task config (a dict), or the name of one of lm-eval's tasks or groups.
TaskSpec = Union[dict[str, Any], str]


class TaskFileError(ValueError):
    """A task file that lm-eval would not run as meant: one line naming the file and the field."""


class TaskDataMissing(FileNotFoundError):
    """lm-eval tasks whose data is not available (offline: not in the datasets cache); one line naming them."""


def shipped_tasks() -> dict[str, Path]:
    """The task files shipped in data/eval/, by name (the file's stem, which is its `task:`)."""
    return {path.stem: path for path in sorted(SHIPPED_TASKS.glob("*.yaml"))}


def resolve_names(names: list[str]) -> list[tuple[TaskSpec, Optional[int]]]:
    """(task, shots) for each name given: a suite's entries with the paper's shots; a YAML file, or a task
    shipped in data/eval/, as its checked config with None (its own num_fewshot, else zero); any other name as
    one of lm-eval's tasks or groups, None. Every task file is checked here, before any work."""
    out: list[tuple[TaskSpec, Optional[int]]] = []
    shipped = shipped_tasks()
    for name in names:
        if name in SUITES:
            out.extend(SUITES[name])
        elif name in shipped or name.endswith((".yaml", ".yml")):
            out.append((load_task_file(shipped.get(name, name)), None))
        else:
            out.append((name, None))
    return out


def load_task_file(path: str | Path) -> dict[str, Any]:
    """The checked config of one lm-eval task file, its data files made absolute (relative ones are read from
    the YAML file's folder); TaskFileError names the file and the field that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file")
    try:
        cfg = load_yaml(path)
    except Exception as e:  # YAML syntax, a missing include or !function module: reported as one line
        raise TaskFileError(f"{path}: not a readable lm-eval task file ({type(e).__name__}: {e})") from None
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    for key in cfg:
        if key not in known:
            raise TaskFileError(f"{path}: unknown field {key!r} (not one of lm-eval's TaskConfig fields)")
    for key in ("task", "dataset_path", "output_type", "doc_to_text", "doc_to_target"):
        if cfg.get(key) in (None, ""):
            raise TaskFileError(f"{path}: field {key!r} is missing")
    if cfg["output_type"] not in get_args(OutputType):
        raise TaskFileError(f"{path}: output_type={cfg['output_type']!r} is none of {', '.join(get_args(OutputType))}")
    if cfg["output_type"] == "multiple_choice" and not cfg.get("doc_to_choice"):
        raise TaskFileError(f"{path}: field 'doc_to_choice' is missing (output_type: multiple_choice)")
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if data_files is not None:
        cfg["dataset_kwargs"]["data_files"] = _absolute(data_files, path)
        if not cfg.get("process_docs"):  # processed documents may have fields that the files have not
            for file in _files(cfg["dataset_kwargs"]["data_files"]):
                _check_items(cfg, path, file)
    return cfg


def _absolute(data_files: Any, yaml_path: Path) -> Any:
    """data_files (a path, a list, or a mapping of split to either) with relative paths under the YAML's folder."""
    if isinstance(data_files, dict):
        return {split: _absolute(files, yaml_path) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [_absolute(f, yaml_path) for f in data_files]
    return str(yaml_path.parent / data_files)


def _files(data_files: Any) -> list[Path]:
    if isinstance(data_files, dict):
        return [f for files in data_files.values() for f in _files(files)]
    return [Path(f) for f in (data_files if isinstance(data_files, list) else [data_files])]


def _items(file: Path, yaml_path: Path) -> list[tuple[str, Any]]:
    """(where, item) for each item of a JSON list (where: "item N") or of JSON lines ("line N"), as the json
    loader of `datasets` reads either."""
    if not file.is_file():
        raise TaskFileError(f"{yaml_path}: data file {file} (dataset_kwargs.data_files) does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            items = [(f"item {n}", item) for n, item in enumerate(json.loads(text), 1)]
        else:
            items = [(f"line {n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{file}: not JSON ({e})") from None
    if not items:
        raise TaskFileError(f"{file}: no items")
    return items


def template_fields(template: str) -> set[tuple[str, ...]]:
    """The fields of a document that an lm-eval prompt template reads: ("goal",), ("choices", "text"), ...

    A bare name is a field, as lm-eval reads it (`doc_to_target: label`); in a Jinja template, every variable
    it does not set itself, with the attributes read from it (`choices.text` -> ("choices", "text"))."""
    if "{{" not in template and "{%" not in template:
        return {(template,)} if template.isidentifier() else set()
    tree = _JINJA.parse(template)
    free = meta.find_undeclared_variables(tree) - set(_JINJA.globals)
    paths = {(name,) for name in free}
    for node in tree.find_all(nodes.Getattr):
        chain = []
        while isinstance(node, nodes.Getattr):
            chain.append(node.attr)
            node = node.node
        if isinstance(node, nodes.Name) and node.name in free:
            paths.add((node.name, *reversed(chain)))
    return paths


def _check_items(cfg: dict[str, Any], yaml_path: Path, file: Path) -> None:
    """Every item is a JSON object with the fields the templates read (attributes of a mapping are its keys;
    an attribute of anything else, such as a list's `index`, is not a field)."""
    needed = sorted({(key, path) for key in TEMPLATE_FIELDS if isinstance(cfg.get(key), str)
                     for path in template_fields(cfg[key])}, key=lambda kp: kp[1])
    for where, item in _items(file, yaml_path):
        if not isinstance(item, dict):
            raise TaskFileError(f"{file} {where}: an item must be a JSON object, not {type(item).__name__}")
        for key, path in needed:
            value = item
            for depth, part in enumerate(path, 1):
                if not isinstance(value, dict):
                    break
                if part not in value:
                    raise TaskFileError(f"{file} {where}: no field {'.'.join(path[:depth])!r} "
                                        f"(read by {key} of {yaml_path})")
                value = value[part]


def spec_name(spec: TaskSpec) -> str:
    return spec["task"] if isinstance(spec, dict) else spec


def task_manager(specs: list[TaskSpec]) -> TaskManager:
    """lm-eval's task index: its own tasks only when a name asks for one (indexing them takes seconds)."""
    return TaskManager(include_defaults=any(isinstance(spec, str) for spec in specs))


def build_tasks(specs: list[TaskSpec], manager: TaskManager) -> list[Task | Group]:
    """The lm-eval Task (or Group) of each spec, its data loaded; TaskDataMissing names, in one line, every
    lm-eval task whose data could not be read (offline: not in the Hugging Face datasets cache) and its dataset."""
    built: list[Task | Group] = []
    missing, reason = [], ""
    for spec in specs:
        name = spec_name(spec)
        try:
            loaded = manager.load([spec])
        except OSError as e:  # datasets' ConnectionError (offline) and DatasetNotFoundError are OSErrors
            reason = reason or str(e).splitlines()[0]
            dataset = re.search(r"'([\w.-]+(?:/[\w.-]+)?)'", str(e))
            missing.append(f"{name} ({dataset.group(1)})" if dataset else name)
            continue
        except KeyError:
            raise TaskFileError(f"{name}: neither a task file, a task of {SHIPPED_TASKS}, a suite "
                                f"({', '.join(SUITES)}) nor one of lm-eval's tasks") from None
        built.append(loaded["groups"].get(name) or loaded["tasks"][name])
    if missing:
        raise TaskDataMissing(f"the data of {len(missing)} lm-eval task(s) is not available: {', '.join(missing)} "
                              f"({reason}); fetch it once where there is network (HF_HUB_OFFLINE=0), or point "
                              "HF_DATASETS_CACHE at a cache that holds it")
    return built


def leaf_tasks(item: Task | Group) -> list[Task]:
    return item.get_all_tasks() if isinstance(item, Group) else [item]


def evaluate_tasks(lm: LM, runs: list[tuple[Task | Group, Optional[int]]], manager: TaskManager,
                   limit: Optional[int] = None) -> list[dict[str, Any]]:
    """lm-eval's results for each shot count, in the order they first appear: one `lm_eval.simple_evaluate`
    per count, its tasks set to that many shots (None: the task's own num_fewshot, else zero); `limit`
    items per task at most."""
    by_shots: dict[Optional[int], list[Task | Group]] = {}
    for item, shots in runs:
        by_shots.setdefault(shots, []).append(item)
    results = []
    for shots, items in by_shots.items():
        if shots is not None:
            for item in items:
                for task in leaf_tasks(item):
                    task.set_config(key="num_fewshot", value=shots)
        results.append(simple_evaluate(model=lm, tasks=items, limit=limit, task_manager=manager, log_samples=False))
    return results
