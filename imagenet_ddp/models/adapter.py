"""What the rest of the package may know about a model family: one Adapter per family.

    from imagenet_ddp.models import adapter_for
    adapter = adapter_for("timm/vit_small_patch16_224")      # or "resnet50", "convnext_tiny", ...
    adapter.defaults(name)      # {"input_size": 224, "interpolation": "bicubic", "crop_pct": 0.9, ...}
    adapter.no_weight_decay(model)   # {"cls_token", "pos_embed", ...}: beyond norm layers and biases
    adapter.layer_ids(model)    # ({"patch_embed.proj.weight": 0, ..., "head.weight": 13}, 14)
    adapter.freeze_points(model)     # ["stem", "blocks.0", ..., "blocks.11", "norm"]
    adapter.head_name(model)    # "head": the Linear with one row per class

The engine, the optimizer (imagenet_ddp/optim.py) and the recipes ask these; none of them branches on a
model's name. `model` is the network build_model returned for a name of this family (not wrapped in
DDP or torch.compile: unwrap it first). Parameter names are the model's own `named_parameters()`
names. Families: resnet.py (torchvision's ResNet, ResNeXt, Wide ResNet), efficientnet.py
(torchvision's EfficientNets), torchvision_zoo.py (every other torchvision classifier), timm_zoo.py
(every timm model, named `timm/<name>`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from torch import nn

from imagenet_ddp.errors import UserError

# torchvision's classification references and most of its weights: 224 px, resized to 256 (0.875).
DEFAULT_INPUT = {
    "input_size": 224,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


class Adapter:
    """One model family. Subclasses say how to build a network and what is special about it."""

    family = "abstract"

    def names(self) -> list[str]:
        """Every model.name this family builds."""
        raise NotImplementedError

    def resolve(self, arch: dict) -> dict:
        """`arch` (architecture()'s keyword arguments) checked for this family, rates resolved to the
        values the network is built with; a one-line UserError naming a key it does not take."""
        raise NotImplementedError

    def build(self, arch: dict) -> nn.Module:
        """The randomly initialised network of a resolved `arch`."""
        raise NotImplementedError

    def fixed_input_size(self, name: str) -> bool:
        """Whether the network is built for one input size (ViTs' position embeddings): then
        build_model is given data.image_size (architecture's img_size) when it is not the default."""
        return False

    def channels_last(self, model: nn.Module) -> bool:
        """Whether channels_last memory format speeds the model up: yes for convnets; no for ViTs and
        Swin, whose one convolution is the patch embedding (attention runs on 3-d tensors)."""
        return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1

    def defaults(self, name: str) -> dict:
        """The model's own preprocessing: input_size (px, square), interpolation ("bilinear" or
        "bicubic"), crop_pct (eval crop / resize side), and mean and std (RGB, 0-1 scale). timm: the
        model's pretrained_cfg; torchvision: its default weights' transforms, else DEFAULT_INPUT."""
        return dict(DEFAULT_INPUT)

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        """Parameter names the model's authors exempt from weight decay besides norm layers' weights
        and every bias (1-d parameters): position embeddings, class and distillation tokens,
        relative position bias tables. Empty for convnets."""
        return set()

    def layer_ids(self, model: nn.Module) -> tuple[dict[str, int], int]:
        """(layer id of each parameter name, number of layers) for layer-wise LR decay, as timm's
        param_groups_layer_decay numbers them: 0 the stem, then each block, the head last
        (num_layers - 1). A one-line UserError for a family without a per-block grouping."""
        matcher = self.group_matcher(model, coarse=False)
        if matcher is None:
            raise UserError(
                f"optim.layer_decay: no per-block grouping is known for {self.family} models; "
                "leave optim.layer_decay unset for them"
            )
        return _layer_ids(model, matcher)

    def group_matcher(self, model: nn.Module, coarse: bool) -> dict | Callable | None:
        """timm's group_matcher for the model (a dict of regexes or a name -> ordinal function), or
        None. coarse=False: one group per block (layer decay); coarse=True: one per stage (freeze)."""
        return None

    def freeze_points(self, model: nn.Module) -> list[str]:
        """model.freeze's choices besides none and backbone, in forward order: freezing one freezes it
        and everything before it. Convnets: by stage; ViTs: by block."""
        return [name for name, _ in self._freeze_groups(model)]

    def freeze_modules(self, model: nn.Module, upto: str) -> list[str]:
        """The parameter names model.freeze=`upto` stops training."""
        if upto == "backbone":
            head = self.head_name(model)
            return [n for n, _ in model.named_parameters() if not _under(n, head)]
        groups = self._freeze_groups(model)
        index = [name for name, _ in groups].index(upto)
        return [n for _, names in groups[: index + 1] for n in names]

    def head_name(self, model: nn.Module) -> str:
        """The classifier head's module (a Linear, one row per class): the last Linear of the model."""
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UserError(f"no Linear classifier head found in this {self.family} model")
        return linears[-1]

    def _freeze_groups(self, model: nn.Module) -> list[tuple[str, list[str]]]:
        """(freeze point, its parameter names) in forward order, from the coarse group_matcher; the
        last group (the head, and what timm leaves unmatched) is not a freeze point."""
        matcher = self.group_matcher(model, coarse=True)
        if matcher is None:
            return []
        ids, num_layers = _layer_ids(model, matcher)
        groups = [[n for n, i in ids.items() if i == layer] for layer in range(num_layers - 1)]
        return [(_group_name(names, index), names) for index, names in enumerate(groups) if names]


def _layer_ids(model: nn.Module, matcher) -> tuple[dict[str, int], int]:
    from timm.models._manipulate import group_parameters

    # timm's own numbering (param_groups_layer_decay): sorted ordinals, unmatched names last.
    ids = group_parameters(model, matcher, reverse=True)
    num_layers = max(ids.values()) + 1
    return {name: ids.get(name, num_layers - 1) for name, _ in model.named_parameters()}, num_layers


def _group_name(names: list[str], index: int) -> str:
    """A group's name: the longest module path most of its parameters share ("blocks.3", "stages.1";
    a final norm grouped with the last block does not rename it); the first group (patch embedding
    and tokens, or the first convolutions) is "stem"."""
    if index == 0:
        return "stem"
    paths, prefix = [n.split(".")[:-1] for n in names], []
    while True:
        nexts = Counter(p[len(prefix)] for p in paths if len(p) > len(prefix) and p[: len(prefix)] == prefix)
        if not nexts or nexts.most_common(1)[0][1] * 2 <= len(paths):
            return ".".join(prefix) if prefix else f"group{index}"
        prefix.append(nexts.most_common(1)[0][0])
        if prefix[-1].isdigit():  # a numbered stage or block: its own name, not a part of it
            return ".".join(prefix)


def unknown_keyword(error: TypeError, name: str) -> UserError:
    """A builder's TypeError for an unexpected keyword argument as a one-line error naming the key."""
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    what = unexpected.group(1) if unexpected else str(error).splitlines()[0]
    key = {
        "drop_path_rate": "model.drop_path",
        "stochastic_depth_prob": "model.drop_path",
        "dropout": "model.dropout",
    }.get(what)
    return UserError(f"{key or 'model.kwargs.' + what}: {name} does not take {what!r}")


def _under(param_name: str, module_name: str) -> bool:
    return param_name == module_name or param_name.startswith(module_name + ".")
