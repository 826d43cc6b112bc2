"""A run folder belongs to one run: the lock of train_ddp.py (a second run refused with one line naming
the holder, stale locks taken over, SLURM requeues let through), resuming under other settings refused
(or recorded as a change), and non-finite weights never saved as best.pt or last.pt.

python -m pytest tests/test_run_folder.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import make_shards
import train_ddp
from imagenet_ddp.errors import UserError
from imagenet_ddp.runlock import LOCK_NAME, STALE_AFTER_S, RunLock
from tests.fixtures import make_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_folder(root / "src", num_classes=2, per_class=4, val_per_class=2, bad=False, side_range=(32, 40))
    args = ["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--workers", "1"]
    assert make_shards.main(args) == 0
    return root / "shards"


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A run of a few steps: ResNet-18 at 32 px, batch 4, no W&B."""
    return [
        f"data.root={shards}",
        "data.backend=torch",
        "data.workers=0",
        "data.image_size=32",
        "data.eval_size=32",
        "model.name=resnet18",
        "train.batch_size=4",
        "train.epochs=1",
        "train.precision=fp32",
        "train.channels_last=false",
        "optim.ref_batch_size=0",
        "optim.warmup_epochs=0",
        f"run.dir={run_dir}",
        "logging.wandb=false",
        *extra,
    ]


def train(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_ddp.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def unprivileged(folder: Path):
    """Permissions as a user sees them: as root (a container), run the block with the effective uid of
    `nobody`, `folder`'s ancestors made traversable for it meanwhile; otherwise as is."""
    if os.geteuid() != 0:
        yield
        return
    ancestors = [p for p in [folder, *folder.parents] if p != Path("/")]
    modes = {p: p.stat().st_mode & 0o7777 for p in ancestors}
    for p in ancestors:
        p.chmod(modes[p] | 0o001)
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        for p, mode in modes.items():
            p.chmod(mode)


HOLDER = """
import sys
from imagenet_ddp.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_second_run_in_a_held_folder_is_refused_naming_the_holder(shards, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = files(run_dir)
        code, out, err = train(overrides(shards, run_dir))
        assert code == 2 and err.count("\n") == 1, err
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "started 20" in err
        assert "in use by another run" in err and files(run_dir) == before  # nothing written
    finally:
        holder.communicate("")  # the holder ends and releases the lock
    assert not (run_dir / LOCK_NAME).exists()
    # Negative control: the same command, the holder gone, runs, and leaves no lock behind.
    code, out, err = train(overrides(shards, run_dir))
    assert code == 0, err
    assert (run_dir / "last.pt").exists() and not (run_dir / LOCK_NAME).exists()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(run_dir: Path, age_s: float = 0.0, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": time.time() - age_s, **holder}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_stale_locks_are_taken_over_with_one_line_and_live_ones_are_not(shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_lock(run_dir, pid=dead_pid(), process_start="1")  # kill -9 on this host
    code, out, err = train(overrides(shards, run_dir))
    assert code == 0, err
    takeovers = [line for line in out.splitlines() if "taking over the lock" in line]
    assert len(takeovers) == 1 and "no longer runs on this host" in takeovers[0]

    # Another host: alive while its heartbeat is fresh, gone once it is older than STALE_AFTER_S.
    other = tmp_path / "other"
    write_lock(other, host="node-17", pid=4242)
    with pytest.raises(UserError, match="host node-17, pid 4242"):
        RunLock(other).acquire()
    write_lock(other, age_s=STALE_AFTER_S + 60, host="node-17", pid=4242)
    said: list[str] = []
    RunLock(other, say=said.append).acquire().release()
    assert len(said) == 1 and "no heartbeat from host node-17" in said[0]

    # A SLURM requeue: the same job id, its lock fresh, on another node: never blocked.
    requeued = tmp_path / "requeued"
    write_lock(requeued, host="node-3", pid=4242, slurm_job_id="981")
    monkeypatch.setenv("SLURM_JOB_ID", "981")
    code, out, err = train(overrides(shards, requeued))
    assert code == 0 and "a requeue of SLURM job 981" in out, err
    monkeypatch.setenv("SLURM_JOB_ID", "982")  # another job is not a requeue
    write_lock(requeued, host="node-3", pid=4242, slurm_job_id="981")
    code, out, err = train(overrides(shards, requeued))
    assert code == 2 and "SLURM job 981" in err and err.count("\n") == 1


def test_a_run_folder_that_is_a_file_or_unwritable_is_one_line(shards, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = train(overrides(shards, tmp_path / "afile"))
    assert code == 2 and "is a file, not a folder" in err and err.count("\n") == 1
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with unprivileged(locked):
            code, _, err = train(overrides(shards, locked / "run"))
            assert code == 2 and "cannot create it" in err and err.count("\n") == 1, err
            code, _, err = train(overrides(shards, locked))
            assert code == 2 and "not writable" in err and err.count("\n") == 1, err
    finally:
        locked.chmod(0o700)


def test_weights_that_became_non_finite_are_never_saved(shards, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = train(overrides(shards, run_dir, "optim.lr=3e38", "run.checkpoint_every=1"))
    assert code == 2 and err.count("\n") == 1 and "hold NaN/Inf at step" in err, err
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            ckpt = torch.load(run_dir / name, weights_only=True)
            assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr=inf: every number must be finite"),
        ("optim.momentum=nan", "optim.momentum=nan"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan"),
        ("optim.lr=1e308", "lower optim.lr"),  # scaled to the global batch: inf
    ],
)
def test_non_finite_settings_are_refused_before_anything_is_written(shards, tmp_path, override, message):
    run_dir = tmp_path / "run"
    code, out, err = train(overrides(shards, run_dir, "optim.ref_batch_size=1", override))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_resuming_under_other_settings_is_refused_unless_allowed_and_then_recorded(shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train(overrides(shards, run_dir))[0] == 0
    finished = files(run_dir)
    code, out, err = train(overrides(shards, run_dir))  # the same command again: nothing to do
    assert code == 0, err
    assert files(run_dir)["config.yaml"] == finished["config.yaml"]
    before = files(run_dir)
    for change, named in [
        (["optim.lr=0.2"], "optim.lr 0.1 -> 0.2"),
        (["train.batch_size=2"], "train.batch_size 4 -> 2"),
        (
            ["data.image_size=40", "train.label_smoothing=0"],
            "data.image_size 32 -> 40, train.label_smoothing",
        ),
    ]:
        code, out, err = train(overrides(shards, run_dir, *change))
        assert code == 2 and err.count("\n") == 1, err
        assert named in err and "run.allow_changes=true" in err, err
        assert files(run_dir) == before  # config.yaml, status.json, metrics, checkpoints: as they were
    # Where it runs is not what it computes: more loader workers resume without a word.
    assert train(overrides(shards, run_dir, "data.workers=1"))[0] == 0
    # Training longer is a change too, but not one that disowns what was run: recorded, no override.
    code, out, err = train(overrides(shards, run_dir, "train.epochs=2"))
    assert code == 0 and "continuing with changed settings (train.epochs)" in out, err
    assert files(run_dir)["config.yaml"] == finished["config.yaml"]
    [record] = [json.loads(line) for line in (run_dir / "config-changes.jsonl").read_text().splitlines()]
    assert record["changes"]["train.epochs"] == {"from": 1, "to": 2} and record["epoch"] == 1
    assert record["changes"]["derived.total_steps"] == {"from": 2, "to": 4}  # recomputed, recorded
    epochs = [m["epoch"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [1, 2]
    # Fewer epochs than done: refused. The way out: allowed, the run goes on, the change appended.
    before = files(run_dir)
    code, out, err = train(overrides(shards, run_dir, "train.epochs=1", "optim.lr=0.05"))
    assert code == 2 and "train.epochs 2 -> 1" in err and files(run_dir) == before, err
    allowed = ("train.epochs=3", "optim.lr=0.05", "run.allow_changes=true")
    code, out, err = train(overrides(shards, run_dir, *allowed))
    assert code == 0 and "continuing with changed settings (train.epochs, optim.lr)" in out, err
    assert files(run_dir)["config.yaml"] == finished["config.yaml"]
    records = [json.loads(line) for line in (run_dir / "config-changes.jsonl").read_text().splitlines()]
    assert records[-1]["changes"]["optim.lr"] == {"from": 0.1, "to": 0.05} and len(records) == 2


def test_under_torchrun_every_rank_stops_at_once_when_the_folder_is_held(shards, tmp_path):
    """Rank 0 alone takes the lock; the other ranks must not wait in a collective for it."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RANK", "LOCAL_RANK", "SLURM_", "WANDB_"))
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_ddp.py",
        ]
        start = time.monotonic()
        done = subprocess.run(
            [*cmd, *overrides(shards, run_dir, "run.timeout_s=600")],
            cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert time.monotonic() - start < 120  # not the collective timeout
    finally:
        holder.communicate("")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "in use by another run" in line]
    assert sorted(line.split(":")[0] for line in lines) == ["train_ddp.py", "train_ddp.py"], done.stderr
    assert {"rank 0", "rank 1"} <= {w for line in lines for w in ("rank 0", "rank 1") if w in line}
    assert not (run_dir / "last.pt").exists()
