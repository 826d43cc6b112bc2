"""Augmentations of the normalized train batch on the device: random erasing, MixUp and CutMix.

    augment = BatchAugment(random_erase=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5,
                           num_classes=1000, seed=0, rank=rank)
    images, targets = augment(images, labels, epoch, batch)   # targets: [B] or soft [B, C]

Each is torchvision.transforms.v2's own: RandomErasing (value 0 on normalized images: the mean
colour, as torchvision's reference recipe applies it after Normalize) on each image, then one of
MixUp / CutMix on the batch (v2.RandomChoice with CutMix chosen with probability switch_prob,
timm's name for it). Their parameters are drawn on the host from a generator seeded by (seed, rank,
epoch, batch): a pure function of the batch's position, so a resumed run draws what the
uninterrupted one drew, whatever was replayed or restored before it.

Nothing here makes the host wait for the device: boxes and lambdas are host numbers, and an erased
box is filled with a Python number. (torchvision's RandomErasing fills from a CPU tensor: on a
CUDA batch, a blocking copy per erased image. Its own draws are kept, so the boxes are the same.)
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
        self.erase_value = 0.0
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
                images = self._erase(images)
            if self.mix is not None:
                images, labels = self.mix(images, labels)
        return images, labels

    def _erase(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomErasing per image, as its recipe applies it (a v2 transform given a batch
        erases one box in all of its images), with its own draws in its own order: the p test, then
        make_params on an image of the batch's shape (a meta tensor: no pixels)."""
        shape = torch.empty(images.shape[1:], device="meta")
        make_params = getattr(self.erase, "make_params", None) or self.erase._get_params  # torchvision < 0.21
        boxes = []
        for n in range(len(images)):
            if torch.rand(1) >= self.erase.p:
                continue
            box = make_params([shape])
            if box["v"] is not None:  # None: no box fitted in 10 tries, the image stays as it is
                boxes.append((n, box["i"], box["j"], box["h"], box["w"]))
        if not boxes:
            return images
        images = images.clone()  # a new batch: a loader may hand out the same one twice
        for n, i, j, h, w in boxes:
            images[n, :, i : i + h, j : j + w] = self.erase_value  # a fill kernel, no transfer
        return images


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indexes of targets: themselves, or the dominant class of soft targets (torchvision's
    reference scores a mixed batch's top-1 against it)."""
    return targets.argmax(1) if targets.ndim == 2 else targets
