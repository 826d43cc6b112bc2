"""The `synthetic` backend: random tensors of the right shape, already on the device.

    build_loader(DataConfig(backend="synthetic"), "train", ...)

Measures training speed with no data loading at all. Sizes and classes come from
ROOT/<split>/manifest.json when it exists (so an epoch is as long as with real data), otherwise
from ImageNet-1k (1,281,167 train / 50,000 val images, 1000 classes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagenet_ddp.data import plan
from imagenet_ddp.data.base import Loader, count_steps
from imagenet_ddp.data.presets import PAD_LABEL, train_size
from imagenet_ddp.data.shardset import open_split

IMAGENET_SAMPLES = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000


class SyntheticLoader(Loader):
    def __init__(self, cfg, split: str, *, rank, world_size, device, seed, train):
        if (Path(cfg.root) / split / "manifest.json").is_file():
            shards = open_split(cfg.root, split)
            num_samples, classes, names = shards.num_samples, shards.classes, shards.class_names
        else:
            num_samples = IMAGENET_SAMPLES.get(split, IMAGENET_SAMPLES["val"])
            classes = names = [f"class{i:04d}" for i in range(IMAGENET_CLASSES)]
        b = cfg.batch_size
        super().__init__(
            split=split,
            train=train,
            batch_size=b,
            steps=count_steps(split, num_samples, world_size, b, train),
            num_samples=num_samples,
            classes=classes,
            class_names=names,
        )
        self.device, self.channels_last = device, cfg.channels_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.cfg = cfg

    @property
    def image_size(self) -> int:
        return train_size(self.cfg, self.epoch) if self.train else self.cfg.eval_size

    def _batches(self):
        g = torch.Generator().manual_seed(plan.derive_seed(self.seed, self.epoch, self.rank))
        s, b = self.image_size, self.batch_size
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # One batch of images, reused: generating noise each step would be measured instead of the model.
        images = torch.randn((b, 3, s, s), generator=g).to(self.device).contiguous(memory_format=fmt)
        labels = torch.randint(0, self.num_classes, (self.steps, b), generator=g)
        if not self.train:
            for step in range(self.steps):
                valid = plan.eval_valid_count(self.num_samples, self.rank, self.world_size, b, step)
                labels[step, valid:] = PAD_LABEL
        labels = labels.to(self.device)
        for step in range(self.steps):
            yield images, labels[step]
