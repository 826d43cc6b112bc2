"""slurm/*.sbatch submitted to a real one-node SLURM cluster started for these tests (tests/slurm_cluster.py).

    .ci/slurm.sh install && python -m pytest tests/test_slurm.py     # as root; ~1 min

Without the SLURM binaries these tests are skipped, except when CI is set: then they fail.
Training runs the demo recipe on a small shard set: 2 processes on the one node, CPU, gloo.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import fixtures
from tests.slurm_cluster import FINISHED, SlurmError, started

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "slurm/train.sbatch"
MAKE_SHARDS = "slurm/make_shards.sbatch"
RECIPE = "configs/demo.yaml"
# The one test node: the scripts' GPU and CPU requests are overridden as a user would.
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2", "--mem=3G", "--time=10"]
TRAIN_PER_CLASS, CLASSES, BATCH, RANKS = 16, 4, 4, 2
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // (BATCH * RANKS)


@pytest.fixture(scope="session")
def slurm():
    with started(nodes=1) as cluster:
        yield cluster


def job_env(**extra) -> dict:
    return {"PYTHON": sys.executable, **extra}


def job_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


def verify(*splits: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "make_shards.py", "verify", *map(str, splits)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


# ---------------------------------------------------------------------------- make_shards.sbatch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fixtures.make_folder(tmp_path_factory.mktemp("folder"))


def submit_make_shards(slurm, folder, out: Path, log: Path, *options: str):
    """sbatch --wait slurm/make_shards.sbatch folder --src FOLDER --out OUT: (job id, finished sbatch)."""
    return slurm.sbatch(
        "--wait",
        *options,
        "--mem-per-cpu=1G",
        f"--output={log}",
        MAKE_SHARDS,
        "folder",
        "--src",
        str(folder.src),
        "--out",
        str(out),
        env=job_env(),
        cwd=ROOT,
    )


def test_make_shards_job_packs_splits_that_verify(slurm, folder, tmp_path):
    out, log = tmp_path / "shards", tmp_path / "make_shards-%j.out"
    job, done = submit_make_shards(slurm, folder, out, log, "--cpus-per-task=2")
    text = job_log(Path(str(log).replace("%j", job)))
    assert done.returncode == 0, text
    assert "--workers 2" in text  # one worker per allocated CPU
    checked = verify(out / "train", out / "val")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for split in ("train", "val"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["num_samples"] == len(folder.expected(split))


def test_make_shards_array_packs_one_split_per_task(slurm, folder, tmp_path):
    out, log = tmp_path / "shards", tmp_path / "make_shards-%A_%a.out"
    job, done = submit_make_shards(slurm, folder, out, log, "--array=0-1", "--cpus-per-task=1")
    logs = [job_log(Path(str(log).replace("%A", job).replace("%a", str(i)))) for i in (0, 1)]
    assert done.returncode == 0, "\n".join(logs)
    assert "--splits train" in logs[0] and "--splits val" in logs[1]
    checked = verify(out / "train", out / "val")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---------------------------------------------------------------------------- train.sbatch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A 4-class shard set: STEPS_PER_EPOCH steps of 2 ranks x BATCH images per epoch."""
    root = tmp_path_factory.mktemp("train-data")
    fx = fixtures.make_folder(
        root / "src", num_classes=CLASSES, per_class=TRAIN_PER_CLASS, val_per_class=4, bad=False
    )
    packed = subprocess.run(
        [sys.executable, "make_shards.py", "folder", "--src", str(fx.src), "--out", str(root / "shards")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert packed.returncode == 0, packed.stdout + packed.stderr
    return root / "shards"


def submit_training(slurm, shards, run_dir: Path, log: Path, epochs: int, *options: str, wandb=False) -> str:
    job, _ = slurm.sbatch(
        *options,
        *CPU_NODE,
        f"--output={log}",
        TRAIN,
        RECIPE,
        f"data.root={shards}",
        f"train.epochs={epochs}",
        f"train.batch_size={BATCH}",
        f"logging.wandb={str(wandb).lower()}",
        f"run.dir={run_dir}",
        env=job_env(NPROC_PER_NODE=str(RANKS), WANDB_MODE="offline"),
        cwd=ROOT,
    )
    return job


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def wait_finished(slurm, job: str, log: Path) -> dict[str, str]:
    try:
        return slurm.wait_job(job, timeout=240)
    except SlurmError as e:
        raise AssertionError(f"{e}\n{job_log(log)}") from None


def test_training_job_completes(slurm, shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = submit_training(slurm, shards, run_dir, log, 2)
    record = wait_finished(slurm, job, log)
    text = job_log(log)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert record["Restarts"] == "0" and "requeueing" not in text  # a finished job is not requeued
    assert f"{RANKS} process(es) per node" in text
    lines = metrics(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2], text
    assert lines[-1]["step"] == 2 * STEPS_PER_EPOCH
    assert (run_dir / "last.pt").is_file()


def test_usr1_saves_requeues_and_resumes_where_it_stopped(slurm, shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    epochs = 4
    job = submit_training(slurm, shards, run_dir, log, epochs, wandb=True)

    # Signal once the first epoch is on record (and more than one is left), as SLURM would before a limit.
    deadline = time.monotonic() + 180
    while not metrics(run_dir):
        state = slurm.job(job)["JobState"]
        if state in FINISHED or time.monotonic() > deadline:
            raise AssertionError(f"job {job} {state} before its first epoch ended\n{job_log(log)}")
        time.sleep(0.2)
    first_epoch = metrics(run_dir)[0]
    signalled = time.monotonic()
    slurm.run("scancel", "--signal=USR1", "--batch", job)

    record = wait_finished(slurm, job, log)
    text = job_log(log)  # --open-mode=append: both runs of the job are in it
    print(f"job {job}: signal to completion {time.monotonic() - signalled:.1f} s")
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "SIGUSR1" in text and "requeueing job" in text, text
    assert re.search(r"job \d+ restart 1 ", text), text  # SLURM_RESTART_COUNT=1 in the second run

    resumed = re.search(r"resuming from \S*last\.pt: step (\d+)", text)
    assert resumed, text
    assert 0 < int(resumed.group(1)) < epochs * STEPS_PER_EPOCH
    lines = metrics(run_dir)
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1)), text
    assert lines[-1]["step"] == epochs * STEPS_PER_EPOCH
    assert lines[0] == first_epoch  # the first epoch was not trained again

    # The resumed run continues the same W&B run: two offline run folders, one run id.
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[-1] for name in runs}) == 1, runs
