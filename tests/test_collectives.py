"""Collectives per training step on 2 real gloo ranks under torchrun: the stop-signal poll is not a
per-step sync.

Each collective that Python issues (the stop flag, the epoch's totals) waits for the slowest rank and,
on GPUs, for the device. DDP's gradient all-reduce runs in its C++ reducer and is not counted here.

python -m pytest tests/test_collectives.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from imagenet_ddp.config import load_config, resolve
from imagenet_ddp.dist import DistEnv, StopSignal
from imagenet_ddp.engine import train_one_epoch
from imagenet_ddp.state import make_state
from imagenet_ddp.tracking import NullTracker

STEPS = 8
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_object",
    "barrier",
    "broadcast_object_list",
)


class Batches(list):
    restored = False

    def iter_from(self, batch):
        return iter(self[batch:])

    def close(self):
        pass

    def end_pass(self):
        pass


def worker(out: str, overrides: list[str], signal_at: int | None) -> None:
    """One rank under torchrun: an epoch of train_one_epoch, counting the collectives Python issues."""
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    counts = dict.fromkeys(COLLECTIVES, 0)
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        record = {"counts": counts, **_train_an_epoch(rank, overrides, signal_at)}
        Path(out, f"{rank}.json").write_text(json.dumps(record))
    finally:
        # As in train_ddp.py, the DDP model is gone (with _train_an_epoch's frame) before the group:
        # a DDP reducer that outlives its gloo group can abort the process at exit.
        dist.destroy_process_group()


def _train_an_epoch(rank: int, overrides: list[str], signal_at: int | None) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)
    )
    cfg = resolve(
        load_config(None, ["train.precision=fp32", "train.channels_last=false", *overrides]), 2, "cpu", STEPS
    )
    env = DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2, device=torch.device("cpu"))
    state = make_state(model, cfg, env)
    generator = torch.Generator().manual_seed(rank)
    batches = Batches(
        (torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 4, (4,), generator=generator))
        for _ in range(STEPS)
    )
    stop = StopSignal().install()

    class Tracker(NullTracker):
        def advance(self):
            if rank == 1 and state.step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told: both must stop together

    try:
        result = train_one_epoch(state, batches, cfg, Tracker(), stop, save=lambda: None)
    finally:
        stop.uninstall()
    dist.barrier()  # as train_ddp.py's last save: no rank tears down while its peer still sends
    return {"step": state.step, "stopped": result["stopped"]}


def run_two_ranks(tmp_path: Path, overrides: list[str], signal_at: int | None = None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "SLURM_"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    cmd += [str(tmp_path), json.dumps(overrides), json.dumps(signal_at)]
    done = subprocess.run(
        cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("poll_every, polls", [(1, STEPS), (4, STEPS // 4)])
def test_the_stop_flag_is_polled_every_run_poll_every_steps_not_every_step(tmp_path, poll_every, polls):
    ranks = run_two_ranks(tmp_path, [f"run.poll_every={poll_every}", "logging.log_every=100"])
    for r in ranks:
        # The polls, one all-reduce of the epoch's totals at its end (and the test's barrier); nothing else.
        assert r["counts"] == {**dict.fromkeys(COLLECTIVES, 0), "all_reduce": polls + 1, "barrier": 1}
        assert r["step"] == STEPS and not r["stopped"]


def test_a_signal_on_one_rank_stops_both_after_the_same_step_at_the_next_poll(tmp_path):
    ranks = run_two_ranks(tmp_path, ["run.poll_every=3", "logging.log_every=100"], signal_at=4)
    assert [r["step"] for r in ranks] == [6, 6] and all(r["stopped"] for r in ranks)


if __name__ == "__main__":
    worker(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))
    # The result is on disk and the group destroyed. This bare worker (unlike train_ddp.py, whose
    # exits the suite checks) sometimes aborts in a C++ destructor during interpreter shutdown
    # ("terminate called without an active exception", no Python frame): skip that shutdown.
    sys.stdout.flush()
    os._exit(0)
