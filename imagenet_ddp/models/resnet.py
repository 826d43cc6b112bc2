"""torchvision's ResNets (ResNet, ResNeXt, Wide ResNet) with the regularisers recipes ask for:
BlurPool, drop path, dropout, the small-input stem, zero-init residuals and the convolutions' init.

    python train_ddp.py --config configs/ffcv_resnet50_16ep.yaml     # model.name=resnet50, blurpool
"""

from __future__ import annotations

import functools

from torch import nn

from imagenet_ddp.errors import UserError
from imagenet_ddp.models.adapter import Adapter
from imagenet_ddp.models.layers import apply_blurpool, drop_branch, dropout_input
from imagenet_ddp.models.torchvision_zoo import torchvision_defaults

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# The same ResNet class, wider or grouped: every variant below applies to them alike.
RESNET_KIN = (
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
CONV_INITS = ("fan_out", "fan_in")


class ResNetAdapter(Adapter):
    family = "torchvision ResNet"

    def names(self) -> list[str]:
        return [*RESNETS, *RESNET_KIN]

    def resolve(self, arch: dict) -> dict:
        if arch.get("conv_init", "fan_out") not in CONV_INITS:
            raise UserError(
                f"model.conv_init must be one of {', '.join(CONV_INITS)}, got {arch['conv_init']!r}"
            )
        # torchvision's ResNet has neither dropout nor drop path: 0 unless asked.
        return {
            **arch,
            "drop_path": float(arch["drop_path"] or 0.0),
            "dropout": float(arch["dropout"] or 0.0),
        }

    def build(self, arch: dict) -> nn.Module:
        import torchvision

        kwargs = {"zero_init_residual": True} if arch["zero_init_residual"] else {}
        model = torchvision.models.get_model(
            arch["name"], weights=None, num_classes=arch["num_classes"], **kwargs, **arch.get("kwargs", {})
        )
        if arch["small_input"]:
            small_input_stem(model)
        if arch.get("conv_init", "fan_out") == "fan_in":
            fan_in_conv_init(model)
        if arch["blurpool"]:
            apply_blurpool(model)
        drop_path(model, arch["drop_path"])
        if arch["dropout"]:
            model.fc.register_forward_pre_hook(functools.partial(dropout_input, arch["dropout"]))
        return model

    def defaults(self, name: str) -> dict:
        return torchvision_defaults(name)

    def head_name(self, model: nn.Module) -> str:
        return "fc"

    def _freeze_groups(self, model: nn.Module) -> list[tuple[str, list[str]]]:
        stages = {"stem": ("conv1", "bn1"), **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)}}
        params = [n for n, _ in model.named_parameters()]
        return [
            (stage, [n for n in params if n.split(".")[0] in modules]) for stage, modules in stages.items()
        ]


def small_input_stem(model: nn.Module) -> None:
    """Keep small images from shrinking 4x in the stem.

    At 64 px a ResNet's standard stem leaves 16x16 maps for layer1 and 2x2 for the last stage; the
    CIFAR-style 3x3 stride-1 stem without max-pool keeps 64x64 for layer1 (the usual Tiny ImageNet
    adaptation; 16x the compute of the standard stem at the same input size)."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def fan_in_conv_init(model: nn.Module) -> None:
    """Every convolution drawn again as He et al. 2015 derive it, from each filter's inputs:
    kaiming_normal_(mode="fan_in", nonlinearity="relu"), std sqrt(2 / (in_channels * k * k)).
    torchvision draws them by fan_out (std sqrt(2 / (out_channels * k * k))); fan_in is the init of
    NVIDIA's ResNet-50 v1.5 recipe (its models/resnet.py, as the recipe audit read it). BatchNorm and
    the classifier keep torchvision's init, zero-init residuals included."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def drop_path(model: nn.Module, rate: float) -> None:
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
            last_norm.register_forward_hook(functools.partial(drop_branch, p))
