"""Every timm model, named `timm/<name>` (timm.list_models(); a pretrained tag such as
`timm/convnext_tiny.fb_in1k` selects its preprocessing defaults), randomly initialised by
timm.create_model(name, pretrained=False, num_classes=..., drop_rate=model.dropout,
drop_path_rate=model.drop_path, **model.kwargs).

    python train_ddp.py --config configs/demo.yaml model.name=timm/convnext_tiny model.drop_path=0.1

Pretrained weights never come from here: model.init_from reads a local file or the HF cache
(imagenet_ddp/finetune.py). Per-block groups, freeze points, the head and the no-weight-decay names
are timm's own (group_matcher, pretrained_cfg["classifier"], no_weight_decay()).
"""

from __future__ import annotations

import functools

from torch import nn

from imagenet_ddp.models.adapter import DEFAULT_INPUT, Adapter, unknown_keyword

PREFIX = "timm/"


class TimmAdapter(Adapter):
    family = "timm"

    def names(self) -> list[str]:
        import timm

        return [PREFIX + n for n in timm.list_models()]

    def knows(self, name: str) -> bool:
        import timm

        return name.startswith(PREFIX) and timm.is_model(name[len(PREFIX) :].split(".")[0])

    def resolve(self, arch: dict) -> dict:
        # timm's create_model defaults (and its train.py's): no dropout, no drop path.
        return {
            **arch,
            "drop_path": float(arch["drop_path"] or 0.0),
            "dropout": float(arch["dropout"] or 0.0),
        }

    def build(self, arch: dict) -> nn.Module:
        import timm

        name = arch["name"][len(PREFIX) :]
        kwargs = dict(arch.get("kwargs", {}))
        if arch["drop_path"]:  # not every timm model takes drop_path_rate: passed when asked for
            kwargs["drop_path_rate"] = arch["drop_path"]
        if arch.get("img_size"):
            kwargs["img_size"] = arch["img_size"]
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=arch["num_classes"], drop_rate=arch["dropout"], **kwargs
            )
        except TypeError as e:
            raise unknown_keyword(e, arch["name"]) from None

    def defaults(self, name: str) -> dict:
        return timm_defaults(name[len(PREFIX) :])

    def fixed_input_size(self, name: str) -> bool:
        return bool(_pretrained_cfg(name[len(PREFIX) :]).get("fixed_input_size", False))

    def no_weight_decay(self, model: nn.Module) -> set[str]:
        from timm.optim._param_groups import _matches_pattern

        patterns = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        # timm's names may be patterns (fnmatch): the parameters they match, as timm matches them.
        return {n for n, _ in model.named_parameters() if _matches_pattern(n, patterns)}

    def group_matcher(self, model: nn.Module, coarse: bool):
        return model.group_matcher(coarse=coarse) if hasattr(model, "group_matcher") else None

    def head_name(self, model: nn.Module) -> str:
        classifier = model.pretrained_cfg.get("classifier")
        first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
        if first and isinstance(_get(model, first), nn.Linear):
            return first
        return super().head_name(model)


@functools.cache
def _pretrained_cfg(name: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)  # the default tag's when `name` has none
    return cfg.to_dict() if cfg is not None else {}


def timm_defaults(name: str) -> dict:
    cfg = _pretrained_cfg(name)
    size = cfg.get("input_size", (3, DEFAULT_INPUT["input_size"]))[-1]
    return {
        "input_size": int(size),
        "interpolation": cfg.get("interpolation") or DEFAULT_INPUT["interpolation"],
        "crop_pct": float(cfg.get("crop_pct") or DEFAULT_INPUT["crop_pct"]),
        "mean": tuple(cfg.get("mean") or DEFAULT_INPUT["mean"]),
        "std": tuple(cfg.get("std") or DEFAULT_INPUT["std"]),
    }


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
