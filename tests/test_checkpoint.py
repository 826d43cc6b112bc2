"""Checkpoints: atomic, rotated, readable with weights_only=True, free of wrapper prefixes.

python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

from imagenet_ddp.checkpoint import (
    FORMAT,
    CheckpointDir,
    CheckpointError,
    load,
    rng_state,
    save_atomic,
    set_rng_state,
    unwrap,
    weights_digest,
)
from imagenet_ddp.models import build_model


def ckpt(step: int, **extra) -> dict:
    return {"format": FORMAT, "step": step, "weights": torch.full((4,), float(step)), **extra}


def test_the_newest_k_step_files_are_kept_beside_last_and_best(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        ckpts.save(ckpt(step), is_best=step == 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "last.pt",
        "step-00000030.pt",
        "step-00000040.pt",
    ]
    assert load(ckpts.last)["step"] == 40
    assert load(ckpts.best)["step"] == 20  # still there after its step file was rotated away
    assert ckpts.load_latest()[0]["step"] == 40


def test_keep_last_0_writes_last_pt_only_and_a_non_writer_writes_nothing(tmp_path):
    CheckpointDir(tmp_path / "a", keep_last=0).save(ckpt(5))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["last.pt"]
    assert CheckpointDir(tmp_path / "b", writer=False).save(ckpt(5)) is None
    assert not (tmp_path / "b").exists()


def test_a_truncated_last_pt_is_detected_and_the_previous_checkpoint_used(tmp_path, capsys):
    ckpts = CheckpointDir(tmp_path, keep_last=3)
    for step in (1, 2):
        ckpts.save(ckpt(step))
    data = ckpts.last.read_bytes()
    ckpts.last.unlink()  # break the link first: damage last.pt only, as a torn copy would
    ckpts.last.write_bytes(data[: len(data) // 2])
    found, path = ckpts.load_latest()
    assert found["step"] == 2 and path.name == "step-00000002.pt"
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_no_checkpoint_is_none_and_only_damaged_ones_is_an_error(tmp_path):
    assert CheckpointDir(tmp_path).load_latest() is None
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        CheckpointDir(tmp_path).load_latest()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(ckpt(1), path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device"):
        save_atomic(ckpt(2, bad=Unpicklable()), path)
    assert load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "obj": random.Random(0)}, path)  # a pickled class: not weights
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load(path)


def test_unwrap_removes_ddp_and_compile_prefixes():
    model = build_model("resnet18", num_classes=3)
    keys = list(model.state_dict())
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = torch.compile(nn.parallel.DistributedDataParallel(model))
        assert next(iter(wrapped.state_dict())).startswith("_orig_mod.module.")
        assert unwrap(wrapped) is model
        assert list(unwrap(wrapped).state_dict()) == keys
    finally:
        dist.destroy_process_group()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import numpy as np

    path = tmp_path / "rng.pt"
    save_atomic({"format": FORMAT, "rng": [rng_state(torch.device("cpu"))]}, path)
    expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    set_rng_state(load(path)["rng"][0], torch.device("cpu"))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


def test_the_weights_digest_follows_parameters_not_buffers():
    model = build_model("resnet18", num_classes=3)
    before = weights_digest(model)
    model.bn1.running_mean += 1
    assert weights_digest(model) == before
    with torch.no_grad():
        model.fc.bias += 1
    assert weights_digest(model) != before
    changed = weights_digest(model)
    assert (
        weights_digest(model.to(memory_format=torch.channels_last)) == changed
    )  # the values, not the layout


def test_a_write_past_the_file_size_limit_is_a_checkpoint_error_and_the_old_file_stays(tmp_path):
    """What a full disk does to torch.save, without root: the write fails with an OSError (here EFBIG
    from RLIMIT_FSIZE) that torch.save would report as a RuntimeError about stream positions."""
    import resource
    import signal

    path = tmp_path / "last.pt"
    save_atomic(ckpt(1), path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error instead of the signal's death
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: File too large"):
            save_atomic(ckpt(2, big=torch.zeros(1 << 20)), path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
