"""Augmentations of the normalized train batch on the device: random erasing, MixUp and CutMix.

    augment = BatchAugment(random_erase=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5,
                           num_classes=1000, seed=0, rank=rank)
    images, targets = augment(images, labels, epoch, batch)   # targets: [B] or soft [B, C]

Each is torchvision.transforms.v2's own: RandomErasing (value 0 on normalized images: the mean
colour, as torchvision's reference recipe applies it after Normalize) on each image, then one of
MixUp / CutMix on the batch (v2.RandomChoice with CutMix chosen with probability switch_prob,
timm's name for it). Their parameters are drawn on the host (no device sync), from a generator
seeded by (seed, rank, epoch, batch): a pure function of the batch's position, so a resumed run
draws what the uninterrupted one drew, whatever was replayed or restored before it.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from imagenet_ddp.data.plan import derive_seed
from imagenet_ddp.data.presets import cpu_draws

# Kept apart from the loader's and the model's random streams (dropout, drop path).
_STREAM = 0x6D6978


class BatchAugment:
    def __init__(
        self,
        *,
        random_erase: float,
        mixup_alpha: float,
        cutmix_alpha: float,
        switch_prob: float,
        num_classes: int,
        seed: int,
        rank: int,
    ):
        self.seed, self.rank = seed, rank
        self.erase = v2.RandomErasing(p=random_erase, value=0) if random_erase > 0 else None
        mixers, weights = [], []
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            weights.append(1 - switch_prob if cutmix_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(mixers, p=weights) if mixers else None

    @property
    def active(self) -> bool:
        return self.erase is not None or self.mix is not None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            return images, labels
        with cpu_draws(derive_seed(_STREAM, self.seed, self.rank, epoch, batch)):
            if self.erase is not None:
                # Per image, as torchvision's recipe applies it (a v2 transform given a batch erases
                # one box in all of its images); a new batch: a loader may hand out the same one twice.
                images = torch.stack([self.erase(image) for image in images])
            if self.mix is not None:
                images, labels = self.mix(images, labels)
        return images, labels


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indexes of targets: themselves, or the dominant class of soft targets (torchvision's
    reference scores a mixed batch's top-1 against it)."""
    return targets.argmax(1) if targets.ndim == 2 else targets
