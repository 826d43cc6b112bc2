"""train_ddp.py under a real `torchrun --standalone --nproc_per_node=2` with gloo on CPU, on shards
made by make_shards.py: metrics, checkpoints, one W&B offline run, stop on signals, resume.

python -m pytest tests/test_train_ddp.py -q        (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagenet_ddp.checkpoint import load
from imagenet_ddp.dist import EXIT_REQUEUE
from tests.test_train import METRIC_KEYS, make_tiny_shards, small_run

REPO = Path(__file__).resolve().parent.parent
STEPS = 96 // (2 * 8)  # train samples / (ranks x batch)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def environment(home: Path, **extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "SLURM_"))
    }
    # One thread per rank: two ranks share two cores. HOME without a W&B key: W&B must go offline alone.
    return {**env, "OMP_NUM_THREADS": "1", "HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train_ddp.py",
        *args,
    ]


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-3000:], done.stderr[-3000:])
    return done


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the test can clean up every process it made
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_two_ranks_train_and_write_metrics_checkpoints_and_one_wandb_offline_run(shards, tmp_path):
    out = tmp_path / "run"
    env = environment(tmp_path, WANDB_MODE="offline")
    slow_and_steady = ("train.epochs=6", "optim.lr=0.03", "optim.warmup_epochs=1", "logging.wandb=true")
    done = run(torchrun(*small_run(shards, out, *slow_and_steady)), env)
    assert done.returncode == 0, done.stderr
    lines = metrics(out)
    assert [m["step"] for m in lines] == [STEPS * e for e in range(1, 7)]
    assert set(lines[0]) >= METRIC_KEYS and lines[0]["val_count"] == 32
    assert lines[-1]["train_loss"] < lines[0]["train_loss"], lines
    assert done.stdout.count(f"epoch 1/6 step {STEPS}: train loss") == 1  # rank 0 prints, rank 1 is quiet
    ckpt = load(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 6 * STEPS
    assert len(set(ckpt["weights_sha256"])) == 1 and len(ckpt["weights_sha256"]) == 2
    assert ckpt["config"]["derived"]["global_batch_size"] == 16
    (wandb_run,) = wandb_runs(out)  # rank 0 only
    assert (wandb_run / f"run-{ckpt['wandb_run_id']}.wandb").stat().st_size > 0


def test_sigterm_stops_both_ranks_with_a_usable_last_pt_and_the_same_command_finishes(shards, tmp_path):
    out = tmp_path / "run"
    env = environment(tmp_path)  # no WANDB_MODE and no key: W&B falls back to offline by itself
    cmd = torchrun(*small_run(shards, out, "train.epochs=3", "logging.wandb=true", "logging.log_every=1"))
    proc = start(cmd, env)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "epoch 1/3 step 2:" in line:
                # As SLURM does: the signal reaches torchrun and both workers.
                os.killpg(proc.pid, signal.SIGTERM)
                break
        seen += proc.stdout.readlines()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(seen)
    print(log[-4000:])
    assert "W&B: no API key" in log
    assert f"exit {EXIT_REQUEUE}" in log
    stopped = load(out / "last.pt")
    assert 2 <= stopped["step"] < 3 * STEPS and stopped["batch_in_epoch"] == stopped["step"] % STEPS
    assert len(set(stopped["weights_sha256"])) == 1

    done = run(cmd, env)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out / 'last.pt'}: step {stopped['step']}" in done.stdout
    assert [m["step"] for m in metrics(out)] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert load(out / "last.pt")["step"] == 3 * STEPS
    first, second = wandb_runs(out)
    assert first.name.split("-")[-1] == second.name.split("-")[-1] == stopped["wandb_run_id"]  # one W&B run


def test_sigusr1_to_a_single_process_saves_last_pt_and_exits_75(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train_ddp.py", *small_run(shards, out, "train.epochs=50", "logging.log_every=1")]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in proc.stdout:
            if "step 3:" in line:
                proc.send_signal(signal.SIGUSR1)
                break
        rest = proc.stdout.read()
        assert proc.wait(timeout=120) == EXIT_REQUEUE, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 3 <= load(out / "last.pt")["step"] < 50 * 12


@pytest.mark.needs("nvidia.dali")
def test_the_demo_recipe_runs_under_torchrun_with_the_dali_cpu_backend(shards, tmp_path):
    out = tmp_path / "run"
    args = [
        "--config",
        "configs/demo.yaml",
        f"data.root={shards}",
        f"run.dir={out}",
        "train.epochs=1",
        "train.batch_size=8",
        "data.image_size=32",
        "data.eval_size=32",
    ]
    start = time.time()
    done = run(torchrun(*args), environment(tmp_path, WANDB_MODE="offline"))
    assert done.returncode == 0, done.stderr
    (line,) = metrics(out)
    assert line["step"] == STEPS and line["val_count"] == 32
    print(f"demo recipe, 1 tiny epoch under torchrun: {time.time() - start:.1f} s")


def test_a_config_error_under_torchrun_is_one_line_per_rank(shards, tmp_path):
    done = run(torchrun("train.epochs=0", f"data.root={shards}"), environment(tmp_path))
    assert done.returncode != 0
    assert done.stderr.count("train_ddp.py: error: train.epochs must be >= 1\n") == 2


def test_two_processes_with_only_slurm_variables_form_one_job(shards, tmp_path):
    """What `srun --ntasks=2 python train_ddp.py ...` starts: no torchrun, ranks from SLURM_* only."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train_ddp.py", *small_run(shards, out, "train.epochs=1", "train.ema_decay=0.5")]
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": str(os.getpid() % 10000)}
    slurm["SLURM_JOB_NODELIST"] = "127.0.0.1"
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=environment(tmp_path, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **slurm),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(logs[0][-3000:])
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "2 x 8 = 16 per step" in logs[0] and "per step" not in logs[1]  # rank 1 is quiet
    ckpt = load(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == STEPS and len(set(ckpt["weights_sha256"])) == 1
    assert ckpt["ema"].keys() == ckpt["model"].keys() and "val_top1_ema" in metrics(out)[0]


def test_a_wandb_key_without_a_reachable_server_falls_back_to_offline_quickly(shards, tmp_path):
    out = tmp_path / "run"
    env = environment(tmp_path, WANDB_API_KEY="0" * 40)  # a key, so W&B would try to go online
    start = time.time()
    done = run(
        [sys.executable, "train_ddp.py", *small_run(shards, out, "train.epochs=1", "logging.wandb=true")], env
    )
    assert done.returncode == 0, done.stderr
    assert "W&B: cannot reach" in done.stdout or "W&B: online init failed" in done.stdout
    assert len(wandb_runs(out)) == 1
    assert time.time() - start < 90  # wandb.init alone would wait 2-4x its init timeout


def test_two_single_rank_nodes_meet_through_a_c10d_rendezvous(shards, tmp_path):
    """Multi-node torchrun, both "nodes" on this machine over loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--rdzv-id=test", "train_ddp.py"]
    cmd += small_run(shards, out, "train.epochs=1")
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=environment(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert sum("2 x 8 = 16 per step" in log for log in logs) == 1  # one global rank 0
    ckpt = load(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == STEPS and len(set(ckpt["weights_sha256"])) == 1
