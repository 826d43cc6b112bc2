"""Optimizers and LR schedules, each selected by name from the config through one registry.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml \
        optim.name=lamb optim.lr=0.008 optim.weight_decay=0.02 optim.schedule=cosine

`optim.name`: sgd and adamw are torch's SGD (fused) and AdamW (fused on CUDA, foreach elsewhere); lamb,
rmsprop_tf and lars are timm's classes (`timm.optim.Lamb`, `RMSpropTF`, `Lars`) built with the arguments
`timm.optim.create_optimizer_v2` gives them. Parameter groups are timm's: no weight decay on norm layers,
biases and the names the model's adapter exempts (position embeddings, class tokens); with
`optim.layer_decay`, one group per (layer, decay or not) as `param_groups_layer_decay` makes them, each
with its LR multiplier (`lr_mult`) that train_step applies to the scheduled LR.
`optim.schedule`: cosine, linear (FFCV's triangular schedule) or step (timm's `StepLRScheduler`), all
after the same linear warmup. The LR is a pure function of the global step: resuming needs only the step.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Collection
from functools import partial

import torch
from torch import nn

from imagenet_ddp.config import Config, OptimConfig

# Devices where torch has a fused SGD kernel: one kernel for all parameters, and it skips a non-finite
# step on the device (found_inf). torch checks the device only at the first step.
FUSED_DEVICES = ("cuda", "cpu")
# AdamW is fused on CUDA only: on a CPU a skipped step costs no device sync anyway, and the foreach
# kernels are what timm's create_optimizer_v2 builds there (the step it is tested against).
ADAMW_FUSED_DEVICES = ("cuda",)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    decay_norm_and_bias: bool,
    head: nn.Module | None = None,
    backbone_lr_mult: float = 1.0,
    *,
    no_weight_decay: Collection[str] = (),
    layer_decay: float | None = None,
    layer_ids: tuple[dict[str, int], int] | None = None,
) -> list[dict]:
    """Weight decay on weights of convolutions and linear layers only: decaying BatchNorm scales and
    biases hurts accuracy (Goyal et al. 2017; NVIDIA's and timm's recipes); nor on the parameters named
    by `no_weight_decay` (fnmatch patterns, as timm matches a model's no_weight_decay()). With a
    backbone_lr_mult other than 1, the parameters outside `head` get that fraction of the LR
    (`lr_mult`). With layer_decay (and `layer_ids`, the adapter's (layer of each name, layers)):
    timm's param_groups_layer_decay groups, their lr_mult its lr_scale (times backbone_lr_mult)."""
    split = head is not None and backbone_lr_mult != 1.0
    in_head = {id(p) for p in head.parameters()} if split else set()
    if layer_decay is not None and layer_decay != 1.0:
        if layer_ids is None:
            raise ValueError("layer_decay needs layer_ids (the model adapter's layer_ids)")
        return _layer_decay_groups(
            model,
            weight_decay,
            decay_norm_and_bias,
            no_weight_decay,
            in_head,
            backbone_lr_mult if split else 1.0,
            layer_decay,
            layer_ids,
        )
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decayed = _decayed(name, p, decay_norm_and_bias, no_weight_decay)
            mult = 1.0 if not split or id(p) in in_head else backbone_lr_mult
            groups.setdefault((decayed, mult), []).append(p)
    order = [(True, 1.0), (False, 1.0), (True, backbone_lr_mult), (False, backbone_lr_mult)]
    return [
        {"params": groups.get(key, []), "weight_decay": weight_decay if key[0] else 0.0, "lr_mult": key[1]}
        for key in dict.fromkeys(order)
        if key in groups or key[1] == 1.0
    ]


def _decayed(name: str, p: nn.Parameter, decay_norm_and_bias: bool, no_weight_decay: Collection[str]) -> bool:
    return (p.ndim > 1 or decay_norm_and_bias) and not any(fnmatch.fnmatch(name, n) for n in no_weight_decay)


def _layer_decay_groups(
    model: nn.Module,
    weight_decay: float,
    decay_norm_and_bias: bool,
    no_weight_decay: Collection[str],
    in_head: set[int],
    backbone_lr_mult: float,
    layer_decay: float,
    layer_ids: tuple[dict[str, int], int],
) -> list[dict]:
    """One group per (layer, decayed), in the order their first parameters come: timm's groups and
    order. Outside the head, backbone_lr_mult multiplies the layer's scale (its own groups then)."""
    ids, num_layers = layer_ids
    groups: dict[tuple[int, bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = ids.get(name, num_layers - 1)  # timm's: a name its grouping misses goes with the head
        decayed = _decayed(name, p, decay_norm_and_bias, no_weight_decay)
        mult = 1.0 if not in_head or id(p) in in_head else backbone_lr_mult
        key = (layer, decayed, mult)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer)
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr_mult": scale * mult,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def layer_decay_on(o: OptimConfig) -> bool:
    return o.layer_decay is not None and o.layer_decay != 1.0


def model_param_groups(
    model: nn.Module, o: OptimConfig, adapter, head: nn.Module | None = None
) -> list[dict]:
    """param_groups of `model` as `o` asks, with what its family's adapter (models.adapter_for) knows:
    the names exempt from weight decay, and each parameter's layer when layer decay is on."""
    return param_groups(
        model,
        o.weight_decay,
        o.wd_on_norm_and_bias,
        head,
        o.backbone_lr_mult,
        no_weight_decay=adapter.no_weight_decay(model),
        layer_decay=o.layer_decay,
        layer_ids=adapter.layer_ids(model) if layer_decay_on(o) else None,
    )


# ------------------------------------------------------------------------------------------ optimizers


def _sgd(groups: list[dict], o: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(
        groups,
        lr=lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        fused=device.type in FUSED_DEVICES,
    )
    ready_for_device_skips(optimizer)
    return optimizer


def _adamw(groups: list[dict], o: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Fused: one kernel for all parameters, skipping a non-finite step on the device (found_inf, as
    # GradScaler passes it); foreach: a few multi-tensor kernels, the step decided on the host.
    fused = device.type in ADAMW_FUSED_DEVICES
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=tuple(o.betas),
        eps=1e-8 if o.eps is None else o.eps,
        weight_decay=o.weight_decay,
        **({"fused": True} if fused else {"foreach": True}),
    )


# timm's optimizers take no found_inf: a step they must skip is decided on the host (engine._step_unless
# reads the flag, one sync per step; GradScaler does the same for fp16). None of them has a fused kernel.
# eps is passed only when set: None keeps each class's own default (Lamb 1e-6, RMSpropTF 1e-10, Lars 1e-8).


def _eps(o: OptimConfig) -> dict:
    return {} if o.eps is None else {"eps": o.eps}


def _lamb(groups: list[dict], o: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    from timm.optim import Lamb

    # timm's defaults kept as create_optimizer_v2 keeps them: Adam-style bias correction, and the
    # gradients clipped to a global norm of 1 inside the step (max_grad_norm), on top of train.grad_clip.
    # That norm sums over every group in turn: the groups go in timm's order (no weight decay first,
    # param_groups_weight_decay's), or the float32 sum rounds otherwise and the steps drift apart.
    # With layer decay the groups already are in timm's order (param_groups_layer_decay's).
    if not layer_decay_on(o):
        groups = sorted(groups, key=lambda group: group["weight_decay"] != 0)  # stable: lr_mult order kept
    return Lamb(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **_eps(o))


def _rmsprop_tf(groups: list[dict], o: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    from timm.optim import RMSpropTF

    return RMSpropTF(
        groups, lr=lr, alpha=o.rmsprop_alpha, momentum=o.momentum, weight_decay=o.weight_decay, **_eps(o)
    )


def _lars(groups: list[dict], o: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    from timm.optim import Lars

    # timm's Lars adapts the LR (trust ratio) only of parameters with weight decay: with
    # wd_on_norm_and_bias false, BatchNorm and biases step as with plain SGD (timm's `lars`/`nlars`).
    return Lars(
        groups,
        lr=lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        trust_coeff=o.lars_trust_coeff,
        **_eps(o),
    )


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig, float, torch.device], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
    "lamb": _lamb,
    "rmsprop_tf": _rmsprop_tf,
    "lars": _lars,
}


def build_optimizer(
    groups: list[dict], o: OptimConfig, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer `o.name` over `groups` (param_groups: each group's weight_decay is kept), at `lr`."""
    return OPTIMIZERS[o.name](groups, o, lr, torch.device(device))


def ready_for_device_skips(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers where a fused SGD has none yet. torch's fused SGD makes them with
    empty_like at its first step, even when that step is skipped (found_inf): the next step then
    reads garbage. Zeros give the same first step (buf = 0.9 * 0 + grad = grad, bitwise).
    Nothing to do for the others: fused AdamW makes zeroed state and takes back a skipped step's
    count; the rest are never told to skip on the device."""
    if not optimizer.defaults.get("fused") or not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


# ------------------------------------------------------------------------------------------- schedules


def _warmup(step: int, base_lr: float, warmup_steps: int, warmup_start_factor: float) -> float:
    return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.1,
    min_lr_factor: float = 0.0,
    warmup_overlaps_decay: bool = False,
) -> float:
    """Linear warmup from warmup_start_factor * base_lr, then cosine down to min_lr_factor * base_lr.
    The cosine spans the steps after warmup; with warmup_overlaps_decay it spans the whole run and the
    warmup stands in for its first steps (timm's CosineLRScheduler, warmup_prefix=False)."""
    if step < warmup_steps:
        return _warmup(step, base_lr, warmup_steps, warmup_start_factor)
    progress = _decay_progress(step, total_steps, warmup_steps, warmup_overlaps_decay)
    return base_lr * (min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _decay_progress(step: int, total_steps: int, warmup_steps: int, warmup_overlaps_decay: bool) -> float:
    start = 0 if warmup_overlaps_decay else warmup_steps
    return min(1.0, (step - start) / max(1, total_steps - start))


def linear_lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.1,
    min_lr_factor: float = 0.0,
    warmup_overlaps_decay: bool = False,
) -> float:
    """Linear warmup, then linear down to min_lr_factor * base_lr at the last step: FFCV's triangular
    schedule, np.interp(epoch, [0, warmup_epochs, epochs], [start * lr, lr, min * lr]) at the step's
    fractional epoch (FFCV interpolates within each epoch between the values at its two ends)."""
    if step < warmup_steps:
        return _warmup(step, base_lr, warmup_steps, warmup_start_factor)
    progress = _decay_progress(step, total_steps, warmup_steps, warmup_overlaps_decay)
    return base_lr * (1 - (1 - min_lr_factor) * progress)


def step_lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    steps_per_epoch: int,
    warmup_start_factor: float = 0.1,
    step_epochs: float = 30.0,
    step_gamma: float = 0.1,
) -> float:
    """Linear warmup, then base_lr * step_gamma ** (epoch // step_epochs), `epoch` the index of the
    step's epoch: timm's StepLRScheduler as timm's train.py uses it (stepped once per epoch with the
    epoch index, decay counted from epoch 0: warmup_prefix=False). After warmup this is timm's value at
    every step, so the decays fall on the same epoch boundaries, also for a step_epochs that is not a
    whole number (timm's 2.5 decays at the start of epochs 3, 5, 8, ...). The warmup rises every step
    rather than once per epoch; it equals timm's value at each epoch's first step."""
    if step < warmup_steps:
        return _warmup(step, base_lr, warmup_steps, warmup_start_factor)
    epoch = step // max(1, steps_per_epoch)
    return base_lr * step_gamma ** (epoch // step_epochs)


def _decay_to_min(shape: Callable[..., float]) -> Callable[[Config], Callable[[int], float]]:
    """A schedule that warms up, then decays to min_lr_factor * lr over the run by `shape`."""

    def build(cfg: Config) -> Callable[[int], float]:
        o, d = cfg.optim, cfg.derived
        return partial(
            shape,
            base_lr=d.lr,
            total_steps=d.total_steps,
            warmup_steps=d.warmup_steps,
            warmup_start_factor=o.warmup_start_factor,
            min_lr_factor=o.min_lr_factor,
            warmup_overlaps_decay=o.warmup_overlaps_decay,
        )

    return build


def _step(cfg: Config) -> Callable[[int], float]:
    o, d = cfg.optim, cfg.derived
    return partial(
        step_lr_at,
        base_lr=d.lr,
        warmup_steps=d.warmup_steps,
        steps_per_epoch=d.steps_per_epoch,
        warmup_start_factor=o.warmup_start_factor,
        step_epochs=o.step_epochs,
        step_gamma=o.step_gamma,
    )


SCHEDULES: dict[str, Callable[[Config], Callable[[int], float]]] = {
    "cosine": _decay_to_min(lr_at),
    "linear": _decay_to_min(linear_lr_at),
    "step": _step,
}


def lr_schedule(cfg: Config) -> Callable[[int], float]:
    """step -> LR of `cfg` (resolved: cfg.derived holds the scaled LR and the step counts)."""
    return SCHEDULES[cfg.optim.schedule](cfg)
