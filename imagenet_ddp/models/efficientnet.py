"""torchvision's EfficientNets (B0-B7, V2-S/M/L), with torchvision's dropout and stochastic depth.

python train_ddp.py --config configs/timm_efficientnet_b0.yaml
"""

from __future__ import annotations

from torch import nn

from imagenet_ddp.errors import UserError
from imagenet_ddp.models.adapter import Adapter
from imagenet_ddp.models.torchvision_zoo import torchvision_defaults

EFFICIENTNETS = tuple(f"efficientnet_b{i}" for i in range(8)) + (
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "efficientnet_v2_l",
)
# torchvision's defaults (its builders' `dropout` and `stochastic_depth_prob`). A checkpoint records
# the resolved rates.
DEFAULT_DROPOUT = dict(
    zip(EFFICIENTNETS, (0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.2, 0.3, 0.4), strict=True)
)
DEFAULT_DROP_PATH = 0.2


class EfficientNetAdapter(Adapter):
    family = "torchvision EfficientNet"

    def names(self) -> list[str]:
        return list(EFFICIENTNETS)

    def resolve(self, arch: dict) -> dict:
        if arch["blurpool"]:
            raise UserError(f"model.blurpool is for ResNets, not {arch['name']}")
        drop_path, dropout = arch["drop_path"], arch["dropout"]
        return {
            **arch,
            "zero_init_residual": False,
            "drop_path": float(DEFAULT_DROP_PATH if drop_path is None else drop_path),
            "dropout": float(DEFAULT_DROPOUT[arch["name"]] if dropout is None else dropout),
        }

    def build(self, arch: dict) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(
            arch["name"],
            weights=None,
            num_classes=arch["num_classes"],
            stochastic_depth_prob=arch["drop_path"],
            dropout=arch["dropout"],
            **arch.get("kwargs", {}),
        )
        if arch["small_input"]:
            model.features[0][0].stride = (1, 1)  # keep small images from shrinking 2x in the stem
        return model

    def defaults(self, name: str) -> dict:
        return torchvision_defaults(name)

    def head_name(self, model: nn.Module) -> str:
        return "classifier.1"

    def _freeze_groups(self, model: nn.Module) -> list[tuple[str, list[str]]]:
        # features.0 (the stem) .. features.N-1 (the last 1x1 conv): one freeze point each.
        params = [n for n, _ in model.named_parameters()]
        points = [f"features.{i}" for i in range(len(model.features))]
        return [(p, [n for n in params if n.startswith(p + ".")]) for p in points]
