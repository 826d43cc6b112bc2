"""The training state and loops in one process: accumulation, non-finite steps,
exact evaluation, EMA, and whole runs of train_ddp.py on real shards (torch and synthetic backends).

python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import make_shards
import train_ddp
from imagenet_ddp.checkpoint import load
from imagenet_ddp.config import load_config, loader_config, resolve
from imagenet_ddp.data import build_loader
from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ddp.dist import DistEnv
from imagenet_ddp.engine import NonFiniteError, evaluate, train_one_epoch, train_step
from imagenet_ddp.optim import param_groups
from imagenet_ddp.state import Ema, make_state
from imagenet_ddp.tracking import NullTracker
from tests.fixtures import make_folder

CPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
METRIC_KEYS = {
    "epoch",
    "step",
    "train_loss",
    "train_top1",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_sec",
    "epoch_seconds",
    "train_size",
}


def make_tiny_shards(root: Path) -> Path:
    """4 classes of class-dependent synthetic images packed by `make_shards.py folder`: 96 train, 32 val."""
    make_folder(root / "src", num_classes=4, per_class=24, val_per_class=8, bad=False, side_range=(40, 72))
    args = ["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--workers", "1"]
    assert make_shards.main(args + ["--shard-size", "40"]) == 0
    return root / "shards"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One compute thread (with more, a busy shared machine makes OpenMP spin: steps 10x slower);
    the process-wide torch flags a run sets are restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # dist.setup then leaves the thread count alone
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)  # train.deterministic=true sets it process-wide


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def small_run(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a few-second run: ResNet-18 at 32 px, batch 8 (12 steps per epoch), no W&B."""
    return [
        f"data.root={shards}",
        "data.backend=torch",
        "data.workers=0",
        "data.image_size=32",
        "data.eval_size=32",
        "model.name=resnet18",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.channels_last=false",
        "optim.lr=0.1",
        "optim.ref_batch_size=0",
        "optim.warmup_epochs=0.5",
        f"run.dir={run_dir}",
        "logging.wandb=false",
        "logging.log_every=2",
        *extra,
    ]


class Batches:
    """Fixed batches in the loader's shape (for the arithmetic checks that need exact inputs)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def iter_from(self, batch):
        self.restored = False
        return iter(self.batches[batch:])

    def close(self):
        pass

    def end_pass(self):
        pass


class NoStop:
    def requested(self, device) -> bool:
        return False


def tiny_state(cfg_overrides=(), seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)
    )
    cfg = load_config(None, ["train.precision=fp32", "train.channels_last=false", *cfg_overrides])
    return make_state(model, resolve(cfg, 1, "cpu", batches_per_epoch=8), CPU)


def test_two_accumulated_micro_batches_make_the_same_step_as_one_batch_of_both():
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    one = tiny_state(["train.label_smoothing=0", "optim.ref_batch_size=0"])
    two = tiny_state(["train.label_smoothing=0", "optim.ref_batch_size=0", "train.grad_accum=2"])
    totals = train_step(one, [(images, labels)])
    train_step(two, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    for a, b in zip(one.model.parameters(), two.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert totals[2].item() == 8 and one.step == two.step == 1


def bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    )


def test_a_non_finite_step_leaves_weights_momentum_batchnorm_statistics_and_ema_as_they_were():
    """The forward pass of a NaN batch has already moved BatchNorm's running statistics when the step
    is skipped: they are put back, as are the weights, the momentum and the EMA (no host sync)."""
    torch.manual_seed(0)
    model = bn_model()
    cfg = load_config(None, ["train.precision=bf16", "train.channels_last=false", "train.ema_decay=0.9"])
    state = make_state(model, resolve(cfg, 1, "cpu", batches_per_epoch=8), CPU)
    good = (torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3]))
    train_step(state, [good])  # momentum buffers and EMA exist from here on
    before = copy.deepcopy(
        (state.model.state_dict(), state.optimizer.state_dict()["state"], state.ema.module.state_dict())
    )
    bad = (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long))
    train_step(state, [bad])
    assert int(state.nonfinite_streak) == 1 and state.step == 2
    after = (state.model.state_dict(), state.optimizer.state_dict()["state"], state.ema.module.state_dict())
    for saved, now in zip(before, after, strict=True):
        torch.testing.assert_close(now, saved, rtol=0, atol=0)  # NaN-free and bitwise the same
    train_step(state, [good])
    assert int(state.nonfinite_streak) == 0
    assert not torch.equal(state.model[1].running_mean, before[0]["1.running_mean"])  # a good step moves them


def test_the_skipped_step_is_the_reference_optimizers_skip():
    """The fused SGD told to skip on the device ends where torch's plain SGD ends when never stepped."""
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(3)]
    bad = (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long))
    ours = tiny_state(["train.label_smoothing=0"])
    for batch in [bad, data[0], bad, data[1], data[2]]:  # skipped first: torch's fused SGD then read garbage
        train_step(ours, [batch])
    assert isinstance(ours.optimizer, torch.optim.SGD) and ours.optimizer.defaults["fused"]
    reference = tiny_state(["train.label_smoothing=0"])
    sgd = torch.optim.SGD(param_groups(reference.model, 5e-5, False), lr=0.1, momentum=0.9, nesterov=True)
    for i, (images, labels) in enumerate(data):
        sgd.zero_grad()
        for group in sgd.param_groups:
            group["lr"] = reference.schedule([1, 3, 4][i])  # the schedule goes on through skipped steps
        nn.functional.cross_entropy(reference.model(images), labels).backward()
        sgd.step()
    for a, b in zip(ours.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_checkpoint_saved_with_an_unfused_sgd_resumes_and_still_skips_on_the_device():
    """Checkpoints written before SGD was fused hold groups with fused=False (and, saved before a
    first step, no momentum): loading them must not turn the optimizer back into one that refuses
    the device-side skip, nor leave it to read uninitialised momentum."""
    old = tiny_state(["train.label_smoothing=0"])
    unfused = torch.optim.SGD(param_groups(old.model, 5e-5, False), lr=0.1, momentum=0.9, nesterov=True)
    resumed = tiny_state(["train.label_smoothing=0"])
    resumed.load_state_dict({**old.state_dict(), "optimizer": unfused.state_dict()})
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    bad = (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long))
    good = (torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))
    train_step(resumed, [bad])
    train_step(resumed, [good])
    train_step(old, [bad])
    train_step(old, [good])
    for a, b in zip(resumed.model.parameters(), old.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_too_many_consecutive_non_finite_steps_stop_training_at_the_next_poll():
    bad = (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long))
    overrides = ["train.max_nonfinite_steps=3", "run.poll_every=3", "logging.log_every=100"]
    state = tiny_state(overrides)
    cfg = resolve(load_config(None, overrides), 1, "cpu", 8)
    with pytest.raises(NonFiniteError, match=r"^3 consecutive steps with NaN/Inf gradients \(up to step 3\)"):
        train_one_epoch(state, Batches([bad] * 8), cfg, NullTracker(), NoStop(), save=lambda: None)
    # A streak that ends between two polls still counts; shorter ones do not stop training.
    good = (torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.long))
    state = tiny_state(overrides)
    with pytest.raises(NonFiniteError, match="^3 consecutive"):
        train_one_epoch(
            state, Batches([good, bad, bad, bad, good, good]), cfg, NullTracker(), NoStop(), save=lambda: None
        )
    state = tiny_state(overrides)
    batches = Batches([bad, bad, good, bad, bad, good, good, good])
    assert (
        train_one_epoch(state, batches, cfg, NullTracker(), NoStop(), save=lambda: None)["stopped"] is False
    )


def test_ema_moves_towards_the_weights_by_one_minus_decay():
    state = tiny_state()
    ema = Ema(state.model, decay=0.75)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)
    ema.update()
    for s, e in zip(start, ema.module.parameters(), strict=True):
        torch.testing.assert_close(e, s + 0.25)
    ema.update(skipped=torch.tensor(True))  # a skipped step: no move
    ema.update(skipped=torch.tensor(False))
    for s, e in zip(start, ema.module.parameters(), strict=True):
        torch.testing.assert_close(e, s + 0.25 + 0.75 * 0.25)


class HostReads:
    """Counts the ways Python reads a tensor's value (each a host sync on a GPU). torch's own C++ code
    is not seen; on a GPU `torch.cuda.set_sync_debug_mode` sees all (python -m imagenet_ddp.bench gpu)."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args):
            self.count += 1
            return original(tensor, *args)

        return read


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_reads_nothing_back_from_the_device(precision, monkeypatch):
    """No per-step sync: the skip decision for NaN/Inf, the EMA, the BatchNorm guard stay on the device."""
    torch.manual_seed(0)
    model = bn_model()
    overrides = [f"train.precision={precision}", "train.channels_last=false", "train.ema_decay=0.9"]
    state = make_state(model, resolve(load_config(None, overrides), 1, "cpu", 8), CPU)
    batches = [
        (torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))),
        (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long)),
    ]
    reads = HostReads(monkeypatch)
    for i in range(4):
        train_step(state, [batches[i % 2]])
    assert reads.count == 0
    assert int(state.nonfinite_streak) == 1 and reads.count == 1  # the counter itself works


def test_the_model_and_its_ema_are_evaluated_in_one_pass_each_as_if_alone():
    state, other = tiny_state(seed=0), tiny_state(seed=1)
    torch.manual_seed(2)
    labels = torch.tensor([0, 1, 2, 3, 0, -100, -100, -100])  # the last three pad the batch
    batches = Batches([(torch.randn(8, 3, 6, 6), labels), (torch.randn(8, 3, 6, 6), labels.roll(3))])
    passes = []

    class Counted(Batches):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    loader = Counted(batches.batches)
    both = evaluate({"": state.model, "ema": other.model}, loader, state)
    assert len(passes) == 1
    alone = evaluate({"": state.model}, loader, state)
    ema_alone = evaluate({"": other.model}, loader, state)
    assert {k: both[k] for k in alone} == alone and both["val_count"] == 10
    assert {k: both[f"{k}_ema"] for k in ("val_loss", "val_top1", "val_top5")} == {
        k: ema_alone[k] for k in ("val_loss", "val_top1", "val_top5")
    }


@pytest.fixture(scope="session")
def numbered_val(tmp_path_factory) -> tuple[Path, Counter]:
    """Shards whose 32 val images are each one flat grey (10, 17, ..., 227): the grey names the
    sample after any resize and crop. 4 classes, shards of 5 samples (ranks split inside shards)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("numbered")
    expected = Counter()
    for split, count in (("train", 2), ("val", 8)):
        for c, name in enumerate(["ant", "bee", "cat", "dog"]):
            (root / "src" / split / name).mkdir(parents=True)
            for i in range(count):
                grey = 10 + 7 * (c * count + i)
                Image.new("RGB", (48, 40), (grey,) * 3).save(
                    root / "src" / split / name / f"{i}.jpg", quality=95
                )
                expected[(c, grey)] += split == "val"
    args = ["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--workers", "1"]
    assert make_shards.main([*args, "--shard-size", "5"]) == 0
    return root / "shards", +expected


class Recording:
    """The loader evaluate() is given, keeping (class index, grey) of each sample it counts
    (a label that is not PAD_LABEL: evaluate's own rule)."""

    def __init__(self, loader):
        self.loader, self.counted = loader, Counter()

    def __iter__(self):
        for images, labels in self.loader:
            for image, label in zip(images, labels.tolist(), strict=True):
                if label >= 0:  # the grey level back from the normalized red channel
                    grey = (image[0].float().mean() * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
                    self.counted[(label, round(grey.item()))] += 1
            yield images, labels


@pytest.mark.parametrize("world_size, workers", [(1, 0), (3, 0), (3, 2)])
def test_evaluation_counts_each_val_sample_exactly_once(numbered_val, world_size, workers):
    """Across ranks, the samples evaluate() counts are the split's 32, each once: the same multiset of
    (class, image), not only the same total (a sample read twice and one never read would pass that)."""
    shards, expected = numbered_val
    state = tiny_state()
    overrides = [f"data.root={shards}", "data.backend=torch", f"data.workers={workers}"]
    cfg = load_config(None, [*overrides, "data.eval_size=16", "train.batch_size=4"])
    counts, counted = [], Counter()
    for rank in range(world_size):
        loader = Recording(
            build_loader(loader_config(cfg), "val", rank=rank, world_size=world_size, train=False)
        )
        counts.append(evaluate({"": state.model}, loader, state)["val_count"])
        assert counts[-1] == sum(loader.counted.values())
        counted += loader.counted
    assert len(expected) == 32 and counted == expected
    assert sum(counts) == 32


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_single_process_run_on_synthetic_data_writes_metrics_config_and_checkpoints(shards, tmp_path):
    run = tmp_path / "run"
    args = small_run(shards, run, "data.backend=synthetic", "train.epochs=2", "run.keep_last=1")
    handlers = {sig: signal.getsignal(sig) for sig in train_ddp.STOP_SIGNALS}
    assert train_ddp.main(args) == 0
    # An in-process run gives the caller's stop handlers back (a kept one made SIGTERM a no-op, and
    # processes forked later, such as a packing pool, could no longer be terminated).
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    metrics = read_metrics(run)
    steps = 96 // 8
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [steps, 2 * steps]
    assert set(metrics[0]) >= METRIC_KEYS and metrics[0]["val_count"] == 32
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.jsonl",
        "status.json",
        f"step-{2 * steps:08d}.pt",
    ]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    ckpt = load(run / "last.pt")  # weights_only=True
    assert ckpt["step"] == 2 * steps and (ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 0)
    assert ckpt["config"]["derived"]["global_batch_size"] == 8
    assert load_config(run / "config.yaml").train.epochs == 2


def test_a_run_learns_and_its_checkpoint_alone_rebuilds_the_model(shards, tmp_path):
    from imagenet_ddp.models import build_model

    run = tmp_path / "run"
    assert train_ddp.main(small_run(shards, run, "train.epochs=5")) == 0
    metrics = read_metrics(run)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert max(m["val_top1"] for m in metrics) >= 0.5, metrics  # 4 classes: chance is 0.25
    ckpt = load(run / "best.pt")
    model = build_model(**ckpt["architecture"])
    model.load_state_dict(ckpt["model"])
    assert ckpt["classes"] == sorted(["dog", "cat", "red panda", "crème brûlée"])
    assert ckpt["class_names"] == ckpt["classes"]
    assert ckpt["preprocess"] == {
        "resize": 37,  # 32 / 0.875
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "flip": False,  # train.eval_flip
    }
    assert ckpt["metrics"]["val_top1"] == max(m["val_top1"] for m in metrics)


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(shards, tmp_path):
    run = tmp_path / "run"
    assert train_ddp.main(small_run(shards, run, "train.epochs=1")) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_to')
    assert train_ddp.main(small_run(shards, run, "train.epochs=2")) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


def test_running_the_same_command_again_resumes_at_the_saved_step(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_ddp.main(small_run(shards, run, "train.epochs=1")) == 0
    first = load(run / "last.pt")
    assert train_ddp.main(small_run(shards, run, "train.epochs=2")) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'last.pt'}: step {first['step']} (epoch 1 batch 0" in out
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [first["step"], 2 * first["step"]]
    assert load(run / "last.pt")["step"] == 2 * first["step"]
    # A finished run asked again does nothing more.
    assert train_ddp.main(small_run(shards, run, "train.epochs=2")) == 0
    assert len(read_metrics(run)) == 2


def test_a_run_folder_is_not_overwritten_when_resume_is_off(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_ddp.main(small_run(shards, run, "train.epochs=1", "data.backend=synthetic")) == 0
    assert train_ddp.main(small_run(shards, run, "train.epochs=1", "run.resume=false")) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resuming_mid_epoch_ends_with_the_same_weights_as_an_uninterrupted_run(shards, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    same = ("train.epochs=2", "run.checkpoint_every=5", "run.keep_last=10", "train.deterministic=true")
    assert train_ddp.main(small_run(shards, whole, *same)) == 0
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((whole / "step-00000005.pt").read_bytes())  # as if killed at step 5
    assert load(resumed / "last.pt")["batch_in_epoch"] == 5
    assert train_ddp.main(small_run(shards, resumed, *same)) == 0
    a, b = load(whole / "last.pt"), load(resumed / "last.pt")
    assert a["step"] == b["step"] == 24
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_ranks_come_from_torchrun_then_slurm_then_a_single_process(monkeypatch):
    from imagenet_ddp.dist import read_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name in (
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_JOB_NUM_NODES",
    ):
        monkeypatch.delenv(name, raising=False)
    assert read_env() == (0, 0, 1, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2"}
    for k, v in {**slurm, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    assert read_env() == (5, 1, 8, 4)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == str(20000 + 4242)
    # `srun torchrun ...`: SLURM describes the per-node launcher, torchrun the worker: torchrun wins.
    for k, v in {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(k, v)
    assert read_env() == (3, 3, 16, 8)


class StopAt:
    """The stop request as ranks agree on it, arriving after optimizer step `step`."""

    def __init__(self, state, step: int):
        self.state, self.step = state, step

    def requested(self, device) -> bool:
        return self.state.step >= self.step


def test_a_stop_after_the_last_step_resumes_without_reading_the_epoch_again():
    state = tiny_state(["logging.log_every=100"])
    cfg = resolve(load_config(None, ["logging.log_every=100", "run.poll_every=1"]), 1, "cpu", 4)
    batch = (torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))
    first = train_one_epoch(
        state, Batches([batch] * 4), cfg, NullTracker(), StopAt(state, 4), save=lambda: None
    )
    assert first["stopped"] and (state.step, state.batch_in_epoch) == (4, 4)

    class Unread(Batches):
        def __iter__(self):
            raise AssertionError("the epoch was read again")

    again = train_one_epoch(state, Unread([batch] * 4), cfg, NullTracker(), NoStop(), save=lambda: None)
    assert not again["stopped"] and state.step == 4
    assert again["train_loss"] == pytest.approx(first["train_loss"])  # the epoch's totals carried over


@pytest.mark.slow
def test_a_compiled_bf16_channels_last_run_saves_weights_a_plain_model_loads(shards, tmp_path):
    from imagenet_ddp.models import build_model

    run = tmp_path / "run"
    args = small_run(
        shards,
        run,
        "data.backend=synthetic",
        "train.epochs=1",
        "train.compile=true",
        "train.precision=bf16",
        "train.channels_last=true",
    )
    assert train_ddp.main(args) == 0
    metrics = read_metrics(run)
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"])
    ckpt = load(run / "last.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    build_model(**ckpt["architecture"]).load_state_dict(ckpt["model"])  # strict: every key matches
    assert ckpt["config"]["derived"]["precision"] == "bf16"
