"""Build an image classifier by name: every torchvision classifier and every timm model
(`timm/<name>`), randomly initialised, with the regularisers recipes ask for.

    from imagenet_ddp.models import build_model, adapter_for
    model = build_model("resnet50", num_classes=1000)
    model = build_model("resnet18", num_classes=200, small_input=True)   # 64 px Tiny ImageNet
    model = build_model("resnet50", num_classes=1000, blurpool=True, drop_path=0.05, dropout=0.1)
    model = build_model("timm/vit_small_patch16_224", num_classes=1000, drop_path=0.1)
    adapter_for("timm/vit_small_patch16_224").defaults("timm/vit_small_patch16_224")  # 224, bicubic, 0.9

A checkpoint stores `architecture(...)`'s dict, so `build_model(**ckpt["architecture"])` rebuilds the
same network without the training config. Every variant has its library's state_dict keys and shapes:
pretrained weights, model.init_from, the EMA and the ONNX export see the plain network. What differs
between model families (defaults, freeze points, layer ids, no-weight-decay names, the head) is asked
of `adapter_for(name)` (models/adapter.py), never of the name. Knows nothing about ranks or devices.
"""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

from imagenet_ddp.errors import UserError
from imagenet_ddp.models.adapter import Adapter
from imagenet_ddp.models.efficientnet import DEFAULT_DROPOUT, EFFICIENTNETS, EfficientNetAdapter
from imagenet_ddp.models.layers import BlurPoolConv2d, GlobalAvgPool, apply_blurpool, deterministic_pooling
from imagenet_ddp.models.resnet import CONV_INITS, RESNET_KIN, RESNETS, ResNetAdapter
from imagenet_ddp.models.timm_zoo import PREFIX as TIMM_PREFIX
from imagenet_ddp.models.timm_zoo import TimmAdapter
from imagenet_ddp.models.torchvision_zoo import TorchvisionAdapter

__all__ = [
    "CONV_INITS",
    "DEFAULT_DROPOUT",
    "EFFICIENTNETS",
    "RESNETS",
    "TIMM_PREFIX",
    "Adapter",
    "BlurPoolConv2d",
    "GlobalAvgPool",
    "adapter_for",
    "apply_blurpool",
    "architecture",
    "build_model",
    "deterministic_pooling",
    "skeleton",
]

_RESNET, _EFFICIENTNET = ResNetAdapter(), EfficientNetAdapter()
_TORCHVISION, _TIMM = TorchvisionAdapter(), TimmAdapter()
# Variants only some families take: (key, its default, the families that take it).
_ONLY = {
    "blurpool": (False, (_RESNET,)),
    "small_input": (False, (_RESNET, _EFFICIENTNET)),
    "conv_init": ("fan_out", (_RESNET,)),
}


def adapter_for(name: str) -> Adapter:
    """The adapter of model.name `name`'s family; a one-line UserError with the closest names."""
    if name in RESNETS or name in RESNET_KIN:
        return _RESNET
    if name in EFFICIENTNETS:
        return _EFFICIENTNET
    if name.startswith(TIMM_PREFIX) and _TIMM.knows(name):
        return _TIMM
    if name in _torchvision_names():
        return _TORCHVISION
    close = difflib.get_close_matches(name, [*_torchvision_names(), *_timm_names()], n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise UserError(
        f"unknown model.name {name!r}{hint}: a torchvision.models name (e.g. resnet50, convnext_tiny) "
        "or timm/<a timm.list_models() name> (e.g. timm/vit_small_patch16_224)"
    )


def architecture(
    name: str,
    num_classes: int,
    small_input: bool = False,
    zero_init_residual: bool = True,
    blurpool: bool = False,
    drop_path: float | None = None,
    dropout: float | None = None,
    conv_init: str = "fan_out",
    kwargs: dict | None = None,
    img_size: int | None = None,
):
    """The keyword arguments of build_model, validated, rates resolved: what a checkpoint records.

    The keys after dropout appear only when set (conv_init="fan_in", kwargs, img_size), so a dict
    of an older checkpoint, without the later keys, comes back as the plain network's."""
    adapter = adapter_for(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    asked = {"blurpool": blurpool, "small_input": small_input, "conv_init": conv_init}
    for key, (default, families) in _ONLY.items():
        if asked[key] != default and adapter not in families:
            which = (
                ", ".join(RESNETS) if families == (_RESNET,) else "torchvision's ResNets and EfficientNets"
            )
            raise UserError(f"model.{key} is for ResNets ({which}), not {name}")
    for key, rate in (("drop_path", drop_path), ("dropout", dropout)):
        if rate is not None and not 0 <= rate < 1:
            raise UserError(f"model.{key} must be in [0, 1), got {rate}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UserError(f"model.kwargs must be a mapping of keyword arguments, got {kwargs!r}")
    arch = {
        "name": name,
        "num_classes": num_classes,
        "small_input": bool(small_input),
        "zero_init_residual": bool(zero_init_residual) and adapter is _RESNET,
        "blurpool": bool(blurpool),
        "drop_path": drop_path,
        "dropout": dropout,
    }
    arch.update({"conv_init": conv_init} if conv_init != "fan_out" else {})
    arch.update({"kwargs": dict(kwargs)} if kwargs else {})
    arch.update({"img_size": int(img_size)} if img_size else {})
    return adapter.resolve(arch)


def build_model(name: str, num_classes: int, **variants) -> nn.Module:
    """The randomly initialised network of architecture(name, num_classes, **variants)."""
    arch = architecture(name, num_classes, **variants)
    return adapter_for(arch["name"]).build(arch)


def model_architecture(model_cfg, num_classes: int, image_size: int, eval_size: int | None = None) -> dict:
    """architecture() of a config's `model` section for data.image_size: a network built for one input
    size (ViTs) is built for `image_size` when that is not its default, and evaluated at it too."""
    m = model_cfg
    adapter = adapter_for(m.name)
    img_size = None
    if adapter.fixed_input_size(m.name):
        if eval_size is not None and eval_size != image_size:
            raise UserError(
                f"{m.name} takes one input size: data.eval_size={eval_size} must equal data.image_size={image_size}"
            )
        img_size = image_size if image_size != adapter.defaults(m.name)["input_size"] else None
    return architecture(
        m.name,
        num_classes,
        small_input=m.small_input,
        zero_init_residual=m.zero_init_residual,
        blurpool=m.blurpool,
        drop_path=m.drop_path,
        dropout=m.dropout,
        conv_init=m.conv_init,
        kwargs=m.kwargs,
        img_size=img_size,
    )


def skeleton(**arch) -> nn.Module:
    """build_model's network without its memory or initialisation where the builder allows (meta
    tensors): for asking about layers and names. Builders that compute with tensors build on CPU."""
    try:
        with torch.device("meta"):
            return build_model(**arch)
    except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor" (RegNet's widths)
        return build_model(**arch)


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(_TORCHVISION.names())


@functools.cache
def _timm_names() -> tuple[str, ...]:
    return tuple(_TIMM.names())
