"""Sweeps: slurm/sweep.sbatch as a job array on a real SLURM cluster (tests/slurm_cluster.py), and the
sweep files' formats (imagenet_ddp/sweep.py).

    .ci/slurm.sh install && python -m pytest tests/test_sweep.py     # as root

Without the SLURM binaries the cluster test is skipped, except when CI is set: then it fails.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagenet_ddp.errors import UserError
from imagenet_ddp.sweep import main, read_lines, task_overrides
from tests.slurm_cluster import FINISHED
from tests.test_runs import key, wandb_records
from tests.test_slurm import slurm  # noqa: F401  (the session's cluster)
from tests.test_stage import tiny_shards

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "slurm/sweep.sbatch"
RECIPE = "configs/demo.yaml"
CPU_TASK = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=1500M", "--time=10"]
LINES = """\
# learning rates; one run per line
optim.lr=0.1 train.epochs=4
optim.lr=0.2 train.label_smoothing=0.0   # two overrides

optim.lr=0.4
train.epoch=1
"""


def test_grid_lines_are_every_combination_first_key_slowest(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("optim.lr: [0.1, 0.2]\ntrain.label_smoothing: [0.0, 0.1]\nmodel.name: resnet18\n")
    assert main(["lines", str(grid)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [
        f"optim.lr={lr} train.label_smoothing={ls} model.name=resnet18"
        for lr in (0.1, 0.2)
        for ls in (0.0, 0.1)
    ]
    assert lines == expected
    # Task 3 trains the fourth line, in its own folder, grouped under the sweep's name.
    assert task_overrides(grid, 3, [], "grid", RECIPE) == [
        *lines[3].split(),
        "run.dir=runs/grid/3-lr0.2-label_smoothing0.1-nameresnet18",
        "logging.wandb_group=grid",
    ]


def test_a_malformed_line_fails_its_own_task_only(tmp_path):
    path = tmp_path / "lr.txt"
    path.write_text(LINES + "optim.lr0.1\n")
    runs = read_lines(path)
    assert [number for number, _, _ in runs] == [2, 3, 5, 6, 7]
    assert task_overrides(path, 2, ["run.dir=/x"], "lr", RECIPE)[-2:] == [
        "run.dir=/x/lr/2-lr0.4",
        "logging.wandb_group=lr",
    ]
    with pytest.raises(
        UserError, match=r"lr\.txt:6: override train\.epoch: unknown key \(did you mean train\.epochs\?\)"
    ):
        task_overrides(path, 3, [], "lr", RECIPE)
    with pytest.raises(UserError, match=r"lr\.txt:7: 'optim\.lr0\.1' is not section\.key=value"):
        task_overrides(path, 4, [], "lr", RECIPE)
    with pytest.raises(UserError, match=r"array task 5 of a sweep of 5 runs .*--array=0-4"):
        task_overrides(path, 5, [], "lr", RECIPE)


# ---------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("sweep-data"), 4, 1, 1250)


def task_log(tmp_path: Path, job: str, task: int) -> str:
    path = tmp_path / f"sweep-{job}_{task}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


@pytest.mark.slow
def test_a_sweep_runs_one_task_per_line_into_its_own_folder_and_compares(slurm, shards, tmp_path):  # noqa: F811
    sweep = tmp_path / "lr.txt"
    sweep.write_text(LINES)
    runs = tmp_path / "runs"
    job, _ = slurm.sbatch(
        "--array=0-3",
        *CPU_TASK,
        f"--output={tmp_path}/sweep-%A_%a.out",
        SWEEP,
        RECIPE,
        str(sweep),
        f"data.root={shards}",
        "data.backend=torch",
        "data.workers=0",
        "train.epochs=1",
        "train.batch_size=4",
        "logging.log_every=1",
        f"run.dir={runs}",
        env={
            "PYTHON": sys.executable,
            "NPROC_PER_NODE": "1",
            "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1",
        },
        cwd=ROOT,
    )
    # Task 0 (4 epochs) is signalled as SLURM would before its time limit, once its first epoch is on
    # record: it saves, requeues itself and resumes, like a single run.
    first = runs / "lr" / "0-lr0.1-epochs4" / "metrics.jsonl"
    deadline, records, signalled = time.monotonic() + 300, {}, False
    while len(records) < 4:
        if not signalled and first.exists() and first.read_text().strip():
            slurm.run("scancel", "--signal=USR1", "--batch", f"{job}_0")
            signalled = True
        for task in set(range(4)) - set(records):
            record = slurm.job(f"{job}_{task}")
            if record.get("JobState") in FINISHED:
                records[task] = record
        if time.monotonic() > deadline:
            raise AssertionError(
                f"sweep {job}: {records}\n" + "\n".join(task_log(tmp_path, job, t) for t in range(4))
            )
        time.sleep(0.5)

    logs = [task_log(tmp_path, job, t) for t in range(4)]
    for task in range(3):
        assert (records[task]["JobState"], records[task]["ExitCode"]) == ("COMPLETED", "0:0"), logs[task]
    # SLURM may repeat scancel's USR1 to an array task for ~20 s: one requeue or more, never a lost task.
    assert int(records[0]["Restarts"]) >= 1 and "requeueing job" in logs[0], logs[0]
    assert re.search(r"resuming from \S*last\.pt: step [1-9]", logs[0]), logs[0]
    assert [json.loads(line)["epoch"] for line in first.read_text().splitlines()] == [1, 2, 3, 4]
    assert all(records[t]["Restarts"] == "0" for t in (1, 2))
    # The malformed line: its task fails with one line naming the file, the line and the close match.
    assert (records[3]["JobState"], records[3]["ExitCode"]) == ("FAILED", "2:0"), logs[3]
    assert (
        logs[3].strip()
        == f"sweep: error: {sweep}:6: override train.epoch: unknown key (did you mean train.epochs?)"
    )

    folders = sorted(p.name for p in (runs / "lr").iterdir())
    assert folders == ["0-lr0.1-epochs4", "1-lr0.2-label_smoothing0.0", "2-lr0.4"]
    for folder, lr in zip(folders, (0.1, 0.2, 0.4), strict=True):
        config = yaml.safe_load((runs / "lr" / folder / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and config["run"]["dir"] == str(runs / "lr" / folder)
        assert config["logging"]["wandb_group"] == "lr"
        assert f"optim.lr={lr}" in config["derived"]["overrides"]
        # One W&B run per task (task 0's resumed runs continue it: an offline folder per start that
        # reached training, SLURM's repeated USR1 may requeue it more than once, one id).
        files = sorted((runs / "lr" / folder / "wandb").glob("offline-run-*/run-*.wandb"))
        if folder.startswith("0-"):
            assert 2 <= len(files) <= 1 + int(records[0]["Restarts"]), files
        else:
            assert len(files) == 1, files
        for run_file in files:
            [run] = [r.run for r in wandb_records(run_file) if r.HasField("run")]
            assert run.run_group == "lr", run
            flat = {key(item): json.loads(item.value_json) for item in run.config.update}
            assert flat["optim.lr"] == lr
        assert len({f.name for f in files}) == 1
    assert (
        "train.label_smoothing=0.0"
        in yaml.safe_load((runs / "lr" / folders[1] / "config.yaml").read_text())["derived"]["overrides"]
    )

    compared = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagenet_ddp.runs",
            "compare",
            *map(str, sorted((runs / "lr").iterdir())),
            "--format",
            "csv",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stderr
    rows = list(csv.DictReader(io.StringIO(compared.stdout)))
    assert len(rows) == 3, compared.stdout
    lr_column = next(c for c in rows[0] if re.search(r"optim\.lr$", c))
    assert [float(r[lr_column]) for r in rows] == [0.1, 0.2, 0.4]
