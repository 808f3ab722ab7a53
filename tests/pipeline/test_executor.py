"""Executors: the local pool, completion markers and reruns, SLURM array splitting and submission
(sbatch replaced by a recording script), and a real run through submitit's local executor."""
import json
import os
import stat
from pathlib import Path

import pytest

from data_pipeline.executor import LocalExecutor
from data_pipeline.pipeline import SourceSpec, StepSpec, clean_tasks
from data_pipeline.slurm import SlurmExecutor, cluster_max_array_size, parse_max_array_size, split_arrays
from data_pipeline.stats import write_report
from data_pipeline.task import TaskError, read_marker
from realtext import english_texts, write_jsonl_shards


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return write_jsonl_shards(root, english_texts(40), n_shards=5)


def _source(paths, steps=(StepSpec("normalize", "normalize"),)):
    return SourceSpec("docs", "jsonl", tuple(map(str, paths)), steps=steps)


def _outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jsonl.zst"))}


def test_local_pool_runs_every_shard_and_reruns_only_missing_ones(tmp_path, raw):
    tasks = clean_tasks([_source(raw)], tmp_path / "clean", tmp_path / "work", 0)
    stats = LocalExecutor(workers=2, progress=False).run("clean", tasks)
    assert [s["shard"] for s in stats] == [str(p) for p in raw]
    assert sum(s["output"]["documents"] for s in stats) == 40
    first = _outputs(tmp_path / "clean")
    assert sorted(first) == [f"docs/shard_{i:05d}.jsonl.zst" for i in range(5)]
    # A complete shard is skipped (its deleted output stays deleted); an unmarked one is redone.
    (tmp_path / "clean/docs/shard_00001.jsonl.zst").unlink()
    tasks[3].marker.unlink()
    (tmp_path / "clean/docs/shard_00003.jsonl.zst").write_bytes(b"stale")
    LocalExecutor(workers=2, progress=False).run("clean", tasks)
    again = _outputs(tmp_path / "clean")
    assert "docs/shard_00001.jsonl.zst" not in again
    assert again["docs/shard_00003.jsonl.zst"] == first["docs/shard_00003.jsonl.zst"]


def test_a_failing_task_is_named(tmp_path, raw):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n')
    src = _source([raw[0], bad], steps=(StepSpec("para", "paragraph_dedup"),))  # no hash pass ran
    with pytest.raises(TaskError, match=r"clean/docs/shard_0000\d: FileNotFoundError"):
        LocalExecutor(workers=2, progress=False).run("clean", clean_tasks([src], tmp_path / "c", tmp_path / "w", 0))


def test_outputs_split_by_language_and_bucket_with_report(tmp_path):
    """The writer's CCNet layout and the stage report, from metadata the LID/perplexity steps set."""
    texts = english_texts(36)
    langs, buckets = ["en", "de", "fr"], ["head", "middle", "tail"]
    raw = tmp_path / "raw.jsonl"
    with open(raw, "w") as f:
        for i, t in enumerate(texts):
            meta = {"language": langs[i % 3], "bucket": buckets[i % 9 // 3], "perplexity": 10.0 * (i + 1)}
            f.write(json.dumps({"id": i, "text": t, "metadata": meta}) + "\n")
    tasks = clean_tasks([_source([raw])], tmp_path / "clean", tmp_path / "work", 0)
    stats = LocalExecutor(progress=False).run("clean", tasks)
    files = sorted(p.relative_to(tmp_path / "clean").as_posix() for p in (tmp_path / "clean").rglob("*.zst"))
    assert files == [f"docs/{l}_{b}/shard_00000.jsonl.zst" for l in sorted(langs) for b in buckets]
    report = write_report(tmp_path / "clean", "clean", stats)
    on_disk = json.loads((tmp_path / "clean/stats.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    out = on_disk["sources"]["docs"]["output"]
    assert out["languages"] == {"en": 12, "de": 12, "fr": 12}
    assert out["buckets"] == {"head": 12, "middle": 12, "tail": 12}
    assert out["groups"] == {f"{l}_{b}": 4 for l in langs for b in buckets}
    assert sum(out["perplexity_hist"]["en"]) == 12
    png = tmp_path / "clean" / on_disk["sources"]["docs"]["perplexity_png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_arrays_respects_max_array_size():
    assert split_arrays(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_arrays(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert split_arrays(list(range(2)), 1001) == [[0, 1]]
    assert split_arrays([], 5) == []
    with pytest.raises(ValueError, match="max_array_size=0"):
        split_arrays([1], 0)


def _fake_bin(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_max_array_size_from_scontrol(tmp_path, monkeypatch):
    config = "Configuration data as of 2024-01-01T00:00:00\nMaxArraySize            = 4\nMaxJobCount = 10000\n"
    assert parse_max_array_size(config) == 4 and parse_max_array_size("nothing") is None
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    _fake_bin(tmp_path / "bin", "scontrol", f"cat <<'EOF'\n{config}EOF\n")
    assert cluster_max_array_size(fallback=1001) == 4
    _fake_bin(tmp_path / "bin", "scontrol", "exit 1\n")
    assert cluster_max_array_size(fallback=77) == 77


def test_slurm_submission_is_split_into_arrays(tmp_path, monkeypatch, raw):
    """sbatch is a script that records each submission file, so the real submitit SLURM path runs."""
    record = tmp_path / "record"
    record.mkdir()
    _fake_bin(tmp_path / "bin", "scontrol", "echo 'MaxArraySize = 2'\n")
    _fake_bin(tmp_path / "bin", "srun", "exit 1\n")  # submitit only checks that it exists
    _fake_bin(tmp_path / "bin", "sbatch", f'n=$(ls {record} | wc -l)\ncp "$1" {record}/sub_$n.sh\n'
                                          'echo "Submitted batch job $((100 + n))"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    tasks = clean_tasks([_source(raw)], tmp_path / "clean", tmp_path / "work", 0)
    ex = SlurmExecutor(tmp_path / "logs", partition="cpu", time_min=30, cpus_per_task=2, mem_gb=3,
                       array_parallelism=8, account="proj", progress=False)
    jobs = ex.submit("clean", tasks)
    subs = [(record / f"sub_{i}.sh").read_text() for i in range(3)]
    assert len(list(record.iterdir())) == 3  # 5 tasks, MaxArraySize 2 -> arrays of 2, 2 and 1
    for text, array in zip(subs, ["#SBATCH --array=0-1%2", "#SBATCH --array=0-1%2", None]):
        assert ("#SBATCH --array" in text) == (array is not None) and (array is None or array in text)
        for flag in ("--partition=cpu", "--time=30", "--cpus-per-task=2", "--mem=3GB", "--account=proj",
                     "--job-name=llama-data-clean"):
            assert f"#SBATCH {flag}" in text
    assert [j.job_id for _, j in jobs] == ["100_0", "100_1", "101_0", "101_1", "102"]
    assert [t.name for t, _ in jobs] == [t.name for t in tasks]


@pytest.mark.timeout(120)
def test_submitit_local_cluster_runs_the_tasks(tmp_path, raw):
    """The same submission path, run for real by submitit's local executor (one process per task)."""
    local = clean_tasks([_source(raw[:3])], tmp_path / "a", tmp_path / "wa", 0)
    LocalExecutor(progress=False).run("clean", local)
    tasks = clean_tasks([_source(raw[:3])], tmp_path / "b", tmp_path / "wb", 0)
    stats = SlurmExecutor(tmp_path / "logs", cluster="local", poll_s=0.2, time_min=2,
                          max_array_size=2, progress=False).run("clean", tasks)
    assert [s["output"]["documents"] for s in stats] == [read_marker(t.marker)["output"]["documents"] for t in local]
    assert _outputs(tmp_path / "b") == _outputs(tmp_path / "a")
