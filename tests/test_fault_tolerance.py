"""Fault tolerance (the README's promises): interrupted runs end bitwise as uninterrupted ones (a rank
SIGKILLed and brought back by `torchrun --max-restarts`, SIGTERM to all, a DALI run resumed mid-epoch),
a disk that fills up while a checkpoint is written, a process killed in the middle of a checkpoint
write, a rank that stops answering collectives. Real torchrun with gloo on CPU, real tmpfs, real signals.

python -m pytest tests/test_fault_tolerance.py -q        (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagenet_ddp.checkpoint import load
from imagenet_ddp.data.shardset import open_split, read_index
from imagenet_ddp.dist import is_lost_peer, lost_peer_line
from tests.needs import needs
from tests.test_train import make_tiny_shards, small_run
from tests.test_train_ddp import REPO, environment, metrics, start

STEPS = 96 // (2 * 8)  # steps per epoch: train samples / (ranks x batch)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def torchrun(*args: str, restarts: int = 0, ranks: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*launcher, f"--max-restarts={restarts}", "--monitor-interval=0.1", "train_ddp.py", *args]


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children) alive now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        ranks = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if ppid == launcher and ranks:
            found[int(ranks[0])] = int(entry.name)
    return found


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    try:
        log = proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            # torchrun starts each worker in a session of its own: kill those by pid first.
            for pid in workers(proc.pid).values():
                os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    print(log[-5000:])
    return log


def kill_rank_1_after(proc, checkpoint: Path) -> str:
    """SIGKILL rank 1 of torchrun `proc` once `checkpoint` is written; the run's log once it ends."""
    wait_for(lambda: checkpoint.exists() or proc.poll() is not None, what=checkpoint.name)
    victim = workers(proc.pid).get(1)
    assert victim is not None, "rank 1 already gone: the run ended before it could be killed"
    os.kill(victim, signal.SIGKILL)
    return finish(proc)


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["weights_sha256"] == b["weights_sha256"]
    for key, value in a["model"].items():  # buffers (BatchNorm statistics) included
        assert torch.equal(value, b["model"][key]), key


# Three epochs of 6 steps on two ranks, deterministic, a checkpoint every 2 steps.
SAME = ("train.epochs=3", "train.deterministic=true", "run.checkpoint_every=2", "run.keep_last=20")


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> dict:
    """last.pt of the run the interrupted ones must reproduce bit for bit."""
    tmp = tmp_path_factory.mktemp("whole")
    assert "done:" in finish(start(torchrun(*small_run(shards, tmp / "run", *SAME)), environment(tmp)))
    return load(tmp / "run" / "last.pt")


def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_ends_bitwise_as_an_uninterrupted_run(
    shards, tmp_path, uninterrupted
):
    env = environment(tmp_path)
    killed = tmp_path / "killed"
    proc = start(torchrun(*small_run(shards, killed, *SAME), restarts=3), env)
    # Mid-epoch: steps 1-6 are epoch 1; step 8's checkpoint is in the middle of epoch 2.
    log = kill_rank_1_after(proc, killed / "step-00000008.pt")
    assert proc.returncode == 0, log
    # The restarted group continued from a checkpoint in the middle of epoch 2, not from scratch.
    resumed = re.search(r"resuming from \S+: step (\d+) \(epoch 1 batch (\d+)", log)
    assert resumed and int(resumed[2]) > 0, log
    assert load(killed / "last.pt")["step"] == 3 * STEPS
    steps = [m["step"] for m in metrics(killed)]
    assert steps == [STEPS, 2 * STEPS, 3 * STEPS]  # one line per epoch, none repeated
    assert_same_weights(uninterrupted, load(killed / "last.pt"))


def test_sigterm_to_all_mid_epoch_then_the_same_command_ends_bitwise_as_an_uninterrupted_run(
    shards, tmp_path, uninterrupted
):
    env = environment(tmp_path)
    out = tmp_path / "run"
    cmd = torchrun(*small_run(shards, out, *SAME))
    proc = start(cmd, env)
    wait_for(lambda: (out / "step-00000008.pt").exists() or proc.poll() is not None, what="step 8")
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers, as under SLURM
    finish(proc)
    assert proc.returncode != 0  # 75 from the workers; torchrun reports its own failure status
    stopped = load(out / "last.pt")
    assert 8 <= stopped["step"] < 3 * STEPS and stopped["batch_in_epoch"] > 0
    log = finish(start(cmd, env))
    assert f"resuming from {out / 'last.pt'}: step {stopped['step']}" in log and "done:" in log
    assert_same_weights(uninterrupted, load(out / "last.pt"))


@pytest.fixture
def small_disk(tmp_path):
    """A 230 MB tmpfs: room for two checkpoints of the test model (90 MB each), not three."""
    needs("tmpfs")
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=230m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_is_reported_and_the_last_good_checkpoint_stays_loadable(shards, tmp_path, small_disk):
    out = small_disk / "run"
    args = small_run(shards, out, "train.epochs=1", "run.checkpoint_every=2", "run.keep_last=2")
    done = subprocess.run(
        [sys.executable, "train_ddp.py", *args],
        cwd=REPO,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=150,
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    # Steps 2 and 4 fit; the saves at 6, 8, 10 and 12 (the epoch's end) find the disk full.
    warnings = [line for line in done.stdout.splitlines() if "No space left on device" in line]
    assert len(warnings) == 4, done.stdout
    assert warnings[0] == (
        f"warning: cannot write checkpoint {out / 'step-00000006.pt'}: No space left on device; "
        "the previous checkpoint is kept"
    )
    # Training went on, but a run whose final weights are not on disk does not end as a success.
    assert done.returncode == 1
    assert "error: the final checkpoint was not saved" in done.stderr
    kept = load(out / "last.pt")
    assert kept["step"] == 4 and kept["batch_in_epoch"] == 4
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt" or ".tmp" in p.name) == [
        "last.pt",
        "step-00000002.pt",
        "step-00000004.pt",
    ]


def test_a_file_size_limit_fails_every_checkpoint_write_and_the_run_reports_it(shards, tmp_path):
    """The full disk without a tmpfs, so that it runs everywhere: `prlimit --fsize` (RLIMIT_FSIZE)
    under the checkpoint's size (90 MB) makes every checkpoint write fail, as a full disk does, with
    EFBIG instead of ENOSPC. Nothing half-written stays behind and the run does not end as a success."""
    out = tmp_path / "run"
    args = small_run(shards, out, "train.epochs=1", "run.checkpoint_every=4")
    limit = [needs("prlimit"), f"--fsize={40 * 2**20}", "--"]
    done = subprocess.run(
        [*limit, sys.executable, "train_ddp.py", *args],
        cwd=REPO,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=150,
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    warnings = [line for line in done.stdout.splitlines() if "File too large" in line]
    assert [w.split(":")[1].strip() for w in warnings] == [  # steps 4, 8 and 12 (the epoch's end)
        f"cannot write checkpoint {out / f'step-{step:08d}.pt'}" for step in (4, 8, 12)
    ], done.stdout
    assert done.returncode == 1
    assert "error: the final checkpoint was not saved" in done.stderr
    assert (out / "metrics.jsonl").exists()  # the run went on to the end of its epoch
    assert not [p.name for p in out.iterdir() if p.suffix == ".pt" or ".tmp" in p.name]


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_and_resumes(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "train_ddp.py",
        *small_run(shards, out, "train.epochs=1", "run.checkpoint_every=2"),
    ]
    env = environment(tmp_path)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # The second save's temporary file (the first one's step file is then complete): kill at once.
        def writing() -> bool:
            return proc.poll() is not None or any(out.glob(".step-00000004.pt.tmp-*"))

        wait_for(writing, timeout=120, what="the second checkpoint write")
        proc.kill()
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    print(log[-3000:])
    partial = list(out.glob(".step-*.tmp-*"))
    assert partial, "the write finished before the kill: nothing was tested"
    assert partial[0].stat().st_size < (out / "step-00000002.pt").stat().st_size
    assert load(out / "last.pt")["step"] == 2

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    assert f"resuming from {out / 'last.pt'}: step 2 (epoch 0 batch 2)" in done.stdout
    assert load(out / "last.pt")["step"] == 96 // 8
    assert not list(out.glob(".*.tmp-*"))  # the dead process's partial file was cleaned up


@pytest.mark.parametrize("ranks", [2, 3])  # with 3, rank 2 waits on rank 1 and rank 0 on rank 2 (ring)
def test_a_rank_that_stops_answering_ends_the_job_after_the_collective_timeout(shards, tmp_path, ranks):
    out = tmp_path / "run"
    args = small_run(shards, out, "train.epochs=5", "run.timeout_s=5", "run.checkpoint_every=2")
    proc = start(torchrun(*args, ranks=ranks), environment(tmp_path))
    wait_for(lambda: (out / "step-00000004.pt").exists() or proc.poll() is not None, what="step 4")
    hung = workers(proc.pid).get(1)
    assert hung is not None, "rank 1 already gone"
    os.kill(hung, signal.SIGSTOP)  # alive but silent, as a rank stuck in a driver or on a dead disk
    stopped_at = time.time()
    # 5 s for the collective to time out on the live ranks, 5 s waiting for the others to report.
    wait_for(lambda: set(workers(proc.pid)) <= {1}, timeout=60, what="the live ranks to exit")
    assert time.time() - stopped_at < 40
    # torchrun then SIGTERMs the stopped rank and SIGKILLs it after 30 s (a fixed grace, not ours
    # to test): the SIGKILL is sent here at once.
    os.kill(hung, signal.SIGKILL)
    log = finish(proc, timeout=60)
    assert proc.returncode != 0
    for live in {0, ranks - 1} - {1}:  # each live rank names the hung one
        assert f"train_ddp.py: error on rank {live}: rank 1 died or hung: it did not report the failed" in log
    assert "run.timeout_s=5 s" in log
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", log), "torchrun names the lost rank"
    assert load(out / "last.pt")["step"] >= 4  # what was saved before is kept


@pytest.fixture
def gloo_group(tmp_path):
    """A one-rank gloo process group, as each rank of a CPU job has."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def raised_in(path: str, message: str, kind: type = RuntimeError) -> BaseException:
    """`kind(message)` raised from code whose file is `path` (its innermost frame)."""
    try:
        exec(compile(f"raise kind({message!r})", path, "exec"), {"kind": kind})
    except kind as e:
        return e
    raise AssertionError("not raised")


def lost_peer(error: BaseException) -> str | None:
    """What train_ddp.py prints for `error` when rank 1 did not report it (collective_failure)."""
    return lost_peer_line(error, 5, [1]) if is_lost_peer(error) else None


TORCH_DIR = Path(torch.__file__).parent
COLLECTIVE_CODE = [
    str(TORCH_DIR / "nn" / "parallel" / "distributed.py"),  # DDP's buffer broadcast in forward
    str(TORCH_DIR / "distributed" / "distributed_c10d.py"),  # our own all_reduce
    str(TORCH_DIR / "autograd" / "graph.py"),  # DDP's reducer, in backward
]


@pytest.mark.parametrize(
    "message",
    [
        "Application timeout caused pair closure",  # gloo, from DDP's buffer broadcast (no "gloo" in it)
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1",
    ],
)
def test_a_gloo_collective_that_lost_its_peer_is_named_wherever_it_was_raised(gloo_group, message):
    """The same error text is a lost peer when torch.distributed, DDP or autograd raised it under a
    gloo group, and not when our own code (a loader, a decoder) did: only the frames tell them apart."""
    for path in COLLECTIVE_CODE:
        line = lost_peer(raised_in(path, message))
        assert line and line.startswith("rank 1 died or hung") and message.splitlines()[0] in line
    own = lost_peer(raised_in(str(REPO / "imagenet_ddp" / "engine.py"), message))
    assert (own is not None) == ("gloo" in message)  # gloo's own file in the text still names it


def test_a_device_error_in_backward_is_no_lost_peer(gloo_group):
    """A GPU's watchdog ("the launch timed out") surfaces in backward too: it is this rank's error,
    printed as it is, not blamed on the other ranks."""
    watchdog = "CUDA error: the launch timed out and was terminated"
    assert lost_peer(raised_in(COLLECTIVE_CODE[-1], watchdog, torch.AcceleratorError)) is None


def test_without_a_gloo_group_only_an_error_naming_gloo_is_a_lost_peer():
    assert not torch.distributed.is_initialized()
    assert lost_peer(raised_in(COLLECTIVE_CODE[-1], "Application timeout caused pair closure")) is None
    assert lost_peer(raised_in(COLLECTIVE_CODE[-1], "gloo: Timed out waiting 5000ms")) is not None


def test_a_rank_that_dies_during_validation_ends_the_job_at_once_naming_it(shards, tmp_path):
    """Rank 1 fails on a val image only it reads (its JPEG damaged after packing, size unchanged):
    it exits with its error while rank 0 waits in validation's all-reduce; the job must end at once,
    not after the collective timeout, and both rank 1's error and rank 0's account name rank 1."""
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    val = open_split(damaged, "val")
    last = val.shards[-1]
    at = int(read_index(last).jpg[-1][0])  # the split's last sample: rank 1's half of the val split
    with open(last.path, "r+b") as f:
        f.seek(at)
        f.write(b"\0\0\0\0")  # no JPEG start marker any more
    args = small_run(damaged, tmp_path / "run", "train.epochs=1", "run.timeout_s=300")
    began = time.time()
    proc = start(torchrun(*args), environment(tmp_path))
    log = finish(proc, timeout=200)
    assert proc.returncode != 0
    assert time.time() - began < 150  # well under run.timeout_s: nothing waited for the timeout
    assert "train_ddp.py: error on rank 1: " in log and "cannot decode its JPEG" in log
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 2", log), "torchrun names the failed rank"
    assert "train_ddp.py: error on rank 0: rank 1 died or hung: it did not report" in log


def test_a_dali_run_resumed_mid_epoch_ends_with_the_same_weights_as_an_uninterrupted_one(shards, tmp_path):
    """Two ranks; the resumed run restores each rank's DALI reader checkpoint (saved in last.pt) and
    continues the epoch at batch 5 without reading the first 5 again: it sees exactly the samples
    and crops the uninterrupted one saw after step 5 (the loader tests check none is seen twice)."""
    needs("nvidia.dali")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    same = ("data.backend=dali", "data.workers=1", "train.epochs=2", "train.deterministic=true")
    same += ("run.checkpoint_every=5", "run.keep_last=10")
    env = environment(tmp_path)

    def train(run_dir: Path) -> str:
        proc = start(torchrun(*small_run(shards, run_dir, *same)), env)
        log = finish(proc)
        assert proc.returncode == 0, log
        return log

    train(whole)
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((whole / "step-00000005.pt").read_bytes())  # as if killed at step 5
    saved = load(resumed / "last.pt")
    assert saved["batch_in_epoch"] == 5
    assert [r["loader"]["batch"] for r in saved["ranks"]] == [5, 5]
    assert "epoch 1: continuing at batch 5, from the loader's saved state" in train(resumed)
    assert_same_weights(load(whole / "last.pt"), load(resumed / "last.pt"))
