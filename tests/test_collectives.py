"""Collectives per training step on 2 real gloo ranks: the stop-signal poll is not a per-step sync.

Each collective that Python issues (the stop flag, the epoch's totals) waits for the slowest rank and,
on GPUs, for the device. DDP's gradient all-reduce runs in its C++ reducer and is not counted here.

python -m pytest tests/test_collectives.py -q
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from imagenet_ddp.config import load_config, resolve
from imagenet_ddp.dist import DistEnv, StopSignal
from imagenet_ddp.engine import make_state, train_one_epoch
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


def _rank(rank: int, store_path: str, out: str, overrides: list[str], signal_at: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    counts = dict.fromkeys(COLLECTIVES, 0)
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)
        )
        cfg = resolve(
            load_config(None, ["train.precision=fp32", "train.channels_last=false", *overrides]),
            2,
            "cpu",
            STEPS,
        )
        env = DistEnv(
            rank=rank, local_rank=rank, world_size=2, local_world_size=2, device=torch.device("cpu")
        )
        state = make_state(model, cfg, env)
        generator = torch.Generator().manual_seed(rank)
        batches = Batches(
            (torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 4, (4,), generator=generator))
            for _ in range(STEPS)
        )
        stop = StopSignal().install()
        steps_seen = []

        class Tracker(NullTracker):
            def advance(self):
                steps_seen.append(state.step)
                if rank == 1 and state.step == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told: both must stop together

        result = train_one_epoch(state, batches, cfg, Tracker(), stop, save=lambda: None)
        stop.uninstall()
        Path(out, f"{rank}.json").write_text(
            json.dumps({"counts": counts, "step": state.step, "stopped": result["stopped"]})
        )
        dist.barrier()  # a rank that tears down while its peer still sends aborts in gloo's threads
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, overrides: list[str], signal_at: int | None = None) -> list[dict]:
    mp.start_processes(
        _rank,
        args=(str(tmp_path / "store"), str(tmp_path), overrides, signal_at),
        nprocs=2,
        start_method="spawn",
    )
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("poll_every, polls", [(1, STEPS), (4, STEPS // 4)])
def test_the_stop_flag_is_polled_every_run_poll_every_steps_not_every_step(tmp_path, poll_every, polls):
    ranks = run_two_ranks(tmp_path, [f"run.poll_every={poll_every}", "logging.log_every=100"])
    for r in ranks:
        # The polls, and one all-reduce of the epoch's totals at its end; nothing else.
        assert r["counts"] == {**dict.fromkeys(COLLECTIVES, 0), "all_reduce": polls + 1}
        assert r["step"] == STEPS and not r["stopped"]


def test_a_signal_on_one_rank_stops_both_after_the_same_step_at_the_next_poll(tmp_path):
    ranks = run_two_ranks(tmp_path, ["run.poll_every=3", "logging.log_every=100"], signal_at=4)
    assert [r["step"] for r in ranks] == [6, 6] and all(r["stopped"] for r in ranks)
