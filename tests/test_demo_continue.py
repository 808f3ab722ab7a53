"""`make demo-continue` (demo/run_demo_continue.py) end to end in a reduced mode: a stand-in for the demo's
outputs (a 512-piece English tokenizer, licence texts as the clean text, a randomly initialised tiny model as
the Hugging Face export), fewer Chinese pieces (the fewest SentencePiece's lowest character coverage, 0.98,
allows), a few training steps."""
import json
import shutil
import subprocess
import sys

import zstandard

from support import REPO
from data_pipeline.compression import ZSTD_LEVEL
from demo.corpus import license_texts
from llama_pt.hf_interop import export_hf
from llama_pt.model import Llama, get_preset


def _demo_outputs(root, tokenizer):
    """What demo/run_demo_continue.py reads from `make demo`'s folder."""
    (root / "prep" / "tokenizer").mkdir(parents=True)
    shutil.copy(tokenizer, root / "prep" / "tokenizer" / "tokenizer.model")
    shard = root / "prep" / "clean" / "licenses" / "shard_00000.jsonl.zst"
    shard.parent.mkdir(parents=True)
    records = "".join(json.dumps({**doc, "source": "licenses"}) + "\n" for doc in license_texts(paragraphs_per_doc=2))
    shard.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(records.encode("utf-8")))
    cfg = get_preset("tiny")
    export_hf(Llama(cfg), cfg, root / "hf", tokenizer_path=tokenizer)
    return root


def test_continue_demo_runs_in_reduced_mode(tmp_path, tokenizer_512):
    demo = _demo_outputs(tmp_path / "demo", tokenizer_512)
    out = tmp_path / "continue"
    done = subprocess.run([sys.executable, "demo/run_demo_continue.py", "--demo", str(demo), "--out", str(out),
                           "--add", "2000", "--character-coverage", "0.98", "--steps", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("1. vocabulary extension", "2. tokenizing", "3. continued pretraining", "4. held-out perplexity",
                 "5. exports"):
        assert step in done.stdout
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    en, zh = summary["tokens_per_char"]["en"], summary["tokens_per_char"]["zh"]
    assert en["after"] <= en["before"] and zh["after"] < zh["before"] / 2  # byte pieces replaced by Chinese ones
    ppl = summary["perplexity"]
    assert set(ppl["grown"]) == set(ppl["after"]) == {"en", "zh"}
    # The demo's own model is evaluated when the held-out English kept its ids (--new-characters-only keeps
    # every document written in BASE's characters; the licence texts hold a few that BASE spells in bytes).
    assert ("demo" in ppl) == (en["changed_docs"] == 0)
    assert summary["generation"]["identical_tokens"] is True
    assert (out / "hf" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
