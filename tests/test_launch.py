"""Launching across processes: launch/torchrun.sh on one node, two torchrun agents as two "nodes"
rendezvousing over c10d at 127.0.0.1, and the start-up checks that stop a bad config in one line."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from llama_pt.train.check import main as check_main
from llama_pt.train.entry import run_training
from support import REPO, make_config

LAUNCH = REPO / "launch" / "torchrun.sh"
DP2_ZERO1 = ["parallel.zero_stage=1", "train.steps=2", "train.ckpt_every=2", "train.eval_every=0"]


def overrides(token_corpus, out_dir, *extra):
    return [f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", f"train.out_dir={out_dir}",
            "model=tiny", "train.seq_len=32", "train.global_batch_tokens=512", "train.micro_batch_size=4",
            "train.log_every=1", "optim.warmup_steps=2", "optim.lr=3e-3", "logging.wandb.enabled=false", *extra]


def launch(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.Popen(["bash", str(LAUNCH), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    return out, err


def losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, token_corpus):
    """The same DP=2 ZeRO-1 run: 2 processes on one node, then 1 process on each of two rendezvousing agents."""
    root = tmp_path_factory.mktemp("launch")
    one = root / "one_node"
    finish(launch("--nproc", "2", "--", *overrides(token_corpus, one, *DP2_ZERO1)))
    two = root / "two_nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [launch("--nproc", "1", "--nnodes", "2", "--node-rank", str(i), "--rdzv-endpoint", endpoint,
                     "--rdzv-id", "test_two_nodes", "--", *overrides(token_corpus, two, *DP2_ZERO1))
              for i in (0, 1)]
    outputs = [finish(a) for a in agents]
    return {"one": one, "two": two, "agent_outputs": outputs}


def test_torchrun_on_one_node_trains_with_two_processes(launched):
    got = losses(launched["one"])
    assert [s for s, _ in got] == [1, 2]  # written once, by global rank 0
    assert got[1][1] < got[0][1]
    assert (launched["one"] / "checkpoints" / "step_00000002" / "MANIFEST.json").is_file()
    assert {p.name for p in (launched["one"] / "checkpoints" / "step_00000002").glob("*.distcp")} == \
        {"__0_0.distcp", "__1_0.distcp"}


def test_two_agents_rendezvous_over_c10d_as_two_nodes(launched):
    # Same layout (DP=2), same code: the two-"node" run computes exactly what one node computes.
    assert losses(launched["two"]) == losses(launched["one"])
    printed = "".join(out for out, _ in launched["agent_outputs"])
    assert "2 process(es): TP=1 x DP=2 (DeepSpeed ZeRO-1)" in printed


def test_bad_config_stops_in_one_line_before_any_worker_is_spawned(tmp_path, token_corpus):
    proc = launch("--nproc", "3", "--", *overrides(token_corpus, tmp_path, "parallel=tp2"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines() == ["error: parallel.tensor_parallel=2 does not divide the world size 3"]
    assert "torch.distributed" not in out + err and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("world, extra, message", [
    (3, ["parallel=tp2"], "parallel.tensor_parallel=2 does not divide the world size 3"),
    (4, ["train.global_batch_tokens=96"], "train.global_batch_tokens=96 gives 3 sequences, not divisible by 4 "
                                          "data-parallel ranks"),
    (4, ["parallel=tp2", "train.micro_batch_size=3"], "train.micro_batch_size=3 does not divide the per-rank "
                                                      "batch of 8 sequences"),
    (2, ["parallel.zero_stage=3"], "parallel.zero_stage=3 must be one of (0, 1, 2)"),
    (4, ["parallel=pp2", "parallel.virtual_stages=2", "parallel.pipeline_schedule=interleaved_1f1b"],
     "model.n_layers=2 is fewer than the 4 pipeline chunks (parallel.pipeline_parallel=2 x parallel.virtual_stages=2)"),
    (4, ["parallel=pp2", "parallel.pipeline_parallel=4", "model.n_layers=4", "train.micro_batch_size=8"],
     "parallel.pipeline_schedule=1f1b needs at least parallel.pipeline_parallel=4 micro-batches per data-parallel "
     "rank, got 2 (raise train.global_batch_tokens or lower train.micro_batch_size)"),
    (6, ["parallel=pp2_tp2"], "parallel.pipeline_parallel=2 x parallel.tensor_parallel=2 does not divide the world "
                              "size 6"),
])
def test_check_command_names_the_field(tmp_path, token_corpus, capsys, world, extra, message):
    assert check_main(["--world-size", str(world), *overrides(token_corpus, tmp_path, *extra)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_check_command_describes_a_good_layout(tmp_path, token_corpus, capsys):
    assert check_main(["--world-size", "4", *overrides(token_corpus, tmp_path, "parallel=tp2_sp",
                                                        "parallel.zero_stage=2")]) == 0
    assert capsys.readouterr().out.strip() == ("ok: 4 process(es) = TP 2 +SP x DP 2 (zero_stage 2) x PP 1, "
                                               "2 micro-batches of 4 per rank per step")


def test_check_command_prints_the_pipeline_split(tmp_path, token_corpus, capsys):
    assert check_main(["--world-size", "8", *overrides(token_corpus, tmp_path, "parallel=pp2_tp2",
                                                        "model.n_layers=5", "train.eval_every=0")]) == 0
    assert capsys.readouterr().out.strip() == (
        "ok: 8 process(es) = TP 2 x DP 2 (zero_stage 0) x PP 2, 2 micro-batches of 4 per rank per step; "
        "PP 2 (1f1b): stage 0: emb + layers 0-2 | stage 1: layers 3-4 + head")


def test_trainer_checks_the_layout_before_creating_a_process_group(tmp_path, token_corpus, capsys, monkeypatch):
    # torchrun's variables without a rendezvous address: creating a process group would fail otherwise.
    for key, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_training(make_config(tmp_path, token_corpus, "parallel=tp2"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: parallel.tensor_parallel=2 does not divide the world size 3"]
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SystemExit):
        run_training(make_config(tmp_path, token_corpus))
    assert capsys.readouterr().err.strip() == "error: environment variable WORLD_SIZE='two' must be an integer"


@pytest.mark.slow
def test_two_agents_run_a_two_stage_pipeline_across_nodes(tmp_path, token_corpus):
    # PP=2 passes through the wrapper as Hydra overrides; stage 0 on one "node", stage 1 on the other, their
    # activations and gradients crossing between the agents. One process computes the same losses.
    pipeline = ["parallel=pp2", "train.steps=2", "train.eval_every=0", "train.ckpt_every=0"]
    single = tmp_path / "single"
    finish(launch("--nproc", "1", "--", *overrides(token_corpus, single, "train.steps=2", "train.eval_every=0",
                                                   "train.ckpt_every=0")))
    two = tmp_path / "two_nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [launch("--nproc", "1", "--nnodes", "2", "--node-rank", str(i), "--rdzv-endpoint", endpoint,
                     "--rdzv-id", "test_two_node_pipeline", "--", *overrides(token_corpus, two, *pipeline))
              for i in (0, 1)]
    outputs = [finish(a) for a in agents]
    printed = "".join(out for out, _ in outputs)
    assert "2 process(es): TP=1 x DP=1 (all-reduce) x PP=2 (1f1b)" in printed
    assert "pipeline split (1f1b): stage 0: emb + layer 0 | stage 1: layer 1 + head" in printed
    assert ("process groups: rank = pp*1 + dp*1 + tp (TP innermost, then DP, then PP): TP groups {0} {1}; "
            "DP groups {0} {1}; PP groups {0,1}") in printed
    got, want = losses(two), losses(single)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2]
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * b, (got, want)
