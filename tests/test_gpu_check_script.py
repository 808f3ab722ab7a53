"""scripts/gpu_check (make gpu-check) on CPU: the whole run at tiny shapes, on a simulated bare GPU image;
and the packages it installs are all the GPU paths need beyond the image.

A GPU image is simulated by hiding, from a subprocess, every package of requirements.txt that is neither
in the image (gpu_check.wheels.IMAGE) nor shipped as a wheel (gpu_check.wheels.WHEELS): a `sitecustomize`
module on PYTHONPATH makes their modules unimportable and their distributions (and so their pytest plugins)
invisible. pip is kept offline (PIP_NO_INDEX), as on the GPU machines.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HIDER = '''"""Hides the modules in $GPU_CHECK_HIDE_MODULES and the distributions in $GPU_CHECK_HIDE_DISTS."""
import os
import re
import sys

MODULES = set(filter(None, os.environ["GPU_CHECK_HIDE_MODULES"].split(",")))
DISTS = set(filter(None, os.environ["GPU_CHECK_HIDE_DISTS"].split(",")))


class Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in MODULES else self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.inner, "find_distributions", None)
        return (d for d in (found(*args, **kwargs) if found else ())
                if re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower() not in DISTS)

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
'''


sys.path.insert(0, str(REPO / "scripts"))
from gpu_check.section import BEGIN, END, insert_section  # noqa: E402
from gpu_check.wheels import IMAGE, WHEELS  # noqa: E402


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _image_env(tmp_path: Path, with_wheels: bool) -> dict[str, str]:
    """The environment of a GPU image (plus the wheels' packages when `with_wheels`), pip offline."""
    keep = {_norm(d) for d in IMAGE} | ({_norm(w.dist) for w in WHEELS} if with_wheels else set())
    lines = (REPO / "requirements.txt").read_text().splitlines()
    required = [_norm(line.split("==")[0]) for line in lines if "==" in line]
    hidden = [d for d in required + [_norm(w.dist) for w in WHEELS] if d not in keep]
    modules = {m for m, dists in importlib.metadata.packages_distributions().items()
               if any(_norm(d) in hidden for d in dists)}
    hider = tmp_path / "hider"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(HIDER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PYTHONPATH": str(hider), "GPU_CHECK_HIDE_MODULES": ",".join(sorted(modules)),
            "GPU_CHECK_HIDE_DISTS": ",".join(sorted(set(hidden))), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}


def test_quick_cpu_run_on_a_bare_image_writes_the_report_and_the_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    original = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    results.write_text(original, encoding="utf-8")
    out = tmp_path / "out"
    args = ["run", "--device", "cpu", "--quick", "--out", str(out), "--results", str(results),
            "--wheelhouse", str(tmp_path / "none")]
    proc = subprocess.run([sys.executable, "scripts/gpu_check", *args],
                          cwd=REPO, env=_image_env(tmp_path, with_wheels=False), capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # set-up incomplete: no wheels, no PyPI
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert steps["setup"]["status"] == "incomplete"
    assert report["setup"]["missing"] == [w.spec for w in WHEELS] and report["setup"]["problems"]
    assert report["setup"]["expected_missing"] == []
    assert all(steps[name]["status"] == "ok" and steps[name]["seconds"] > 0
               for name in ("tests", "bench_layer", "bench_parallel", "bench_documents"))

    tests = report["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["exit_code"]) == (0, 0, 0, 0)
    reasons = {c["test"].split("::")[0]: c["message"] for c in tests["cases"]}
    assert reasons.pop("tests/cuda/test_cuda_trainer.py").startswith("the trainer's path needs")  # it says why
    assert set(reasons) == {f"tests/cuda/test_cuda_{n}.py"
                            for n in ("attention", "compile", "documents", "hf", "layer")}
    assert all(c["message"].startswith("needs a CUDA GPU") for c in tests["cases"] if "trainer" not in c["test"])
    assert tests["skipped"] == len(tests["cases"]) > 40

    rows = report["bench_layer"]["rows"]
    assert [(r["impl"], r["mode"]) for r in rows] == [("llama_pt", "none"), ("llama_pt", "selective"),
                                                      ("llama_pt", "full"), ("transformers", "none")]
    assert [r["path"] for r in report["bench_parallel"]["results"]] == ["plain", "parallel_tp1"]
    assert "deepspeed" not in report["bench_parallel"]["versions"]  # it ran without deepspeed
    documents = report["bench_documents"]
    assert documents["environment"]["skipped"] == {} and documents["args"]["quick"]
    assert [(r["kernel"], r["seq"], r["mask"]) for r in documents["rows"]] == [
        (kernel, seq, mask) for seq in (256, 512) for kernel in ("cpu_flash", "math", "sdpa")
        for mask in ("causal", "packed", "one_per_row")]
    for r in documents["rows"]:
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and (r["mask"] == "causal") == (r["ratio_to_causal"] == 1)
        one_document = r["mask"] != "packed"
        assert (r["documents"] == r["batch"], r["visible_fraction"] == 1) == (one_document, one_document)

    text = results.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    section = text[text.index(BEGIN):text.index(END) + len(END)]
    assert "## GPU check — cpu (quick smoke run" in section
    for expected in ("| bench_parallel | ok |", "| tiny | transformers | none | sdpa | 2x32 |", "| parallel_tp1 |",
                     "| bench_documents | ok |", "| cpu_flash | packed | 2x512 |", "seq 512: packed documents fastest",
                     "needs a CUDA GPU", "missing hydra-core=="):
        assert expected in section, expected
    assert insert_section(original, section) == text  # nothing else of RESULTS.md changed


def test_the_gpu_paths_run_with_the_image_and_the_wheels_alone(tmp_path):
    """The trainer (through Hydra, as the CUDA trainer test drives it), HF parity and generation, on CPU, and the
    collection of every CUDA test module, with nothing importable beyond the image and the wheels."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_train.py::test_activation_modes_are_selected_by_config_and_agree",
                           "tests/test_hf_parity.py::test_same_weights_same_logits",
                           "tests/test_generate.py::test_greedy_matches_transformers_generate", "tests/cuda"],
                          cwd=REPO, env=_image_env(tmp_path, with_wheels=True), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_section_replaces_an_earlier_one_and_keeps_the_rest():
    text = "# Benchmark results\n\nintro\n"
    first = insert_section(text, f"{BEGIN}\nold\n{END}")
    assert first == f"# Benchmark results\n\nintro\n\n{BEGIN}\nold\n{END}\n"
    second = insert_section(first + "\n## Later section\n", f"{BEGIN}\nnew\n{END}")
    assert second == f"# Benchmark results\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## Later section\n"
