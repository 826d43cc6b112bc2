"""Every other torchvision classifier (ViT, ConvNeXt, Swin, RegNet, MobileNet, MaxViT, VGG, ...) as
torchvision's get_model builds it, randomly initialised.

    python train_ddp.py --config configs/demo.yaml model.name=convnext_tiny model.drop_path=0.1

model.drop_path is torchvision's `stochastic_depth_prob` and model.dropout its `dropout` where the
builder takes them (None: the builder's own default); model.kwargs go to the builder as they are.
ViT, ConvNeXt and Swin have a per-block grouping (layer decay) and freeze points by block or stage,
numbered as timm numbers its own ViT, ConvNeXt and Swin; the others freeze only whole (backbone).
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

from imagenet_ddp.models.adapter import DEFAULT_INPUT, Adapter, unknown_keyword

LAST = (float("inf"),)  # timm's ordinal of what its matcher leaves out (the head): the last layer
WITH_PREVIOUS = 99999.0  # timm's MATCH_PREV_GROUP: the final norm shares the last block's layer
# Builders whose networks return auxiliary logits in train mode unless told not to.
BUILDER_DEFAULTS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@functools.cache
def torchvision_defaults(name: str) -> dict:
    """Input size, interpolation and crop ratio of the model's default weights' eval transform."""
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return dict(DEFAULT_INPUT)
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    return {
        "input_size": crop,
        "interpolation": transforms.interpolation.value,
        "crop_pct": round(crop / resize, 4),
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
    }


class TorchvisionAdapter(Adapter):
    family = "torchvision"

    def names(self) -> list[str]:
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)

    def resolve(self, arch: dict) -> dict:
        return arch  # None rates: the builder's default (not known before building)

    def build(self, arch: dict) -> nn.Module:
        import torchvision

        name = arch["name"]
        kwargs = {**BUILDER_DEFAULTS.get(name, {}), **arch.get("kwargs", {})}
        if arch["drop_path"] is not None:
            kwargs["stochastic_depth_prob"] = arch["drop_path"]
        if arch["dropout"] is not None:
            kwargs["dropout"] = arch["dropout"]
        if arch.get("img_size"):
            kwargs["image_size"] = arch["img_size"]
        try:
            model = torchvision.models.get_model(
                name, weights=None, num_classes=arch["num_classes"], **kwargs
            )
        except TypeError as e:
            raise unknown_keyword(e, name) from None
        # Some classes take **kwargs and ignore what they do not know (ConvNeXt): a typo would pass.
        init = inspect.signature(type(model).__init__).parameters
        ignored = [k for k in kwargs if k not in init and k not in BUILDER_DEFAULTS.get(name, {})]
        if ignored:
            raise unknown_keyword(TypeError(f"unexpected keyword argument '{ignored[0]}'"), name)
        return model

    def defaults(self, name: str) -> dict:
        return torchvision_defaults(name)

    def fixed_input_size(self, name: str) -> bool:
        return name.startswith("vit_")

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        # The names timm exempts in its own ViT (cls_token, pos_embed) and Swin (relative position
        # bias tables; V2: logit scales and the continuous position bias MLP), torchvision-named.
        exempt = re.compile(r"class_token|pos_embedding|relative_position_bias_table|logit_scale|cpb_mlp")
        return {n for n, _ in model.named_parameters() if exempt.search(n)}

    def group_matcher(self, model: nn.Module, coarse: bool):
        from torchvision.models import ConvNeXt, SwinTransformer, VisionTransformer

        if isinstance(model, VisionTransformer):
            return _vit_ordinal
        if isinstance(model, (ConvNeXt, SwinTransformer)):
            return functools.partial(_staged_ordinal, coarse=coarse)
        return None

    def head_name(self, model: nn.Module) -> str:
        return super().head_name(model)


def _vit_ordinal(name: str) -> tuple:
    """timm's ViT grouping: patch embedding and tokens 0, block i i+1, final norm with the last block."""
    if name.startswith(("class_token", "conv_proj", "encoder.pos_embedding")):
        return (0.0,)
    block = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", name)
    if block:
        return (1.0, float(block.group(1)))
    return (1.0, WITH_PREVIOUS) if name.startswith("encoder.ln") else LAST


def _staged_ordinal(name: str, coarse: bool) -> tuple:
    """timm's ConvNeXt and Swin grouping on torchvision's layout: features.0 the stem; features.1, 3,
    5, 7 the stages' blocks; features.2, 4, 6 the downsampling that opens stages 1-3 (timm's
    stages.N.downsample, grouped with the stage's first block); a final norm with the last block."""
    parts = name.split(".")
    if parts[0] == "norm":
        return (1.0, WITH_PREVIOUS)
    if parts[0] != "features":
        return LAST
    index = int(parts[1])
    if index == 0:
        return (0.0,)
    stage = float(index // 2)
    if coarse:
        return (1.0, stage)
    return (1.0, stage, float(parts[2]) if index % 2 else 0.0)
