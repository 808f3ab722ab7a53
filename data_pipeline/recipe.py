"""Recipes: the YAML files in configs/prep/ that describe a data-prep run, with key=value overrides.

Everything is checked here, before any worker starts: an unknown key, a wrong type, an unknown
step or step argument, an input pattern that matches nothing, a source without a mixture weight —
each is one ``llama_pt.config.ConfigError`` (or ``FileNotFoundError``) whose message names the key or the file.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pt.config import ConfigError
from llama_pt.config.mixtures import MIXTURES

from .executor import LocalExecutor, make_executor
from .pipeline import SourceSpec, StepSpec
from .readers import READERS, expand_paths
from .slurm import SlurmExecutor
from .steps import get_step_class

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs" / "prep"

DEFAULTS: dict[str, Any] = {
    "name": "prep",
    "output_dir": None,
    "executor": "local",
    "workers": 1,
    "progress": True,
    "seed": 0,
    "slurm": {"partition": None, "time_min": 240, "cpus_per_task": 1, "mem_gb": 4.0, "array_parallelism": 256,
              "max_array_size": 1001, "account": None, "qos": None, "constraint": None, "cluster": "slurm",
              "poll_s": 5.0},
    "sources": {},
    "tokenizer": {"model": None, "vocab_size": 32000, "sample_bytes": 50_000_000, "input_sentence_size": 1_000_000,
                  "num_threads": 2, "character_coverage": 0.99995},
    "tokenize": {"batch_size": 256, "valid_fraction": 0.0},
    "mixture": {"preset": None, "weights": {}, "epochs": {}},
    "vars": {},  # free-form values for ${vars.x} interpolation in the recipe
}
SOURCE_DEFAULTS: dict[str, Any] = {"format": "jsonl", "paths": None, "text_key": "text", "id_key": "id",
                                   "max_doc_bytes": 10_000_000, "num_shards": None, "split": None, "steps": {}}
_TYPES = {"workers": int, "seed": int, "progress": bool, "name": str, "output_dir": str}


@dataclass(frozen=True)
class Recipe:
    name: str
    output_dir: Path
    executor: str
    workers: int
    progress: bool
    seed: int
    slurm: dict[str, Any]
    sources: tuple[SourceSpec, ...]
    tokenizer: dict[str, Any]
    tokenize: dict[str, Any]
    mixture: dict[str, Any]

    @property
    def clean_dir(self) -> Path:
        return self.output_dir / "clean"

    @property
    def work_dir(self) -> Path:
        return self.output_dir / "work"

    @property
    def tokenizer_dir(self) -> Path:
        return self.output_dir / "tokenizer"

    @property
    def tokens_dir(self) -> Path:
        return self.output_dir / "tokens"

    def make_executor(self) -> LocalExecutor | SlurmExecutor:
        return make_executor(self.executor, workers=self.workers, progress=self.progress,
                             log_dir=self.output_dir / "slurm_logs", slurm=self.slurm)


def find_recipe(name_or_path: str) -> Path:
    """A recipe file: the path itself, else ``configs/prep/<name>.yaml``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (Path("configs/prep") / f"{name_or_path}.yaml", RECIPE_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe not found: {name_or_path} (neither a file nor configs/prep/{name_or_path}.yaml)")


def load_recipe(name_or_path: str, overrides: list[str] = (), check_inputs: bool = True) -> Recipe:
    """Read, override (``a.b.c=value``), check and build a recipe."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = find_recipe(name_or_path)
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not a valid YAML recipe ({getattr(exc, 'problem', None) or exc}{where})") from None
    except OmegaConfBaseException as exc:
        raise ValueError(f"{path}: not a valid recipe ({str(exc).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must be key=value")
    for item in overrides:
        try:
            loaded = OmegaConf.merge(loaded, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(f"bad override {item!r}: {str(exc).splitlines()[0]}") from None
    merged = loaded
    raw = OmegaConf.to_container(merged, resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys")
    return build_recipe(raw, str(path), check_inputs)


def _section(raw: Any, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key (known: {', '.join(sorted(defaults))})")
    return {**defaults, **raw}


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


def build_recipe(raw: dict[str, Any], where: str = "recipe", check_inputs: bool = True) -> Recipe:
    cfg = _section(raw, DEFAULTS, "")
    for key, typ in _TYPES.items():
        if cfg[key] is not None and not isinstance(cfg[key], typ):
            raise ConfigError(f"{key}={cfg[key]!r} must be of type {typ.__name__}")
    if not cfg["output_dir"]:
        raise ConfigError(f"output_dir: required ({where})")
    if cfg["executor"] not in ("local", "slurm"):
        raise ConfigError(f"executor={cfg['executor']!r} must be local or slurm")
    _positive_int(cfg["workers"], "workers")
    slurm = _section(cfg["slurm"], DEFAULTS["slurm"], "slurm")
    for key in ("time_min", "cpus_per_task", "array_parallelism", "max_array_size"):
        _positive_int(slurm[key], f"slurm.{key}")
    if slurm["cluster"] not in ("slurm", "local", "debug"):
        raise ConfigError(f"slurm.cluster={slurm['cluster']!r} must be slurm, local or debug")
    tokenizer = _section(cfg["tokenizer"], DEFAULTS["tokenizer"], "tokenizer")
    for key in ("vocab_size", "sample_bytes", "input_sentence_size", "num_threads"):
        _positive_int(tokenizer[key], f"tokenizer.{key}")
    if tokenizer["model"] is not None and not Path(tokenizer["model"]).is_file():
        raise FileNotFoundError(f"tokenizer.model: file not found: {tokenizer['model']}")
    tokenize = _section(cfg["tokenize"], DEFAULTS["tokenize"], "tokenize")
    _positive_int(tokenize["batch_size"], "tokenize.batch_size")
    if not isinstance(tokenize["valid_fraction"], (int, float)) or not 0 <= tokenize["valid_fraction"] < 1:
        raise ConfigError(f"tokenize.valid_fraction={tokenize['valid_fraction']!r} must be in [0, 1)")
    if not isinstance(cfg["sources"], dict) or not cfg["sources"]:
        raise ConfigError(f"sources: at least one source is required ({where})")
    sources = tuple(_source(name, spec, check_inputs) for name, spec in cfg["sources"].items())
    mixture = _mixture(cfg["mixture"], [s.name for s in sources])
    return Recipe(name=cfg["name"], output_dir=Path(cfg["output_dir"]), executor=cfg["executor"],
                  workers=cfg["workers"], progress=cfg["progress"], seed=cfg["seed"], slurm=slurm,
                  sources=sources, tokenizer=tokenizer, tokenize=tokenize, mixture=mixture)


def _source(name: str, raw: Any, check_inputs: bool) -> SourceSpec:
    where = f"sources.{name}"
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{where}: a source name must be a plain folder name")
    spec = _section(raw, SOURCE_DEFAULTS, where)
    if spec["format"] not in READERS:
        raise ConfigError(f"{where}.format={spec['format']!r} must be one of {', '.join(READERS)}")
    paths = spec["paths"]
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ConfigError(f"{where}.paths: a glob pattern or a list of them is required")
    if check_inputs:
        for pattern in paths:
            try:
                expand_paths([pattern])
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}.paths: no input matches {pattern}") from None
    _positive_int(spec["max_doc_bytes"], f"{where}.max_doc_bytes")
    if spec["num_shards"] is not None:
        _positive_int(spec["num_shards"], f"{where}.num_shards")
    reader_kwargs = {"text_key": spec["text_key"], "id_key": spec["id_key"], "max_doc_bytes": spec["max_doc_bytes"]}
    if spec["format"] == "hf":
        reader_kwargs["split"] = spec["split"]
    steps = tuple(_step(f"{where}.steps.{key}", key, value)
                  for key, value in (spec["steps"] or {}).items() if value is not None)
    return SourceSpec(name=name, format=spec["format"], paths=tuple(paths), reader_kwargs=reader_kwargs,
                      num_shards=spec["num_shards"], steps=steps)


def _step(where: str, key: str, raw: Any) -> StepSpec:
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a step is a mapping of its arguments (or null to disable it)")
    kwargs = dict(raw)
    name = kwargs.pop("step", key)
    try:
        cls = get_step_class(name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    try:
        inspect.signature(cls).bind(**kwargs)
        if not cls.loads_models:
            cls(**kwargs)  # cheap: checks the argument values as well
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc} (step {name})") from None
    return StepSpec(key=key, step=name, kwargs=kwargs)


def _mixture(raw: Any, names: list[str]) -> dict[str, Any]:
    mix = _section(raw, DEFAULTS["mixture"], "mixture")
    if mix["preset"] is not None and mix["preset"] not in MIXTURES:
        raise ConfigError(f"mixture.preset={mix['preset']!r} must be null or one of {', '.join(MIXTURES)}")
    preset = MIXTURES.get(mix["preset"], {})
    for field in ("weights", "epochs"):
        given = mix[field] or {}
        if isinstance(given, dict):  # null unsets a source's value (a mapping cannot be emptied by an override)
            given = {k: v for k, v in given.items() if v is not None}
        if not isinstance(given, dict):
            raise ConfigError(f"mixture.{field} must be a mapping source -> number")
        for name, value in given.items():
            if name not in names:
                raise ConfigError(f"mixture.{field}.{name}: not a source of this recipe ({', '.join(names)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"mixture.{field}.{name}={value!r} must be a positive number")
        mix[field] = dict(given)
    for name in names:
        if name not in mix["weights"] and name not in mix["epochs"] and name not in preset:
            raise ConfigError(f"mixture.weights.{name}: the source needs a weight or epochs "
                              f"(or a preset that names it)")
    return mix
