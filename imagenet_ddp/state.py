"""The training state: the model moved, wrapped and equipped for training as a recipe says (optimizer,
GradScaler, EMA, batch augmentation), and what of it a checkpoint stores.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml

train_ddp.py builds one TrainState with make_state; the loops of engine.py advance it step by step.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from imagenet_ddp.checkpoint import rng_state, set_rng_state, unwrap
from imagenet_ddp.config import Config
from imagenet_ddp.data.mixing import BatchAugment
from imagenet_ddp.dist import DistEnv, sum_gradients_in_rank_order
from imagenet_ddp.finetune import freeze, head_name
from imagenet_ddp.losses import build_criterion
from imagenet_ddp.models import adapter_for, deterministic_pooling
from imagenet_ddp.optim import build_optimizer, lr_schedule, model_param_groups, ready_for_device_skips

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Ema:
    """Exponential moving average of a model's weights and buffers, updated after each optimizer step.

    The pairs of tensors are listed once: rebuilding both state dicts every step costs host time
    that a GPU step does not have to spare."""

    def __init__(self, model: nn.Module, decay: float):
        source = unwrap(model)
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self.decay = decay
        ema, current = self.module.state_dict(), source.state_dict()
        floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
        self._ema, self._current = [ema[k] for k in floats], [current[k] for k in floats]
        counters = [k for k, v in ema.items() if not v.dtype.is_floating_point]
        self._ema_counters, self._counters = [ema[k] for k in counters], [current[k] for k in counters]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """Move towards the model's weights by 1 - decay; not at all where `skipped` (a device bool,
        so that a skipped step costs no host sync)."""
        if skipped is None:
            torch._foreach_lerp_(self._ema, self._current, 1.0 - self.decay)
        elif self._ema:
            # lerp takes its weight as a Python number (a tensor would be read: a sync): by hand.
            weight = (~skipped).to(self._ema[0].dtype) * (1.0 - self.decay)
            delta = torch._foreach_sub(self._current, self._ema)
            torch._foreach_mul_(delta, weight)
            torch._foreach_add_(self._ema, delta)
        if self._counters:  # BatchNorm's num_batches_tracked: copied, in one multi-tensor op
            torch._foreach_copy_(self._ema_counters, self._counters)


class BufferGuard:
    """The model's buffers (BatchNorm running statistics) as they were before a step, put back when the
    step is skipped: a batch with NaN/Inf has already moved them in its forward pass, and skipping the
    weight update alone would leave every later evaluation poisoned.

    The buffers of each dtype are saved side by side in one flat tensor, so that putting them back is
    three multi-tensor ops per dtype (gather, select, scatter), not a `where` and a `copy_` per buffer
    (318 for a ResNet-50, each a launch on the GPU). A select, not arithmetic: the NaN of a poisoned
    statistic must not reach the result, and the restored values must be bitwise the saved ones."""

    def __init__(self, model: nn.Module):
        self.buffers = list(unwrap(model).buffers())
        # One list per dtype: a multi-tensor op over mixed dtypes (float statistics, int64 counters)
        # falls back on the GPU to a launch per tensor.
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buffer in self.buffers:
            by_kind.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        self._groups = [_FlatGroup(buffers) for buffers in by_kind.values()]
        self.save()

    @torch.no_grad()
    def save(self) -> None:
        for group in self._groups:
            torch._foreach_copy_(group.saved_views, group.buffers)

    @torch.no_grad()
    def restore_where(self, skipped: torch.Tensor) -> None:
        """Buffers back to the saved ones if `skipped` (a device bool): no host sync."""
        for group in self._groups:
            torch._foreach_copy_(group.current_views, group.buffers)
            torch.where(skipped, group.saved, group.current, out=group.current)
            torch._foreach_copy_(group.buffers, group.current_views)


class _FlatGroup:
    """Buffers of one dtype and device, and two flat tensors holding a copy of each (saved, current),
    with a view of each shaped as its buffer."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers
        numel = sum(b.numel() for b in buffers)
        self.saved = torch.empty(numel, dtype=buffers[0].dtype, device=buffers[0].device)
        self.current = torch.empty_like(self.saved)
        self.saved_views, self.current_views = _views(self.saved, buffers), _views(self.current, buffers)


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    views = flat.split([t.numel() for t in like])
    return [view.view(t.shape) for view, t in zip(views, like, strict=True)]


@dataclass
class TrainState:
    """What train_step needs and what a checkpoint stores (`state_dict`)."""

    model: nn.Module  # as trained: wrapped in DDP and torch.compile when those are on
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Callable[[int], float]  # step -> lr
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool = False
    grad_clip: float = 0.0
    ema: Ema | None = None
    buffers: BufferGuard | None = None  # put back after a skipped step
    frozen_norms: list[nn.Module] = field(default_factory=list)  # stay in eval mode (model.freeze)
    batch_aug: BatchAugment | None = None  # random erasing, MixUp, CutMix on each train batch
    eval_flip: bool = False  # evaluate averages the logits of each image and its mirror
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of `epoch` consumed: the loader position
    best_val_top1: float = -1.0
    # Device tensors, read only at poll points: consecutive skipped steps now, and the longest run of
    # them since the last poll (a streak that recovered between two polls still counts).
    nonfinite_streak: torch.Tensor | None = None
    longest_streak: torch.Tensor | None = None
    epoch_totals: torch.Tensor | None = None  # this rank's [loss sum, correct, samples] of the epoch so far

    def __post_init__(self):
        self.set_streak(0)

    def set_streak(self, value: int) -> None:
        self.nonfinite_streak = torch.tensor(value, device=self.device)
        self.longest_streak = self.nonfinite_streak.clone()

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **{k: getattr(self, k) for k in _COUNTERS},
            "nonfinite_streak": int(self.nonfinite_streak),
            "nonfinite_longest": int(self.longest_streak),  # since the last poll
        }

    def load_state_dict(self, ckpt: dict) -> None:
        unwrap(self.model).load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"] or ckpt["model"])
        self.optimizer.load_state_dict(groups_in_our_order(ckpt["optimizer"], self.optimizer))
        # The saved groups replace ours, flags included: an optimizer saved unfused (an older run,
        # another device) must still step the way this one was built to (timm's have no such flag).
        for flag in ("fused", "foreach"):
            if flag in self.optimizer.defaults:
                for group in self.optimizer.param_groups:
                    group[flag] = self.optimizer.defaults[flag]
        ready_for_device_skips(self.optimizer)
        # A saved scale means something only to fp16 from fp16. precision=auto differs between GPU
        # generations (bf16 on an A100, fp16 on a V100): a bf16 or fp32 run saved a disabled scaler's
        # empty state, and an fp16 run resuming from it starts with a fresh scaler.
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        for k in _COUNTERS:
            setattr(self, k, ckpt[k])
        self.set_streak(ckpt["nonfinite_streak"])
        self.longest_streak.fill_(max(ckpt["nonfinite_streak"], ckpt.get("nonfinite_longest", 0)))

    def load_checkpoint(self, ckpt: dict, rank: int, world_size: int, train_loader) -> None:
        """Everything a resumed rank needs from `ckpt`: the shared state, and this rank's RNG streams,
        epoch totals and train loader position when it was saved by as many ranks."""
        self.load_state_dict(ckpt)
        if len(ckpt["ranks"]) != world_size:  # the data is split otherwise: the epoch starts over
            self.batch_in_epoch = 0
            return
        self.load_rank_state(ckpt["ranks"][rank])
        train_loader.load_state_dict(ckpt["ranks"][rank].get("loader") or {})

    def rank_state(self) -> dict:
        """What differs between ranks: RNG streams and the running epoch totals."""
        totals = self.epoch_totals.tolist() if self.epoch_totals is not None else [0.0, 0.0, 0.0]
        return {"rng": rng_state(self.device), "epoch_totals": totals}

    def load_rank_state(self, saved: dict) -> None:
        set_rng_state(saved["rng"], self.device)
        self.epoch_totals = torch.tensor(saved["epoch_totals"], device=self.device)


_COUNTERS = ("step", "epoch", "batch_in_epoch", "best_val_top1")


def groups_in_our_order(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state saved with its groups in another order (LAMB's before its groups took timm's
    order, no weight decay first) put in this optimizer's order; any other state as it is."""
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in saved["param_groups"]] == sizes:
        return saved
    reordered = sorted(saved["param_groups"], key=lambda group: group["weight_decay"] != 0)
    if [len(g["params"]) for g in reordered] != sizes:
        return saved  # torch's own error names the mismatch
    return {**saved, "param_groups": reordered}


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    # Each rank its own stream (dropout, stochastic depth); the same across restarts.
    torch.manual_seed(seed * 1000 + rank)
    random.seed(seed * 1000 + rank)
    if deterministic:
        # cuBLAS reads this when its first handle is made: set before any matmul on the GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic CUDA kernel warns, naming itself, instead of ending
        # the run at its first backward. The one such op of torchvision's ResNets and EfficientNets,
        # AdaptiveAvgPool2d's backward, is replaced (models.deterministic_pooling).
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def make_state(model: nn.Module, cfg: Config, env: DistEnv) -> TrainState:
    """Move, wrap and equip `model` for training as `cfg` (resolved) says."""
    t, o, d = cfg.train, cfg.optim, cfg.derived
    if t.deterministic:
        deterministic_pooling(model)
    frozen_norms = freeze(model, cfg.model.name, cfg.model.freeze)  # before DDP: it skips frozen ones
    # channels_last where the model gains from it: not ViTs (their one convolution embeds patches).
    channels_last = t.channels_last and adapter_for(cfg.model.name).channels_last(model)
    model = model.to(
        env.device, memory_format=torch.channels_last if channels_last else torch.preserve_format
    )
    # SGD is fused: one kernel for all parameters, and it skips a non-finite step on the device. The
    # other optimizers (timm's) skip on the host: one sync per step (engine._step_unless).
    head = model.get_submodule(head_name(cfg.model.name, model)) if o.backbone_lr_mult != 1.0 else None
    groups = model_param_groups(model, o, adapter_for(cfg.model.name), head)
    optimizer = build_optimizer(groups, o, d.lr, env.device)
    if env.world_size > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if t.deterministic:
            sum_gradients_in_rank_order(model)  # a resumed run sums as the uninterrupted one did
    # After DDP, which gave every rank rank 0's initial weights: the EMA starts from those.
    ema = Ema(model, d.ema_decay) if t.ema_decay > 0 else None
    if t.compile:
        model = torch.compile(model)
    return TrainState(
        model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(env.device.type, enabled=d.precision == "fp16"),
        schedule=lr_schedule(cfg),
        criterion=build_criterion(t),
        device=env.device,
        amp_dtype=AMP_DTYPES[d.precision],
        channels_last=channels_last,
        grad_clip=t.grad_clip,
        ema=ema,
        buffers=BufferGuard(model),
        frozen_norms=frozen_norms,
        batch_aug=batch_augment(cfg, env.rank, unwrap(model)),
        eval_flip=t.eval_flip,
    )


def batch_augment(cfg: Config, rank: int, model: nn.Module) -> BatchAugment | None:
    """The train batch's random erasing, MixUp and CutMix as `cfg` asks, or None for none of them."""
    t = cfg.train
    mixing = t.mixup_alpha > 0 or t.cutmix_alpha > 0
    num_classes = model.get_submodule(head_name(cfg.model.name, model)).out_features if mixing else 0
    augment = BatchAugment(
        random_erase=cfg.data.random_erase,
        mixup_alpha=t.mixup_alpha,
        cutmix_alpha=t.cutmix_alpha,
        switch_prob=t.mix_switch_prob,
        num_classes=num_classes,
        seed=t.seed,
        rank=rank,
    )
    return augment if augment.active else None
