"""Layers the model families share: BlurPool, drop path on a block's branch, dropout before a head,
and the deterministic global average pool (train.deterministic=true). None adds a parameter or a
state_dict key: a network with them loads its plain architecture's weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

BLURPOOL_MIN_CHANNELS = 16  # FFCV's and Composer's rule: the stem's 3-channel conv stays sharp


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


def drop_branch(p: float, module: nn.Module, inputs, output):
    from torchvision.ops import stochastic_depth

    return stochastic_depth(output, p, "row", module.training)


def dropout_input(p: float, module: nn.Module, inputs):
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
