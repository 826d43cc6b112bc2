"""slurm/train.sbatch on a real two-node SLURM cluster: `two_node_cluster` (tests/conftest.py), node1 and
node2, each a slurmd in its own network namespace with its own address and hostname (tests/slurm_cluster.py).

    .ci/slurm.sh install && python -m pytest tests/test_slurm_multinode.py     # as root; ~2 min

Two processes per node (4 ranks, gloo, CPU), the demo recipe on a tiny shard set, deterministic: the
uninterrupted run is the reference the interrupted ones must reproduce bit for bit. The rendezvous,
gloo's connections, USR1 and the requeue cross the namespaces' bridge as they cross a cluster's network.
Without SLURM or root these tests are skipped, except when CI is set: then they fail.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from imagenet_ddp.checkpoint import load
from tests.netns import IFNAME
from tests.slurm_cluster import FINISHED, SlurmError
from tests.test_fault_tolerance import assert_same_weights
from tests.test_train import make_tiny_shards

pytestmark = pytest.mark.slow

TRAIN, RECIPE = "slurm/train.sbatch", "configs/demo.yaml"
ROOT = Path(__file__).resolve().parents[1]
PER_NODE, BATCH, EPOCHS = 2, 2, 2
STEPS = 96 // (2 * PER_NODE * BATCH)  # per epoch: make_tiny_shards' 96 train images / (4 ranks x batch)
# A checkpoint early in epoch 2: the signal or the kill then has STEPS - 2 steps to land mid-epoch.
INTERRUPT_AT = STEPS + 2
# One CPU each for two processes on each node (the cluster's nodes share this machine's cores).
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=2G"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def overrides(shards: Path, run_dir: Path) -> list[str]:
    """The demo recipe made a few-second deterministic run: 2 epochs of STEPS steps, a checkpoint
    every 2 steps (kept), the stop signal polled every step, the torch loader in the training process,
    fp32; MobileNetV3-S rather than ResNet-18: 7x fewer weights to all-reduce and save (4 ranks and
    their saves share 2 cores)."""
    return [
        f"data.root={shards}",
        "model.name=mobilenet_v3_small",
        "data.backend=torch",
        "data.workers=0",
        f"train.batch_size={BATCH}",
        f"train.epochs={EPOCHS}",
        "train.precision=fp32",
        "train.channels_last=false",
        "train.deterministic=true",
        "run.checkpoint_every=2",
        "run.poll_every=1",
        "run.keep_last=20",
        "logging.wandb=false",
        "logging.log_every=2",
        f"run.dir={run_dir}",
    ]


def submit(cluster, shards: Path, run_dir: Path, **env: str) -> tuple[str, Path]:
    """sbatch --nodes=2 slurm/train.sbatch configs/demo.yaml ...: (job id, its output file)."""
    log = run_dir.parent / f"{run_dir.name}-%j.out"
    job, _ = cluster.sbatch(
        *TWO_NODES,
        "--time=10",
        f"--output={log}",
        TRAIN,
        RECIPE,
        *overrides(shards, run_dir),
        env={"PYTHON": sys.executable, "NPROC_PER_NODE": str(PER_NODE), **env},
        cwd=ROOT,
    )
    return job, Path(str(log).replace("%j", job))


def text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no output file)"


def finished(cluster, job: str, log: Path) -> dict[str, str]:
    try:
        return cluster.wait(job, timeout=300)
    except SlurmError as e:
        raise AssertionError(f"{e}\n{text(log)}") from None


def epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [int(re.search(r'"epoch": (\d+)', line)[1]) for line in lines if line.strip()]


def wait_for_checkpoint(cluster, job: str, run_dir: Path, step: int, log: Path) -> None:
    """Until step-<step>.pt exists."""
    deadline = time.monotonic() + 180
    while not (run_dir / f"step-{step:08d}.pt").exists():
        state = cluster.job(job)["JobState"]
        if state in FINISHED or time.monotonic() > deadline:
            raise AssertionError(f"job {job} {state} before step {step}\n{text(log)}")
        time.sleep(0.1)


def hosts(ckpt: dict) -> list[str]:
    return [r["host"] for r in ckpt["ranks"]]


@pytest.fixture(scope="module")
def whole(two_node_cluster, shards, tmp_path_factory) -> tuple[Path, str, dict]:
    """The uninterrupted two-node run, GLOO_SOCKET_IFNAME naming the nodes' interface: (run.dir, log,
    job record). The reference for the interrupted runs."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    job, log = submit(two_node_cluster, shards, run_dir, GLOO_SOCKET_IFNAME=IFNAME)
    record = finished(two_node_cluster, job, log)
    return run_dir, text(log), record


def test_two_nodes_train_to_the_end_with_ranks_0_1_on_one_node_and_2_3_on_the_other(whole):
    run_dir, log, record = whole
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert "on 2 node(s) node[1-2]" in log and f"{PER_NODE} process(es) per node" in log, log
    assert re.search(r"rendezvous node1:\d+", log), log  # the first node's name, as the script says
    assert epochs(run_dir) == list(range(1, EPOCHS + 1)), log
    last = load(run_dir / "last.pt")
    assert last["step"] == EPOCHS * STEPS and last["world_size"] == 2 * PER_NODE
    placed = hosts(last)  # the run's own record: each rank's hostname, saved in its checkpoints
    assert placed[0] == placed[1] != placed[2] == placed[3], placed
    assert sorted({placed[0], placed[2]}) == ["node1", "node2"], placed


def test_usr1_on_two_nodes_saves_every_rank_at_one_step_requeues_and_ends_as_the_uninterrupted_run(
    two_node_cluster, shards, tmp_path, whole
):
    run_dir = tmp_path / "run"
    job, log = submit(two_node_cluster, shards, run_dir)
    wait_for_checkpoint(two_node_cluster, job, run_dir, INTERRUPT_AT, log)
    two_node_cluster.run("scancel", "--signal=USR1", "--batch", job)
    record = finished(two_node_cluster, job, log)
    out = text(log)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), out
    assert "SIGUSR1" in out and "requeueing job" in out and re.search(r"job \d+ restart 1 ", out), out

    stopped = re.search(r"stopped by signal at step (\d+)", out)
    assert stopped, out
    step = int(stopped[1])
    assert INTERRUPT_AT <= step < EPOCHS * STEPS, out  # in the middle of epoch 2
    saved = load(run_dir / f"step-{step:08d}.pt")  # the save at the signal: one step for all 4 ranks
    assert sorted(set(hosts(saved))) == ["node1", "node2"] and len(saved["ranks"]) == 2 * PER_NODE
    assert saved["batch_in_epoch"] == step % STEPS
    assert re.search(rf"resuming from \S*last\.pt: step {step} ", out), out
    assert epochs(run_dir) == list(range(1, EPOCHS + 1)), out  # every epoch once
    assert_same_weights(load(whole[0] / "last.pt"), load(run_dir / "last.pt"))


def training_processes(cluster, node: str) -> list[int]:
    """The training processes (torchrun's workers: RANK in their environment) running on `node`."""
    found = []
    for pid in cluster.node_pids(node):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"train_ddp.py" in cmdline and any(v.startswith(b"RANK=") for v in environ):
            found.append(pid)
    return found


def test_one_node_killed_fails_the_job_and_the_same_command_resumes_from_the_last_checkpoint(
    two_node_cluster, shards, tmp_path, whole
):
    run_dir = tmp_path / "run"
    job, log = submit(two_node_cluster, shards, run_dir)
    wait_for_checkpoint(two_node_cluster, job, run_dir, INTERRUPT_AT, log)
    victims = training_processes(two_node_cluster, "node2")
    assert len(victims) == PER_NODE, victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    record = finished(two_node_cluster, job, log)
    out = text(log)
    # As slurm/README.md says: a training that failed without a signal is not requeued.
    assert (record["JobState"], record["Restarts"]) == ("FAILED", "0"), out
    assert "requeueing" not in out and "training step failed" in out, out
    kept = load(run_dir / "last.pt")
    assert 0 < kept["step"] < EPOCHS * STEPS

    job, log = submit(two_node_cluster, shards, run_dir)  # the same command again
    record = finished(two_node_cluster, job, log)
    out = text(log)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert re.search(rf"resuming from \S*last\.pt: step {kept['step']} ", out), out
    assert epochs(run_dir) == list(range(1, EPOCHS + 1)), out  # nothing lost, nothing twice
    assert_same_weights(load(whole[0] / "last.pt"), load(run_dir / "last.pt"))


def test_a_wrong_interface_name_is_a_one_line_error_on_every_node_not_a_hang(
    two_node_cluster, shards, tmp_path
):
    run_dir = tmp_path / "run"
    # One process per node: the check runs in each before the process group forms.
    job, log = submit(
        two_node_cluster, shards, run_dir, GLOO_SOCKET_IFNAME="nonexistent0", NPROC_PER_NODE="1"
    )
    record = finished(two_node_cluster, job, log)  # within minutes, not run.timeout_s (900 s)
    out = text(log)
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", out
    errors = [line for line in out.splitlines() if "GLOO_SOCKET_IFNAME=nonexistent0" in line]
    expected = (
        r"train_ddp\.py: error: GLOO_SOCKET_IFNAME=nonexistent0: no such network interface; this host "
        rf"\((node[12])\) has lo, {IFNAME}: set GLOO_SOCKET_IFNAME to the interface that connects the "
        r"nodes, or unset it"
    )
    matched = [re.fullmatch(expected, line) for line in errors]
    assert errors and all(matched), out
    assert {m[1] for m in matched} == {"node1", "node2"}, out  # each node names its own interfaces
    assert "Unable to find address" not in out, out  # gloo's own error is not reached
