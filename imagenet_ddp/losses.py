"""Training losses, selected by `train.loss` through one registry.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml \
        train.loss=bce train.label_smoothing=0.1

Both take logits [B, C] and either class indices [B] (int64) or soft targets [B, C] (MixUp/CutMix: the
mix of the two images' one-hot labels, *not* smoothed). The loss applies train.label_smoothing to
both kinds, (1 - s) * target + s / C. Smoothing is linear, so smoothing the mix equals mixing the
smoothed labels: what timm's Mixup(label_smoothing=s) hands its losses.

- ce: torch's CrossEntropyLoss, the mean over the batch of -sum_c target_c * log_softmax_c.
- bce: timm's BinaryCrossEntropy, a sigmoid per class: F.binary_cross_entropy_with_logits on the smoothed
  one-hot (or soft) targets, optionally binarised (train.bce_target_threshold: target > threshold -> 1,
  else 0, after smoothing), reduced by the mean over batch *and* classes. Composer's
  binary_cross_entropy_with_logits sums over classes and averages over the batch: C times this loss
  (and its gradients), which matters for SGD's LR but hardly for LAMB, whose steps are normalised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imagenet_ddp.config import TrainConfig


class BinaryCrossEntropy(nn.Module):
    """timm's BinaryCrossEntropy, with label smoothing applied to soft targets too: timm smooths only
    class indices and expects soft targets smoothed upstream (by its Mixup)."""

    def __init__(self, smoothing: float, target_threshold: float | None):
        super().__init__()
        from timm.loss import BinaryCrossEntropy as TimmBinaryCrossEntropy

        self.smoothing = smoothing
        self.timm = TimmBinaryCrossEntropy(smoothing=smoothing, target_threshold=target_threshold)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape == logits.shape and self.smoothing:
            target = target * (1.0 - self.smoothing) + self.smoothing / logits.shape[-1]
        return self.timm(logits, target)


def _ce(t: TrainConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)


def _bce(t: TrainConfig) -> nn.Module:
    return BinaryCrossEntropy(smoothing=t.label_smoothing, target_threshold=t.bce_target_threshold or None)


CRITERIA: dict[str, Callable[[TrainConfig], nn.Module]] = {"ce": _ce, "bce": _bce}


def build_criterion(t: TrainConfig) -> nn.Module:
    """The training loss `t.loss`, (logits, class indices or soft targets) -> mean loss."""
    return CRITERIA[t.loss](t)
