"""SLURM for real: a one-node cluster on this machine (launch/slurm_local/setup.sh installs and starts
munge, slurmctld and slurmd), and launch/slurm/train.sbatch submitted to it: 2 worker processes (gloo)
train a tiny model and checkpoint, then a second submission resumes from that checkpoint."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "launch" / "slurm_local" / "setup.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
JOB_DEADLINE_S = 90
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm_env():
    """Set-up (apt-get the first time; a no-op when the cluster already runs), then SLURM_CONF for clients."""
    start = time.monotonic()
    done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"launch/slurm_local/setup.sh failed:\n{done.stderr}"
    export = done.stdout.strip().splitlines()[-1]
    assert export.startswith("export SLURM_CONF=")
    print(f"slurm set-up: {time.monotonic() - start:.1f} s", file=sys.stderr)
    return {**os.environ, "SLURM_CONF": export.split("=", 1)[1], "PATH": os.environ["PATH"] + ":/usr/sbin"}


def job_field(env, job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         check=True).stdout
    return next(kv.split("=", 1)[1] for kv in out.split() if kv.startswith(f"{field}="))


def run_job(env, log: Path, overrides: list[str]) -> tuple[str, str]:
    """Submit train.sbatch with 2 workers on the one node; wait (bounded); return (job id, its log)."""
    cmd = ["sbatch", "--parsable", "--job-name=llama_pt_test", f"--output={log}", "--time=5",
           "--export=ALL,NPROC_PER_NODE=2,MAX_RESTARTS=0", str(SBATCH), *overrides]
    job_id = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHON": sys.executable}, capture_output=True,
                            text=True, check=True).stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_DEADLINE_S
    state = ""
    while time.monotonic() < deadline:
        state = job_field(env, job_id, "JobState")
        if state in FINAL_STATES:
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job_id], env=env)
    text = log.read_text() if log.exists() else "(no log)"
    assert state == "COMPLETED", f"job {job_id} ended {state or 'unknown'}:\n{text}"
    return job_id, text


def metrics(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sbatch_trains_checkpoints_and_a_second_submission_resumes(slurm_env, token_corpus, tmp_path):
    out = tmp_path / "run"
    common = [f"data.manifest={token_corpus['manifest']}", f"data.valid_manifest={token_corpus['valid_manifest']}",
              "model=tiny", "train.seq_len=32", "train.global_batch_tokens=512", "train.micro_batch_size=4",
              "train.log_every=1", "train.eval_every=0", "train.ckpt_every=2", "logging.wandb.enabled=false",
              f"train.out_dir={out}", f"hydra.run.dir={out}", "name='slurm test run'"]
    job, log = run_job(slurm_env, tmp_path / "first.log", common + ["train.steps=4"])
    assert job_field(slurm_env, job, "Requeue") == "1"
    assert "rendezvous" in log and "2 process" in log
    assert sorted(metrics(out)) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (out / "train.log").exists()
    assert "name: slurm test run" in (out / ".hydra" / "config.yaml").read_text()  # quoted override passed through

    _, log = run_job(slurm_env, tmp_path / "second.log", common + ["train.steps=6"])
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in log
    assert sorted(metrics(out)) == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "step_00000006").is_dir()


def sweep_command(sweep: Path, token_corpus, *extra: str) -> list[str]:
    """`train.py --multirun hydra/launcher=slurm` for a tiny model on the one-node cluster (1 CPU, no GPU)."""
    return [sys.executable, "train.py", "--multirun", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}",
            f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", "model=tiny",
            "train.seq_len=32", "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.log_every=1",
            "train.eval_every=0", "logging.wandb.enabled=false", *extra]


def test_submitit_sweep_runs_each_point_as_a_slurm_job(slurm_env, token_corpus, tmp_path):
    """configs/hydra/launcher/slurm.yaml: `train.py --multirun hydra/launcher=slurm` on the local cluster."""
    sweep = tmp_path / "sweep"
    cmd = sweep_command(sweep, token_corpus, "train.steps=3", "train.ckpt_every=3", "optim.warmup_steps=0",
                        "optim.lr=1e-3,3e-3")
    done = subprocess.run(cmd, cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=JOB_DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name]
    assert len(jobs) == 2  # one array job, two tasks
    for point, lr in (("0", 1e-3), ("1", 3e-3)):
        records = [json.loads(line) for line in (sweep / point / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "loss" in r]  # training steps (checkpoints log ckpt_s apart)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert records[0]["lr"] == pytest.approx(lr)
        assert (sweep / point / "checkpoints" / "step_00000003").is_dir()


def test_data_prep_stages_run_as_slurm_job_arrays(slurm_env, tmp_path):
    """`llama-data run ... executor=slurm` on the real cluster gives the local executor's outputs (clean
    shards, tokenizer, token shards, manifests), byte for byte."""
    sys.path.insert(0, str(REPO / "tests" / "pipeline"))
    from realtext import english_texts, write_jsonl_shards
    inputs = write_jsonl_shards(tmp_path / "in", english_texts(300), n_shards=3)
    common = ["run", "demo", f"sources.python_docs.paths=[{inputs[1]},{inputs[2]}]",
              f"sources.licenses.paths=[{inputs[0]}]", "tokenizer.vocab_size=512",
              "progress=false", "slurm.poll_s=1"]
    for executor in ("local", "slurm"):
        done = subprocess.run([sys.executable, "-m", "data_pipeline", *common, f"output_dir={tmp_path / executor}",
                               f"executor={executor}"], cwd=REPO, env=slurm_env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*")
                   if p.is_file() and ".markers" not in p.parts and p.name != "stats.json")  # those hold timings
    assert {p.suffix for p in local} >= {".bin", ".idx", ".zst", ".model"}
    for rel in local:
        assert (tmp_path / "slurm" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel


def heartbeat_step(out_dir: Path, rank: int = 0) -> int:
    try:
        return json.loads((out_dir / "heartbeats" / f"rank_{rank:05d}.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def release_requeued(env, job: str) -> None:
    """SLURM makes a requeued job eligible only ~2 minutes later (while the old job credential expires);
    once it is pending again, start it now - but not within the second its credential was revoked:
    slurmd refuses a credential created in that same second ("Job credential revoked")."""
    wait_until(lambda: job_field(env, job, "Restarts") == "1" and job_field(env, job, "JobState") == "PENDING",
               JOB_DEADLINE_S, f"job {job} to be requeued")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)


def test_pre_timeout_signal_checkpoints_requeues_and_the_job_resumes(slurm_env, token_corpus, tmp_path):
    """SLURM's `--signal=B:USR1@120` reaches the batch script (here sent as SLURM sends it: `scancel --batch
    --signal=USR1`); it forwards USR1 to the workers, which checkpoint and exit 0; the script requeues the
    job, and the same job id runs again and resumes from that checkpoint."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    overrides = [f"data.manifest={token_corpus['manifest']}", "data.valid_manifest=null", "model=tiny",
                 "train.seq_len=32", "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.steps=150",
                 "train.log_every=1", "train.eval_every=0", "train.ckpt_every=1000", "logging.wandb.enabled=false",
                 "fault.heartbeat_every_s=0.1", f"train.out_dir={out}", f"hydra.run.dir={out}"]
    cmd = ["sbatch", "--parsable", "--job-name=llama_pt_requeue", f"--output={log}", "--time=5",
           "--export=ALL,NPROC_PER_NODE=2,MAX_RESTARTS=0", str(SBATCH), *overrides]
    job = subprocess.run(cmd, cwd=REPO, env={**slurm_env, "PYTHON": sys.executable}, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    try:
        wait_until(lambda: heartbeat_step(out) >= 20, JOB_DEADLINE_S, "step 20")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)
        release_requeued(slurm_env, job)
        wait_until(lambda: job_field(slurm_env, job, "Restarts") == "1" and
                   job_field(slurm_env, job, "JobState") in FINAL_STATES, 2 * JOB_DEADLINE_S, "the requeued job")
    finally:
        subprocess.run(["scancel", job], env=slurm_env)
    text = log.read_text()
    assert job_field(slurm_env, job, "JobState") == "COMPLETED", text[-3000:]
    stopped = int(text.split("exiting at step ")[1].split(" ")[0])
    assert f"exiting at step {stopped} (SIGUSR1)" in text
    assert "requeueing job" in text and "(restart 1)" in text
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in text
    assert sorted(metrics(out)) == list(range(1, 151))


def test_submitit_sweep_point_checkpoints_on_its_signal_and_is_requeued(slurm_env, token_corpus, tmp_path):
    """Under submitit the pre-timeout signal is USR2 and submitit's handler requeues: the trainer
    checkpoints first, then calls that handler; the requeued point resumes and completes."""
    sweep = tmp_path / "sweep"
    cmd = sweep_command(sweep, token_corpus, "train.steps=200", "train.ckpt_every=1000", "fault.heartbeat_every_s=0.1",
                        "optim.lr=1e-3")
    sweeper = subprocess.Popen(cmd, cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: heartbeat_step(sweep / "0") >= 20, JOB_DEADLINE_S, "step 20 of the sweep point")
        job = next(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit())
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, check=True)
        release_requeued(slurm_env, job)
        _, err = sweeper.communicate(timeout=2 * JOB_DEADLINE_S)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.out")) + \
        "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    stopped = int(logs.split("exiting at step ")[1].split(" ")[0])
    assert f"exiting at step {stopped} (SIGUSR2)" in logs
    assert f"at step {stopped}" in logs.split("resumed from ")[1].splitlines()[0]
    records = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 201))
