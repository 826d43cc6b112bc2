"""Build an image classifier by name: torchvision's architectures, randomly initialised.

    from imagenet_ddp.models import build_model
    model = build_model("resnet50", num_classes=1000)
    model = build_model("resnet18", num_classes=200, small_input=True)   # 64 px Tiny ImageNet

A checkpoint stores `architecture(...)`'s dict, so `build_model(**ckpt["architecture"])` rebuilds the
same network without the training config. Knows nothing about ranks or devices.
"""

from __future__ import annotations

import difflib

from torch import nn

from imagenet_ddp.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
EFFICIENTNETS = tuple(f"efficientnet_b{i}" for i in range(8)) + ("efficientnet_v2_s", "efficientnet_v2_m")
MODELS = RESNETS + EFFICIENTNETS


def architecture(name: str, num_classes: int, small_input: bool = False, zero_init_residual: bool = True):
    """The keyword arguments of build_model, validated: what a checkpoint records."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown model.name {name!r}{hint}; available: {', '.join(MODELS)}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    return {
        "name": name,
        "num_classes": num_classes,
        "small_input": small_input,
        "zero_init_residual": zero_init_residual and name in RESNETS,
    }


def build_model(
    name: str, num_classes: int, small_input: bool = False, zero_init_residual: bool = True
) -> nn.Module:
    import torchvision

    arch = architecture(name, num_classes, small_input, zero_init_residual)
    kwargs = {"zero_init_residual": True} if arch["zero_init_residual"] else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        _small_input_stem(model, name)
    return model


def _small_input_stem(model: nn.Module, name: str) -> None:
    """Keep small images from shrinking 4x (ResNet) or 2x (EfficientNet) in the stem.

    At 64 px a ResNet's standard stem leaves 16x16 maps for layer1 and 2x2 for the last stage; the
    CIFAR-style 3x3 stride-1 stem without max-pool keeps 64x64 for layer1 (the usual Tiny ImageNet
    adaptation; 16x the compute of the standard stem at the same input size)."""
    if name in RESNETS:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    else:
        model.features[0][0].stride = (1, 1)


class GlobalAvgPool(nn.Module):
    """AdaptiveAvgPool2d(1) as a mean: the same values, and a backward (expand and divide) that is
    deterministic on CUDA, where adaptive_avg_pool2d's backward has no deterministic kernel."""

    def forward(self, x):
        return x.mean((-2, -1), keepdim=True)


def deterministic_pooling(model: nn.Module) -> nn.Module:
    """Replace every AdaptiveAvgPool2d to 1x1 in `model` (in place) by GlobalAvgPool. No parameters
    change: the state_dict, and so every checkpoint, is the same as the model's without it."""
    for name, child in list(model.named_children()):
        size = getattr(child, "output_size", None)
        if isinstance(child, nn.AdaptiveAvgPool2d) and size in (1, (1, 1)):
            setattr(model, name, GlobalAvgPool())
        else:
            deterministic_pooling(child)
    return model
