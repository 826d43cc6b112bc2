"""Build an image classifier by name: torchvision's architectures, randomly initialised, with the
regularisers recipes ask for (BlurPool, drop path, dropout).

    from imagenet_ddp.models import build_model
    model = build_model("resnet50", num_classes=1000)
    model = build_model("resnet18", num_classes=200, small_input=True)   # 64 px Tiny ImageNet
    model = build_model("resnet50", num_classes=1000, blurpool=True, drop_path=0.05, dropout=0.1)

A checkpoint stores `architecture(...)`'s dict, so `build_model(**ckpt["architecture"])` rebuilds the
same network without the training config. Every variant has torchvision's state_dict keys and shapes:
torchvision's weights, model.init_from, the EMA and the ONNX export see the plain network. Knows
nothing about ranks or devices.
"""

from __future__ import annotations

import difflib
import functools

import torch.nn.functional as F
from torch import nn

from imagenet_ddp.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
EFFICIENTNETS = tuple(f"efficientnet_b{i}" for i in range(8)) + ("efficientnet_v2_s", "efficientnet_v2_m")
MODELS = RESNETS + EFFICIENTNETS
# torchvision's defaults (its builders' `dropout` and EfficientNet's `stochastic_depth_prob`);
# torchvision's ResNet has neither. A checkpoint records the resolved rates.
DEFAULT_DROPOUT = {
    **dict.fromkeys(RESNETS, 0.0),
    **dict(zip(EFFICIENTNETS, (0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.2, 0.3), strict=True)),
}
DEFAULT_DROP_PATH = {**dict.fromkeys(RESNETS, 0.0), **dict.fromkeys(EFFICIENTNETS, 0.2)}
BLURPOOL_MIN_CHANNELS = 16  # FFCV's and Composer's rule: the stem's 3-channel conv stays sharp


def architecture(
    name: str,
    num_classes: int,
    small_input: bool = False,
    zero_init_residual: bool = True,
    blurpool: bool = False,
    drop_path: float | None = None,
    dropout: float | None = None,
):
    """The keyword arguments of build_model, validated, rates resolved: what a checkpoint records.

    A dict of an older checkpoint, without the later keys, comes back as the plain network's."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown model.name {name!r}{hint}; available: {', '.join(MODELS)}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if blurpool and name not in RESNETS:
        raise UserError(f"model.blurpool is for ResNets ({', '.join(RESNETS)}), not {name}")
    drop_path = DEFAULT_DROP_PATH[name] if drop_path is None else drop_path
    dropout = DEFAULT_DROPOUT[name] if dropout is None else dropout
    for key, rate in (("drop_path", drop_path), ("dropout", dropout)):
        if not 0 <= rate < 1:
            raise UserError(f"model.{key} must be in [0, 1), got {rate}")
    return {
        "name": name,
        "num_classes": num_classes,
        "small_input": small_input,
        "zero_init_residual": zero_init_residual and name in RESNETS,
        "blurpool": bool(blurpool),
        "drop_path": float(drop_path),
        "dropout": float(dropout),
    }


def build_model(
    name: str,
    num_classes: int,
    small_input: bool = False,
    zero_init_residual: bool = True,
    blurpool: bool = False,
    drop_path: float | None = None,
    dropout: float | None = None,
) -> nn.Module:
    import torchvision

    arch = architecture(name, num_classes, small_input, zero_init_residual, blurpool, drop_path, dropout)
    if name in RESNETS:
        kwargs = {"zero_init_residual": True} if arch["zero_init_residual"] else {}
    else:
        kwargs = {"stochastic_depth_prob": arch["drop_path"], "dropout": arch["dropout"]}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        _small_input_stem(model, name)
    if name in RESNETS:
        if arch["blurpool"]:
            apply_blurpool(model)
        _resnet_drop_path(model, arch["drop_path"])
        if arch["dropout"]:
            model.fc.register_forward_pre_hook(functools.partial(_dropout_input, arch["dropout"]))
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


class BlurPoolConv2d(nn.Conv2d):
    """A strided Conv2d that low-pass filters its input first (Zhang 2019, "Making Convolutional
    Networks Shift-Invariant Again"), as FFCV's ResNet recipes and Composer's blur_first=True do: each
    channel convolved with [1,2,1]^T[1,2,1]/16, zero padding 1, stride 1, then the convolution.

    An nn.Conv2d with the same parameters, so the state_dict is the plain model's. The filter is
    timm's BlurPool2d at stride 1 with constant (zero) padding, FFCV's values (timm pads by reflection
    by default); its filter is a non-persistent buffer."""

    def __init__(self, *args, **kwargs):
        from timm.layers import BlurPool2d

        super().__init__(*args, **kwargs)
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.blur = BlurPool2d(self.in_channels, filt_size=3, stride=1, pad_mode="constant", **like)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> BlurPoolConv2d:
        """The same convolution, sharing `conv`'s parameters, blurring first."""
        blurred = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        blurred.weight, blurred.bias = conv.weight, conv.bias
        return blurred

    def forward(self, x):
        return super().forward(self.blur(x))


def apply_blurpool(model: nn.Module) -> nn.Module:
    """Make every Conv2d with stride > 1 and at least 16 input channels (FFCV's rule) blur first, in
    place. In a torchvision ResNet: each stage's first 3x3 (conv2, conv1 in a BasicBlock) and its 1x1
    downsample, in layer2..4; the stem's 3-channel conv1 stays."""
    for name, child in list(model.named_children()):
        strided = isinstance(child, nn.Conv2d) and max(child.stride) > 1
        if strided and child.in_channels >= BLURPOOL_MIN_CHANNELS and not isinstance(child, BlurPoolConv2d):
            setattr(model, name, BlurPoolConv2d.from_conv(child))
        else:
            apply_blurpool(child)
    return model


def _resnet_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth (Huang et al. 2016) on a torchvision ResNet: each block's residual branch
    (its last BatchNorm's output, before the shortcut is added) is zeroed for a whole sample with the
    block's probability, survivors scaled by 1/(1-p), in train mode only. The probability rises
    linearly from 0 at the first block to `rate` at the last, timm's ResNet rule. A forward hook on
    the BatchNorm: no module or key is added."""
    if not rate:
        return
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    for index, block in enumerate(blocks):
        p = rate * index / (len(blocks) - 1)
        if p:
            last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2
            last_norm.register_forward_hook(functools.partial(_drop_branch, p))


def _drop_branch(p: float, module: nn.Module, inputs, output):
    from torchvision.ops import stochastic_depth

    return stochastic_depth(output, p, "row", module.training)


def _dropout_input(p: float, module: nn.Module, inputs):
    """Dropout on the classifier's input, as EfficientNet's classifier.0 does, without a module."""
    return (F.dropout(inputs[0], p, module.training),)


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
