"""The llama-data CLI: recipes and overrides, one-line errors before anything runs, a whole run and
its report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.cli import main
from data_pipeline.recipe import load_recipe
from llama_pt.data import load_manifest
from llama_pt.config import ConfigError
from realtext import english_texts, write_jsonl_shards

RECIPE = """
name: cli-test
output_dir: {out}
workers: 1
progress: false
sources:
  docs:
    paths: ["{raw}/*.jsonl"]
    steps:
      normalize: {{}}
      paragraph_dedup: {{partitions: 2}}
      lid: {{threshold: 0.5}}
tokenizer: {{vocab_size: 400, sample_bytes: 200000, character_coverage: 0.995}}
mixture: {{weights: {{docs: 1.0}}}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_jsonl_shards(root / "raw", english_texts(60), 3)
    path = root / "recipe.yaml"
    path.write_text(RECIPE.format(out=root / "out", raw=root / "raw"))
    return path


@pytest.mark.parametrize("override, message", [
    ("colour=blue", "colour: unknown key"),
    ("executor=cloud", "executor='cloud' must be local or slurm"),
    ("workers=0", "workers=0 must be an integer >= 1"),
    ("slurm.max_array_size=-1", "slurm.max_array_size=-1 must be an integer >= 1"),
    ("sources.docs.formt=jsonl", "sources.docs.formt: unknown key"),
    ("sources.docs.format=csv", "sources.docs.format='csv' must be one of"),
    ("sources.docs.paths=/nonexistent/*.jsonl", "sources.docs.paths: no input matches /nonexistent/*.jsonl"),
    ("sources.docs.steps.lid.treshold=0.4", "sources.docs.steps.lid: got an unexpected keyword argument 'treshold'"),
    ("sources.docs.steps.typo={}", "sources.docs.steps.typo: unknown step 'typo'"),
    ("sources.docs.steps.mine.step=nowhere:Step", "sources.docs.steps.mine: step 'nowhere:Step': cannot import"),
    ("mixture.weights.docs=null", "mixture.weights.docs: the source needs a weight or epochs"),
    ("mixture.weights.web=1", "mixture.weights.web: not a source of this recipe"),
    ("mixture.preset=llama9", "mixture.preset='llama9' must be null or one of llama1"),
    ("tokenizer.model=/nonexistent/t.model", "tokenizer.model: file not found: /nonexistent/t.model"),
    ("tokenize.valid_fraction=1.5", "tokenize.valid_fraction=1.5 must be in [0, 1)"),
    ("workers", "override 'workers' must be key=value"),
])
def test_bad_recipe_input_is_one_line_before_anything_runs(recipe, capsys, override, message):
    out_dir = recipe.parent / "out"
    assert main(["run", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-data: error: ") and message in err and err.count("\n") == 1, err
    assert not out_dir.exists()


def test_bad_recipe_files(tmp_path, capsys):
    assert main(["clean", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found: " in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed\n")
    assert main(["clean", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a valid YAML recipe" in err and err.count("\n") == 1
    nothing = tmp_path / "empty.yaml"
    nothing.write_text("output_dir: x\n")
    assert main(["clean", str(nothing)]) == 2
    assert "sources: at least one source is required" in capsys.readouterr().err


def test_console_script_reports_errors_without_a_traceback(recipe):
    proc = subprocess.run([str(Path(sys.executable).parent / "llama-data"), "run", str(recipe), "executor=cloud"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "llama-data: error: executor='cloud' must be local or slurm\n"


def test_overrides_and_shipped_recipes(recipe):
    with pytest.raises(ConfigError, match="executor='cloud'"):
        load_recipe(str(recipe), ["executor=cloud"])
    r = load_recipe(str(recipe), ["workers=3", "sources.docs.steps.paragraph_dedup.partitions=8",
                                  "sources.docs.steps.lid=null", "executor=slurm", "slurm.partition=cpu"])
    assert r.workers == 3 and r.executor == "slurm" and r.slurm["partition"] == "cpu"
    assert [(s.key, s.kwargs) for s in r.sources[0].steps] == [("normalize", {}), ("paragraph_dedup", {"partitions": 8})]
    demo = load_recipe("demo", check_inputs=False)
    assert [s.name for s in demo.sources] == ["python_docs", "licenses"]
    llama = load_recipe("llama1", ["vars.data_root=/mnt/raw"], check_inputs=False)
    assert llama.mixture["preset"] == "llama1" and len(llama.sources) == 7
    assert llama.sources[0].paths == ("/mnt/raw/commoncrawl/*.warc.wet.gz",)


def test_run_then_report(recipe, capsys):
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "[clean]" in out and "[tokenize]" in out and "languages: en=" in out
    root = recipe.parent / "out"
    manifest = load_manifest(root / "tokens/mixture.json")
    assert manifest["sources"][0]["name"] == "docs" and manifest["vocab_size"] == 400
    clean = json.loads((root / "clean/stats.json").read_text())["sources"]["docs"]
    assert clean["reader"]["read"] == 60
    steps = clean["steps"]
    assert steps["normalize"]["kept"] == 60
    assert steps["lid"]["seen"] == steps["paragraph_dedup"]["kept"]
    assert clean["output"]["documents"] == steps["lid"]["kept"] == sum(clean["output"]["groups"].values())
    assert set(clean["output"]["groups"]) <= {"en"} | {g for g in clean["output"]["groups"]}
    assert main(["report", str(recipe)]) == 0
    report = capsys.readouterr().out
    assert "[dedup]" in report and "[clean]" in report and "[tokenize]" in report
    assert f"read 60, kept {clean['output']['documents']}" in report
    # A second run finds every stage complete and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl.zst")}
    assert main(["run", str(recipe)]) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl.zst")} == before


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "dedup", "clean", "train-tokenizer", "tokenize", "manifest", "report", "train-lm"):
        assert f"    {command} " in text or f"    {command}\n" in text


def test_ccnet_recipe_with_real_models_splits_by_language_and_bucket(tmp_path, lid_corpora, lm_dir,
                                                                     english_fortunes, capsys):
    """fastText LID + KenLM perplexity (models trained by the steps' own commands) through the CLI:
    outputs in <lang>_<bucket> folders as CCNet's, the report's languages and perplexity histogram."""
    docs = [{"id": f"{lang}-{i}", "text": t} for lang, texts in sorted(lid_corpora.items())
            for i, t in enumerate(texts)]
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(2):
        with open(raw / f"cc{s}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[s::2])
    sample = tmp_path / "en_sample.txt"
    sample.write_text("\n".join(t.replace("\n", " ") for t in english_fortunes["heldout"]) + "\n")
    cutoffs = tmp_path / "cutoffs"
    assert main(["lm-cutoffs", "en", str(lm_dir), str(sample), "--out", str(cutoffs / "en.cutoffs.json")]) == 0
    recipe = tmp_path / "ccnet.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'out'}
workers: 2
progress: false
sources:
  cc:
    paths: ["{raw}/*.jsonl"]
    steps:
      normalize: {{}}
      lid: {{threshold: 0.5}}
      perplexity: {{model_dir: "{lm_dir}", languages: [en], cutoffs_dir: "{cutoffs}"}}
mixture: {{weights: {{cc: 1.0}}}}
""")
    assert main(["clean", str(recipe)]) == 0
    summary = capsys.readouterr().out
    clean = tmp_path / "out/clean"
    report = json.loads((clean / "stats.json").read_text())["sources"]["cc"]
    groups = report["output"]["groups"]
    on_disk = {p.parent.name for p in (clean / "cc").rglob("*.jsonl.zst")}
    assert on_disk == set(groups)
    assert {"en_head", "en_middle", "en_tail"} <= set(groups)  # English scored and bucketed
    assert {g.split("_")[1] for g in groups if not g.startswith("en_")} == {"all"}  # no model: one bucket
    langs = report["output"]["languages"]
    assert "languages: " in summary and f"en={langs['en']}" in summary
    assert {k: v for k, v in report["steps"]["lid"].items() if k.startswith("language/")} == \
        {f"language/{k}": v for k, v in langs.items()}
    for lang in ("de", "es", "it", "ru", "fr"):  # most documents of each language are recognised
        assert langs.get(lang, 0) >= 40
    assert sum(report["output"]["perplexity_hist"]["en"]) == sum(groups[f"en_{b}"] for b in ("head", "middle", "tail"))
    assert (clean / "perplexity_cc.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_step_argument_value_is_one_line_before_any_work(tmp_path, capsys):
    from data_pipeline.cli import main
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "hello"}\n')
    code = main(["run", "demo", f"output_dir={tmp_path / 'out'}", f"sources.python_docs.paths=[{src}]",
                 f"sources.licenses.paths=[{src}]", "sources.licenses.steps.exact_dedup.partitions=0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llama-data: error: sources.licenses.steps.exact_dedup: exact_dedup.partitions=0 must be an "
                   "integer >= 1 (step exact_dedup)"]
    assert not (tmp_path / "out").exists()
