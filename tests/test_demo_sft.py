"""The instruction-tuning part of the demo (`make demo-sft`, demo/run_demo_sft.py) end to end in a reduced mode:
a stand-in for the demo's outputs (a randomly initialised tiny model exported with the tests' 512-piece tokenizer),
a few training steps on data/instruct, the chat exchange through the chat command, the q8_0 export run in
llama.cpp."""
import json
import shutil
import subprocess
import sys

from support import REPO
from support.instruct_data import tiny_base


def test_sft_demo_runs_in_reduced_mode(tmp_path, tokenizer_512):
    demo = tmp_path / "demo"
    tiny_base(demo / "hf", tokenizer_512)
    (demo / "prep" / "tokenizer").mkdir(parents=True)
    shutil.copy(tokenizer_512, demo / "prep" / "tokenizer" / "tokenizer.model")
    (demo / "prep" / "clean").mkdir()
    out = tmp_path / "sft"
    done = subprocess.run([sys.executable, "demo/run_demo_sft.py", "--demo", str(demo), "--out", str(out),
                           "--steps", "4", "--model", "tiny"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("7. instruction tuning", "8. one chat exchange", "9. export to llama.cpp"):
        assert step in done.stdout
    assert "instruction records: 432 read, 432 kept; skipped: none" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"][0] == 4
    assert done.stdout.count(f"user> {summary['question']}") == 2  # piped input is echoed: a transcript
    assert 0 < len(summary["ours"]) <= 24 and 0 < len(summary["llamacpp"]) <= 24
    assert (out / "demo_sft-q8_0.gguf").is_file()
