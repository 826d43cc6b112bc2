"""The training and evaluation loops: train_step, train_one_epoch, evaluate.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml

The loops advance a TrainState (state.py builds it) and see only `(images, labels)` batches already on
the device; what the data backend is does not matter here. The LR is a pure function of the global
step, so resuming needs only the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from imagenet_ddp.checkpoint import unwrap
from imagenet_ddp.config import Config
from imagenet_ddp.data.mixing import hard_labels
from imagenet_ddp.data.presets import train_size
from imagenet_ddp.dist import StopSignal, all_reduce_sum, broadcast_buffers
from imagenet_ddp.errors import UserError
from imagenet_ddp.state import TrainState


class NonFiniteError(UserError):
    """Too many consecutive steps with NaN/Inf gradients: training on would only produce garbage."""


def _autocast(state: TrainState):
    # The one AMP path: disabled autocast and a disabled GradScaler are exact fp32 training.
    dtype = state.amp_dtype or torch.bfloat16
    return torch.autocast(state.device.type, dtype=dtype, enabled=state.amp_dtype is not None)


def _inputs(state: TrainState, images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if state.channels_last else images


def train_step(state: TrainState, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One optimizer step over `batches` (grad_accum micro-batches). Returns a device tensor
    [loss sum, correct, samples] of this rank; reading it is left to the caller (a sync)."""
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    for group in optimizer.param_groups:
        group["lr"] = state.schedule(state.step) * group.get("lr_mult", 1.0)
    if state.buffers is not None:
        state.buffers.save()
    totals = torch.zeros(3, device=state.device)
    for i, (images, labels) in enumerate(batches):
        if state.batch_aug is not None:  # targets: labels, or soft [B, C] after MixUp/CutMix
            images, targets = state.batch_aug(images, labels, state.epoch, state.batch_in_epoch + i)
        else:
            targets = labels
        # DDP all-reduces gradients in the last micro-batch's backward only.
        last = i == len(batches) - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync(), _autocast(state):
            logits = model(_inputs(state, images))
            loss = state.criterion(logits, targets)
        scaler.scale(loss / len(batches)).backward()
        totals[0] += loss.detach().float() * len(labels)
        totals[1] += (logits.argmax(1) == hard_labels(targets)).sum()
        totals[2] += len(labels)
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip or math.inf)
    # The norm of the all-reduced gradients is the same on every rank, so all ranks skip together,
    # and the decision stays on the device: the host does not wait for the step to finish.
    skipped = ~torch.isfinite(grad_norm)
    _step_unless(optimizer, scaler, skipped)
    optimizer.zero_grad(set_to_none=True)
    if state.buffers is not None:
        state.buffers.restore_where(skipped)
    if state.ema is not None:
        state.ema.update(skipped)
    state.step += 1
    state.nonfinite_streak = (state.nonfinite_streak + 1) * skipped
    state.longest_streak = torch.maximum(state.longest_streak, state.nonfinite_streak)
    return totals


def _step_unless(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skipped: torch.Tensor
) -> None:
    """optimizer.step() unless `skipped` (a device bool). Fused optimizers take the flag on the device,
    as GradScaler hands it to them for fp16; others need it read on the host, one sync per step."""
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips a step whose gradients overflowed (GradScaler's own found_inf)
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skipped.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skipped):
        optimizer.step()
    scaler.update()


def train_one_epoch(
    state: TrainState, loader, cfg: Config, tracker, stop: StopSignal, save: Callable[[], None]
) -> dict:
    """Train on the rest of epoch `state.epoch` (all of it unless resumed mid-epoch). Returns the epoch's
    train metrics over all ranks, with `stopped` True when a stop signal ended it early.
    `save()` is called every run.checkpoint_every steps."""
    accum, log_every, every = cfg.train.grad_accum, cfg.logging.log_every, cfg.run.checkpoint_every
    poll_every = cfg.run.poll_every
    global_batch = cfg.derived.global_batch_size
    state.model.train()
    for norm in state.frozen_norms:
        norm.eval()  # a frozen stage keeps the statistics it was loaded with
    steps = len(loader) // accum
    # Stopped after the epoch's last step (before validation): nothing to read. Stopped mid-epoch:
    # the loader continues the epoch's order after the batches already trained on.
    remaining = state.batch_in_epoch // accum < steps
    batches = loader.iter_from(state.batch_in_epoch) if remaining else iter(())
    if remaining and state.batch_in_epoch:
        how = "from the loader's saved state" if loader.restored else "replaying the batches before it"
        tracker.info(f"epoch {state.epoch + 1}: continuing at batch {state.batch_in_epoch}, {how}")
    tracker.start_epoch(state.epoch, steps, done=state.batch_in_epoch // accum)
    if state.batch_in_epoch == 0 or state.epoch_totals is None:
        state.epoch_totals = torch.zeros(3, device=state.device)
    totals = state.epoch_totals  # updated in place: a checkpoint taken mid-epoch carries them
    start = last_log = time.perf_counter()
    steps_done = last_log_step = 0
    stopped = False
    while state.batch_in_epoch // accum < steps:
        totals += train_step(state, [next(batches) for _ in range(accum)])
        state.batch_in_epoch += accum
        steps_done += 1
        # Polls cost a host sync (and the stop flag a collective): every run.poll_every steps, the
        # same steps on every rank, never every step.
        poll = state.step % poll_every == 0
        if poll:
            check_nonfinite(state, cfg.train.max_nonfinite_steps)
        tracker.advance()
        if state.step % log_every == 0:
            now = time.perf_counter()  # reading the loss syncs with the device: only every log_every steps
            loss = (totals[0] / totals[2].clamp(min=1)).item()
            rate = (steps_done - last_log_step) * global_batch / (now - last_log)
            tracker.log_step(
                state.step,
                {
                    "train/loss": loss,
                    "train/lr": state.schedule(state.step - 1),
                    "train/images_per_sec": rate,
                },
            )
            last_log, last_log_step = now, steps_done
        if every and state.step % every == 0 and state.batch_in_epoch // accum < steps:
            save()  # (at the epoch's end the caller saves, with the validation metrics)
        if poll and stop.requested(state.device):
            stopped = True
            break
    check_nonfinite(state, cfg.train.max_nonfinite_steps)
    seconds = time.perf_counter() - start
    if not stopped:  # the pass is over (batches beyond the last accumulation group are left):
        loader.end_pass()  # its workers or pipeline go before validation; a stopped pass is saved first
    loss, correct, count = all_reduce_sum(totals.clone()).tolist()
    tracker.end_epoch()
    return {
        "train_loss": loss / max(count, 1),
        "train_top1": correct / max(count, 1),
        "lr": state.schedule(state.step - 1),
        "images_per_sec": steps_done * global_batch / max(seconds, 1e-9),
        "epoch_seconds": seconds,
        "train_size": train_size(cfg.data, state.epoch),  # the train crop side (progressive resizing)
        "stopped": stopped,
    }


def check_nonfinite(state: TrainState, limit: int) -> None:
    """NonFiniteError when `limit` consecutive steps had NaN/Inf gradients (reads the device: a sync)."""
    longest = int(state.longest_streak)
    state.longest_streak = state.nonfinite_streak.clone()
    if longest >= limit:
        raise NonFiniteError(
            f"{longest} consecutive steps with NaN/Inf gradients (up to step {state.step}); the weights "
            "and BatchNorm statistics were not updated by them. Lower optim.lr, set train.grad_clip, or use bf16/fp32"
        )


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader, state: TrainState, real: dict | None = None) -> dict:
    """Exact top-1/top-5 of each model over the whole split, in one pass over it: every rank sums its
    own samples, then one all-reduce. Keys: val_count, and val_loss, val_top1, val_top5 with the
    model's name as a suffix ("": none; "ema": val_top1_ema, ...). Samples a loader pads to even out
    ranks carry a negative label (PAD_LABEL) and are not counted.

    `real`: the split's ReaL sets ({"sets": one list of class indices per sample in manifest order,
    "first": this rank's first sample}, see evaluate.real_of): adds val_real_count and val_real_top1
    (a prediction in the image's set; images with an empty set not counted)."""
    # The unwrapped modules: no DDP forward and so no collective per batch. Their BatchNorm statistics
    # moved with each rank's last batch: every rank evaluates rank 0's, the ones a checkpoint holds.
    models = {name: unwrap(model) for name, model in models.items()}
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        broadcast_buffers(model)
        model.eval()
    # Per model: loss sum, top-1, top-5, count, ReaL hits, ReaL count.
    totals = torch.zeros(len(models), 6, dtype=torch.float64, device=state.device)
    position = real["first"] if real else 0
    for images, labels in loader:
        images = _inputs(state, images)
        valid = labels >= 0
        labels = labels[valid]
        if real:  # each sample's position in the split: a sync per batch, with ReaL labels only
            sets = real["sets"][position : position + len(labels)]
            position += len(sets)
        for row, model in zip(totals, models.values(), strict=True):
            with _autocast(state):
                logits = model(images).float()
                if state.eval_flip:  # FFCV's lr_tta
                    logits = (logits + model(images.flip(3)).float()) / 2
            logits = logits[valid]
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            row[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            row[1] += hits[:, 0].sum()
            row[2] += hits.any(1).sum()
            row[3] += len(labels)
            if real:
                predicted = logits.argmax(1).tolist()
                row[4] += sum(p in s for p, s in zip(predicted, sets, strict=True))
                row[5] += sum(1 for s in sets if s)
    all_reduce_sum(totals)
    result = {}
    for (name, model), (loss, top1, top5, count, real_hits, real_count) in zip(
        models.items(), totals.tolist(), strict=True
    ):
        result["val_count"] = int(count)  # the same for every model
        if real:
            suffix = f"_{name}" if name else ""
            result["val_real_count"] = int(real_count)
            result[f"val_real_top1{suffix}"] = real_hits / max(real_count, 1)
        model.train(was_training[name])
        n, suffix = max(count, 1), f"_{name}" if name else ""
        result.update(
            {
                f"val_loss{suffix}": loss / n,
                f"val_top1{suffix}": top1 / n,
                f"val_top5{suffix}": top5 / n,
            }
        )
    return result
