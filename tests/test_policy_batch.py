"""The decode thread's batched policies (data/policy_batch.py) against torchvision's own transforms run
one image at a time (TorchPolicy.on_tensor: the v2 transform on the tensor, seeded per image): the
same ops drawn, the same pixels but for a grey level where a batched multiply-add rounds otherwise."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as F

from imagenet_ddp.data import DataConfig
from imagenet_ddp.data.augment import torch_policy
from imagenet_ddp.data.policy_batch import OPS, BatchPolicy

POLICIES = {
    "ta_wide": dict(auto_augment="ta_wide"),
    "ra": dict(auto_augment="ra", ra_num_ops=2, ra_magnitude=9),
    "ra-mstd": dict(auto_augment="ra", ra_num_ops=2, ra_magnitude=9, ra_magnitude_std=0.5),
    "imagenet": dict(auto_augment="imagenet"),
}


def images(n: int, side: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth photo-like uint8 images (gradients, blobs and noise: every op changes them)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    base = torch.stack([x, y, (x + y) / 2]) * 180 + 30
    blobs = torch.rand(n, 3, 5, 5, generator=g) * 90
    out = (
        base + F.resize(blobs, [side, side], antialias=True) + torch.rand(n, 3, side, side, generator=g) * 20
    )
    return out.clamp(0, 255).to(torch.uint8)


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, int]:
    diff = (ours.int() - theirs.int()).abs()
    return float((diff == 0).float().mean()), int(diff.max())


@pytest.mark.parametrize("name", POLICIES)
def test_a_batch_through_the_policy_is_torchvisions_per_image(name):
    policy = torch_policy(DataConfig(**POLICIES[name]))
    batch, seeds = images(64), list(range(100, 164))
    theirs = torch.stack([policy.on_tensor(image, seed) for image, seed in zip(batch, seeds, strict=True)])
    ours = BatchPolicy(policy)(batch.clone(), seeds)
    equal, worst = compare(ours, theirs)
    assert equal > 0.999 and worst <= 1, (equal, worst)
    changed = (theirs != batch).flatten(1).any(1).float().mean()
    assert changed > 0.5  # the policy does act on most images
    # A wrong draw (another image's seed) is told apart: the negative control.
    shifted = BatchPolicy(policy)(batch.clone(), seeds[1:] + seeds[:1])
    assert compare(shifted, theirs)[0] < 0.9


@pytest.mark.parametrize("transform_id", sorted(OPS))
def test_each_op_with_its_magnitude_per_image_is_torchvisions(transform_id):
    """Every op at magnitudes of both signs, rotations on their fast paths (0, 90, 180, -90) included."""
    policy = torch_policy(DataConfig(auto_augment="ta_wide"))
    apply = policy.transform._apply_image_or_video_transform
    magnitudes = {
        "Rotate": [0.0, 90.0, 180.0, -90.0, 13.5, -121.5, 45.0, 135.0],
        "Posterize": [8.0, 6.0, 4.0, 2.0, 3.0, 5.0, 7.0, 1.0],
        "Solarize": [1.0, 0.9, 0.5, 0.1, 0.0, 0.7, 0.3, 0.55],
        "TranslateX": [0.0, 3.9, -3.9, 12.0, -12.0, 0.5, 31.0, -31.0],
        "TranslateY": [0.0, 3.9, -3.9, 12.0, -12.0, 0.5, 31.0, -31.0],
    }.get(transform_id, [0.0, 0.1, -0.1, 0.5, -0.5, 0.9, -0.9, 0.33])
    batch = images(len(magnitudes), seed=1)
    theirs = torch.stack(
        [
            apply(image, transform_id, m, policy.transform.interpolation, policy.transform._fill)
            for image, m in zip(batch, magnitudes, strict=True)
        ]
    )
    ours = OPS[transform_id](batch.clone(), magnitudes)
    equal, worst = compare(ours, theirs)
    assert equal > 0.999 and worst <= 1, (transform_id, equal, worst)
