"""Optimizers, LR schedules and losses built from the config, each against its reference: timm's
create_optimizer_v2, StepLRScheduler and BinaryCrossEntropy, torch's SGD, FFCV's triangular LR formula.

python -m pytest tests/test_optim.py -q
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn import functional as F

from imagenet_ddp.config import OptimConfig, TrainConfig, load_config, resolve
from imagenet_ddp.dist import DistEnv
from imagenet_ddp.engine import train_step
from imagenet_ddp.losses import build_criterion
from imagenet_ddp.optim import build_optimizer, lr_at, lr_schedule, param_groups
from imagenet_ddp.state import make_state

CPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ schedules


def resolved(overrides, batches_per_epoch=7):
    cfg = load_config(None, ["train.precision=fp32", *overrides])
    return resolve(cfg, 1, "cpu", batches_per_epoch=batches_per_epoch)


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    lr = [
        lr_at(s, base_lr=1.0, total_steps=110, warmup_steps=10, warmup_start_factor=0.1, min_lr_factor=0.01)
        for s in range(111)
    ]
    assert lr[0] == pytest.approx(0.1) and lr[5] == pytest.approx(0.55) and lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))


def test_the_cosine_schedule_from_the_config_is_lr_at():
    cfg = resolved(["train.epochs=10", "optim.warmup_epochs=2", "optim.min_lr_factor=0.05"])
    d = cfg.derived
    schedule = lr_schedule(cfg)
    for step in range(d.total_steps + 1):
        expected = lr_at(
            step,
            base_lr=d.lr,
            total_steps=d.total_steps,
            warmup_steps=d.warmup_steps,
            warmup_start_factor=0.1,
            min_lr_factor=0.05,
        )
        assert schedule(step) == expected


@pytest.mark.parametrize("warmup_epochs", [3, 0])
def test_the_linear_schedule_is_ffcvs_triangle_at_every_steps_fractional_epoch(warmup_epochs):
    cfg = resolved(
        [
            "optim.schedule=linear",
            "train.epochs=16",
            f"optim.warmup_epochs={warmup_epochs}",
            "optim.warmup_start_factor=0.02",
            "optim.min_lr_factor=0.0",
        ]
    )
    d = cfg.derived
    schedule = lr_schedule(cfg)
    # FFCV's train_imagenet.py: get_lr(epoch) = np.interp([epoch], [0, lr_peak_epoch, epochs], [start * lr,
    # lr, 0]), linearly interpolated within each epoch, i.e. evaluated at the fractional epoch.
    xs = [0, warmup_epochs, 16] if warmup_epochs else [0, 16]
    ys = [0.02 * d.lr, d.lr, 0.0] if warmup_epochs else [d.lr, 0.0]
    for step in range(d.total_steps + 1):
        expected = float(np.interp(step / d.steps_per_epoch, xs, ys))
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert schedule(d.warmup_steps) == d.lr


@pytest.mark.parametrize("step_epochs", [4.0, 2.5])
def test_the_step_schedule_is_timms_step_scheduler_at_every_epoch(step_epochs):
    """timm's train.py steps its scheduler once per epoch, with the epoch's index: after warmup our
    per-step LR is timm's at every step of the epoch, decaying on the same epoch boundaries, also for
    a step_epochs that is not a whole number. In warmup ours rises every step, through timm's value
    at each epoch's start."""
    epochs, warmup = 20, 3
    cfg = resolved(
        [
            "optim.schedule=step",
            f"train.epochs={epochs}",
            f"optim.warmup_epochs={warmup}",
            f"optim.step_epochs={step_epochs}",
            "optim.step_gamma=0.5",
        ]
    )
    d, spe = cfg.derived, cfg.derived.steps_per_epoch
    schedule = lr_schedule(cfg)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=d.lr)
    timm_schedule, _ = create_scheduler_v2(
        optimizer,
        sched="step",
        num_epochs=epochs,
        decay_epochs=step_epochs,
        decay_rate=0.5,
        warmup_lr=0.1 * d.lr,
        warmup_epochs=warmup,
    )
    timm_lr = []
    for epoch in range(epochs):
        timm_schedule.step(epoch)
        timm_lr.append(optimizer.param_groups[0]["lr"])
    for epoch in range(epochs):
        ours = [schedule(step) for step in range(epoch * spe, (epoch + 1) * spe)]
        if epoch < warmup:
            assert ours[0] == pytest.approx(timm_lr[epoch], rel=1e-12)
            assert ours == sorted(ours) and ours[-1] < d.lr  # rising to the LR reached at warmup's end
        else:
            assert ours == [timm_lr[epoch]] * spe  # bitwise
    assert len(set(timm_lr[warmup:])) > 3  # it did decay, more than once


def test_the_step_schedule_with_whole_step_epochs_is_also_timms_per_update_scheduler_at_every_step():
    epochs, warmup = 12, 2
    cfg = resolved(
        [
            "optim.schedule=step",
            f"train.epochs={epochs}",
            f"optim.warmup_epochs={warmup}",
            "optim.step_epochs=3",
        ]
    )
    d = cfg.derived
    schedule = lr_schedule(cfg)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=d.lr)
    timm_schedule, _ = create_scheduler_v2(
        optimizer,
        sched="step",
        num_epochs=epochs,
        decay_epochs=3,
        decay_rate=0.1,
        warmup_lr=0.1 * d.lr,
        warmup_epochs=warmup,
        step_on_epochs=False,
        updates_per_epoch=d.steps_per_epoch,
    )
    for step in range(d.total_steps):
        timm_schedule.step_update(step)
        assert schedule(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


def timm_cosine(optimizer, d, epochs, warmup, **per_update):
    schedule, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=epochs,
        min_lr=0.01 * d.lr,
        warmup_lr=0.05 * d.lr,
        warmup_epochs=warmup,
        cooldown_epochs=0,
        **per_update,
    )
    return schedule


@pytest.mark.parametrize("overlaps", [True, False], ids=["overlapping", "after-warmup"])
def test_a_cosine_overlapping_warmup_is_timms_cosine_scheduler_per_epoch_and_per_update(overlaps):
    """timm's CosineLRScheduler (warmup_prefix=False, as timm's train.py, DeiT and the RSB recipes use
    it) runs its cosine over the whole run, warmup standing in for its first epochs: with
    optim.warmup_overlaps_decay ours is its per-update schedule at every step and its per-epoch one
    at each epoch's first step. The cosine after warmup (the default) is not (negative control)."""
    epochs, warmup = 20, 3
    cfg = resolved(
        [
            f"train.epochs={epochs}",
            f"optim.warmup_epochs={warmup}",
            "optim.warmup_start_factor=0.05",
            "optim.min_lr_factor=0.01",
            f"optim.warmup_overlaps_decay={str(overlaps).lower()}",
        ]
    )
    d, spe = cfg.derived, cfg.derived.steps_per_epoch
    schedule = lr_schedule(cfg)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=d.lr)
    per_epoch = timm_cosine(optimizer, d, epochs, warmup)
    timm_epochs = []
    for epoch in range(epochs):
        per_epoch.step(epoch)
        timm_epochs.append(optimizer.param_groups[0]["lr"])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=d.lr)
    per_update = timm_cosine(optimizer, d, epochs, warmup, step_on_epochs=False, updates_per_epoch=spe)
    timm_steps = []
    for step in range(d.total_steps):
        per_update.step_update(step)
        timm_steps.append(optimizer.param_groups[0]["lr"])
    ours = [schedule(step) for step in range(d.total_steps)]
    same_steps = ours == pytest.approx(timm_steps, rel=1e-12)
    same_epochs = ours[::spe] == pytest.approx(timm_epochs, rel=1e-12)
    assert same_steps is overlaps and same_epochs is overlaps
    assert ours[: warmup * spe] == pytest.approx(timm_steps[: warmup * spe], rel=1e-12)  # warmup: the same
    if not overlaps:  # after warmup ours is higher: the cosine starts later
        assert all(a > b for a, b in zip(ours[warmup * spe : -1], timm_steps[warmup * spe : -1], strict=True))


# ------------------------------------------------------------------------------------------ optimizers


def test_norm_and_bias_parameters_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(model, 1e-4, decay_norm_and_bias=False)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3), (2, 36)]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def small_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.mobilenet_v3_small(num_classes=10, dropout=0.0)


def run_steps(model, optimizer, lrs, seed=1):
    """A few steps on fixed random data, the LR set per step as train_step sets it."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for lr in lrs:
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


def weight_decay_of(model, optimizer) -> list[float]:
    wd = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return [wd[id(p)] for p in model.parameters()]


# (our config, timm's create_optimizer_v2 arguments for the same optimizer)
TIMM_EQUIVALENTS = {
    "lamb": (
        {"name": "lamb", "betas": [0.9, 0.99], "weight_decay": 0.02},
        {"opt": "lamb", "betas": (0.9, 0.99), "weight_decay": 0.02},
    ),
    "lamb-eps": (
        {"name": "lamb", "eps": 1e-8, "weight_decay": 0.02},
        {"opt": "lamb", "eps": 1e-8, "weight_decay": 0.02},
    ),
    "rmsprop_tf": (
        {"name": "rmsprop_tf", "eps": 1e-3, "momentum": 0.9, "rmsprop_alpha": 0.9, "weight_decay": 1e-5},
        {"opt": "rmsproptf", "eps": 1e-3, "momentum": 0.9, "alpha": 0.9, "weight_decay": 1e-5},
    ),
    "lars-nesterov": (
        {"name": "lars", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        {"opt": "nlars", "momentum": 0.9, "weight_decay": 5e-4},
    ),
    "lars": (
        {"name": "lars", "momentum": 0.8, "nesterov": False, "weight_decay": 5e-4, "lars_trust_coeff": 0.01},
        {"opt": "lars", "momentum": 0.8, "weight_decay": 5e-4, "trust_coeff": 0.01},
    ),
}


@pytest.mark.parametrize("case", TIMM_EQUIVALENTS)
def test_timm_optimizers_from_the_config_step_as_timms_create_optimizer_v2(case):
    """Same class, same hyperparameters, and the same parameters without weight decay (BatchNorm and
    biases): a few steps of a torchvision ResNet-18 end on the same weights."""
    ours_cfg, timm_args = TIMM_EQUIVALENTS[case]
    o = OptimConfig(**ours_cfg)
    lrs = [0.01, 0.02, 0.015]
    ours_model, timm_model = small_model(), small_model()
    ours = build_optimizer(param_groups(ours_model, o.weight_decay, o.wd_on_norm_and_bias), o, lrs[0], "cpu")
    reference = create_optimizer_v2(timm_model, lr=lrs[0], **timm_args)
    assert type(ours) is type(reference)
    assert weight_decay_of(ours_model, ours) == weight_decay_of(timm_model, reference)
    assert 0.0 in weight_decay_of(ours_model, ours) and o.weight_decay in weight_decay_of(ours_model, ours)
    hyper = {
        k: v for k, v in reference.defaults.items() if k not in ("lr", "weight_decay", "max_lr_snapshot")
    }
    assert {k: ours.defaults[k] for k in hyper} == hyper
    before = copy.deepcopy(ours_model.state_dict())
    run_steps(ours_model, ours, lrs)
    run_steps(timm_model, reference, lrs)
    for (name, a), b in zip(ours_model.state_dict().items(), timm_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(before["features.0.0.weight"], ours_model.state_dict()["features.0.0.weight"])


def test_sgd_from_the_config_is_fused_and_steps_as_torchs_plain_sgd():
    o = OptimConfig(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4)
    lrs = [0.1, 0.2, 0.05]
    fused_model, plain_model = small_model(), small_model()
    fused = build_optimizer(param_groups(fused_model, o.weight_decay, False), o, lrs[0], torch.device("cpu"))
    assert isinstance(fused, torch.optim.SGD) and fused.defaults["fused"]
    # ready for a device-side skip at the first step: zero momentum, not empty_like's garbage
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in fused.state.values())
    plain = torch.optim.SGD(
        param_groups(plain_model, o.weight_decay, False), lr=lrs[0], momentum=0.9, nesterov=True
    )
    run_steps(fused_model, fused, lrs)
    run_steps(plain_model, plain, lrs)
    for a, b in zip(fused_model.state_dict().values(), plain_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def tiny_state(overrides):
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    ]
    model = nn.Sequential(
        OrderedDict(zip(["conv", "bn", "relu", "pool", "flatten", "fc"], layers, strict=True))
    )
    cfg = load_config(None, ["train.precision=fp32", "train.channels_last=false", *overrides])
    return make_state(model, resolve(cfg, 1, "cpu", batches_per_epoch=8), CPU)


@pytest.mark.parametrize("name", ["lamb", "rmsprop_tf", "lars"])
def test_a_timm_optimizer_skips_non_finite_steps_and_resumes_from_a_checkpoint_where_it_left_off(
    name, tmp_path
):
    """make_state builds optim.name; a NaN step changes nothing (skipped on the host: timm's optimizers
    take no found_inf); a state saved and loaded through a checkpoint file steps on exactly as if never
    interrupted (load_state_dict's restoring of SGD's `fused` flag does no harm here)."""
    overrides = [f"optim.name={name}", "optim.lr=0.01"]
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 6, 6, generator=generator), torch.tensor([0, 1, 2, 3])) for _ in range(4)]
    bad = (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long))
    straight = tiny_state(overrides)
    assert (
        type(straight.optimizer).__name__ == {"lamb": "Lamb", "rmsprop_tf": "RMSpropTF", "lars": "Lars"}[name]
    )
    train_step(straight, [batches[0]])
    skips_then_resumes_bitwise(straight, lambda: tiny_state(overrides), bad, batches[1:], tmp_path)


def skips_then_resumes_bitwise(straight, fresh, bad, batches, tmp_path) -> None:
    """A NaN step (`bad`) leaves `straight` as it was (but for the LR the schedule sets); `fresh()`
    loaded from `straight` saved to a checkpoint file then steps on `batches` bitwise as `straight`."""
    before = copy.deepcopy((straight.model.state_dict(), straight.optimizer.state_dict()))
    train_step(straight, [bad])
    assert int(straight.nonfinite_streak) == 1
    after = (straight.model.state_dict(), straight.optimizer.state_dict())
    for groups in (after[1]["param_groups"], before[1]["param_groups"]):
        for group in groups:
            del group["lr"]  # set by the schedule at every step, skipped or not
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    torch.save(straight.state_dict(), tmp_path / "ckpt.pt")
    resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True))
    assert [g.get("lr_mult") for g in resumed.optimizer.param_groups] == [
        g.get("lr_mult") for g in straight.optimizer.param_groups
    ]
    for batch in batches:
        train_step(straight, [batch])
        train_step(resumed, [batch])
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- losses


def logits_and_targets(classes=10, batch=6, lam=0.7):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=generator) * 3
    labels = torch.randint(0, classes, (batch,), generator=generator)
    # What MixUp/CutMix hand the loss: the mix of the two images' one-hot labels, not smoothed.
    one_hot = F.one_hot(labels, classes).float()
    mixed = lam * one_hot + (1 - lam) * one_hot.flip(0)
    return logits, labels, mixed


def smoothed(targets, smoothing):
    return targets * (1 - smoothing) + smoothing / targets.shape[1]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_is_timms_binary_cross_entropy_for_class_indices_and_the_mean_over_batch_and_classes(smoothing):
    logits, labels, _ = logits_and_targets()
    criterion = build_criterion(TrainConfig(loss="bce", label_smoothing=smoothing))
    loss = criterion(logits, labels)
    torch.testing.assert_close(loss, BinaryCrossEntropy(smoothing=smoothing)(logits, labels), rtol=0, atol=0)
    formula = F.binary_cross_entropy_with_logits(logits, smoothed(F.one_hot(labels, 10).float(), smoothing))
    torch.testing.assert_close(loss, formula)
    # Composer's binary_cross_entropy_with_logits (sum over classes, mean over the batch) is C times it.
    composer = F.binary_cross_entropy_with_logits(
        logits, smoothed(F.one_hot(labels, 10).float(), smoothing), reduction="sum"
    ) / len(labels)
    torch.testing.assert_close(composer, 10 * loss)


@pytest.mark.parametrize(("smoothing", "threshold"), [(0.1, 0.0), (0.0, 0.0), (0.1, 0.2)])
def test_bce_on_mixed_targets_is_timms_binary_cross_entropy_on_timms_mixup_targets(smoothing, threshold):
    """timm's Mixup smooths the labels it mixes, and its BinaryCrossEntropy takes soft targets as they
    come; ours smooths soft targets in the loss: the same numbers for the same mix."""
    lam = 0.7
    logits, labels, mixed = logits_and_targets(lam=lam)
    criterion = build_criterion(
        TrainConfig(loss="bce", label_smoothing=smoothing, bce_target_threshold=threshold)
    )
    timm_targets = mixup_target(labels, 10, lam=lam, smoothing=smoothing)
    timm_loss = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold or None)(
        logits, timm_targets
    )
    torch.testing.assert_close(criterion(logits, mixed), timm_loss)
    targets = smoothed(mixed, smoothing)
    if threshold:
        targets = (targets > threshold).float()
    torch.testing.assert_close(criterion(logits, mixed), F.binary_cross_entropy_with_logits(logits, targets))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_smooths_mixed_targets_as_timms_mixup_and_soft_target_cross_entropy(smoothing):
    lam = 0.7
    logits, labels, mixed = logits_and_targets(lam=lam)
    criterion = build_criterion(TrainConfig(loss="ce", label_smoothing=smoothing))
    formula = -(smoothed(mixed, smoothing) * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(criterion(logits, mixed), formula)
    timm_loss = SoftTargetCrossEntropy()(logits, mixup_target(labels, 10, lam=lam, smoothing=smoothing))
    torch.testing.assert_close(criterion(logits, mixed), timm_loss)
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(criterion(logits, labels), criterion(logits, one_hot))


def test_a_lamb_state_saved_with_the_decayed_group_first_resumes():
    """LAMB's groups take timm's order (no weight decay first); a state saved in the former order loads."""
    from imagenet_ddp.state import groups_in_our_order

    o = OptimConfig(name="lamb", weight_decay=0.02)
    model = small_model()
    groups = param_groups(model, o.weight_decay, o.wd_on_norm_and_bias)
    assert groups[0]["weight_decay"] > 0  # param_groups' own order: decayed first
    old = build_optimizer(groups, o, 0.01, "cpu").__class__(groups, lr=0.01, weight_decay=o.weight_decay)
    run_steps(model, old, [0.01])
    new = build_optimizer(param_groups(model, o.weight_decay, o.wd_on_norm_and_bias), o, 0.01, "cpu")
    assert new.param_groups[0]["weight_decay"] == 0
    new.load_state_dict(groups_in_our_order(old.state_dict(), new))
    for ours, theirs in zip(new.param_groups, reversed(old.param_groups), strict=True):
        assert all(a is b for a, b in zip(ours["params"], theirs["params"], strict=True))
        assert all(torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"]) for p in ours["params"])
