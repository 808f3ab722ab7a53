"""Numerical faults across ranks (torchrun, 2 gloo processes): a NaN on ONE data-parallel rank, or a spike,
makes EVERY rank skip the same step with no update, with the all-reduce engine, DeepSpeed ZeRO-1 and TP=2."""
import json

from omegaconf import OmegaConf

from support import make_config
from support.torchrun import run_torchrun
from support.workers import WORKERS

WORKER = WORKERS / "fault_worker.py"


def test_every_rank_skips_the_same_steps(tmp_path, token_corpus):
    cfg = make_config(tmp_path, token_corpus, "train.steps=10", "fault.spike_window=3", "fault.spike_zscore=3",
                      "fault.heartbeat_every_s=0.5", "data.valid_manifest=null")
    base = tmp_path / "base.json"
    base.write_text(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    done = run_torchrun(WORKER, "--out", tmp_path, "--base", base, nproc=2, env={"OMP_NUM_THREADS": "1"},
                        timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    for case in ("dp2_z0", "dp2_z1", "tp2_z0"):
        ranks = [json.loads((tmp_path / f"{case}.rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["skipped"] == ranks[1]["skipped"], case
        skipped = ranks[0]["skipped"]
        assert set(skipped) == {"4", "8"}, (case, skipped)
        assert skipped["4"] == "non-finite loss (nan)", case
        assert skipped["8"].startswith("loss spike ("), case
        for r in ranks:
            assert [int(s) for s, changed in r["changed"].items() if not changed] == [4, 8], case
