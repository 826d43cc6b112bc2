"""An augmentation policy on a whole batch on its device (the torch backend's decode thread).

    batched = BatchPolicy(torch_policy(cfg))
    images = batched(images, seeds)        # uint8 [N,3,H,W] on the device; one seed per image

torchvision's TrivialAugmentWide, RandAugment and AutoAugment take one image at a time: 1 to 4 ops an
image, each a few kernels, and an affine op uploads its matrix with a blocking copy. Here each image's
ops are drawn by torchvision's own forward, its `_apply_image_or_video_transform` recorded instead of
applied (the same calls on the generator, seeded per image as TorchPolicy.on_tensor seeds them), then
each op of each stage runs once on all the images that drew it, with per-image magnitudes: a batch of
256 takes some 14 groups of a few kernels a stage instead of 256 x (5 to 30) kernels, and the affine
matrices go up in one copy per group.

The ops are torchvision's tensor kernels with per-image parameters: its grid sampling
(`_apply_grid_transform`) on per-image affine grids built as its `_affine_grid` builds one, its blend,
posterize, solarize, sharpness arithmetic, and its batched autocontrast and equalize. Pixels equal
torchvision's per-image ops, but for a grey level where a batched multiply-add or matrix product
rounds otherwise (tests/test_policy_batch.py bounds it).
"""

from __future__ import annotations

import copy
import functools
import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms.v2.functional._color import _rgb_to_grayscale_image
from torchvision.transforms.v2.functional._geometry import _apply_grid_transform

try:
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix
except ImportError:  # older torchvision: the v1 functional's, the same function
    from torchvision.transforms.functional import _get_inverse_affine_matrix

from imagenet_ddp.data.augment import TorchPolicy
from imagenet_ddp.data.presets import cpu_draws

Ops = list[tuple[str, float]]  # (torchvision's transform_id, magnitude) in the order applied


class BatchPolicy:
    def __init__(self, policy: TorchPolicy):
        self.recorder = copy.copy(policy.transform)  # its own instance: the shared one keeps applying ops
        self._drawn: Ops = []

        def record(image, transform_id, magnitude, interpolation, fill):
            self._drawn.append((transform_id, float(magnitude)))
            return image

        self.recorder._apply_image_or_video_transform = record

    def draw(self, seed: int, height: int, width: int) -> Ops:
        """The ops torchvision's forward draws for an image of this size under `seed`."""
        self._drawn = []
        with cpu_draws(seed):
            self.recorder(torch.empty(3, height, width, dtype=torch.uint8, device="meta"))
        return self._drawn

    def __call__(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """uint8 [N,3,H,W] (any device) through the policy, image n drawn from seeds[n]."""
        height, width = images.shape[-2:]
        drawn = [self.draw(seed, height, width) for seed in seeds]
        images = images.contiguous()
        for stage in range(max(map(len, drawn), default=0)):
            groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for n, ops in enumerate(drawn):
                if stage < len(ops) and ops[stage][0] != "Identity":
                    groups[ops[stage][0]].append((n, ops[stage][1]))
            for transform_id, members in groups.items():
                where = torch.tensor([n for n, _ in members]).to(images.device, non_blocking=True)
                done = OPS[transform_id](images.index_select(0, where), [m for _, m in members])
                images.index_copy_(0, where, done)
        return images


def _numbers(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-image float32 numbers shaped to broadcast over [N,C,H,W], on `like`'s device (one upload)."""
    return torch.tensor(values, dtype=torch.float32).to(like.device, non_blocking=True).view(-1, 1, 1, 1)


def _to_uint8(output: torch.Tensor) -> torch.Tensor:
    return output.clamp_(0, 255).to(torch.uint8)  # truncation, as torchvision's .to(uint8)


def _blend(image1: torch.Tensor, image2: torch.Tensor, ratios: list[float]) -> torch.Tensor:
    """torchvision's _blend (image1 * r + image2 * (1 - r), clamped, truncated) with a ratio per image."""
    # addcmul_ rounds the multiply-add once, as add_(image2, alpha=...) does for torchvision.
    mixed = image1.mul(_numbers(ratios, image1)).addcmul_(image2, _numbers([1.0 - r for r in ratios], image1))
    return _to_uint8(mixed)


def _grey(images: torch.Tensor) -> torch.Tensor:
    return _rgb_to_grayscale_image(images, num_output_channels=1, preserve_dtype=False).floor_()


def _affine(images: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """torchvision's affine_image (bilinear, fill 0) with an inverse matrix per image."""
    n, _, h, w = images.shape
    theta = torch.tensor(matrices, dtype=torch.float32).view(n, 2, 3)
    # _affine_grid's arithmetic, the theta part on the host (float32, as on the device): one upload.
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32))
    grid = (
        _base_grid(images.device, h, w).expand(n, -1, -1).bmm(rescaled.to(images.device, non_blocking=True))
    )
    return _apply_grid_transform(images, grid.view(n, h, w, 2), "bilinear", None)


@functools.lru_cache(maxsize=8)
def _base_grid(device: torch.device, h: int, w: int) -> torch.Tensor:
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(
        torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    return base.view(1, h * w, 3)


def _shear(images: torch.Tensor, magnitudes: list[float], axis: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    centre = [-0.5 * w, -0.5 * h]  # center=[0, 0] in pixels, as torchvision's ShearX/Y pass it
    shears = [
        [math.degrees(math.atan(m)), 0.0] if axis == 0 else [0.0, math.degrees(math.atan(m))]
        for m in magnitudes
    ]
    return _affine(images, [_get_inverse_affine_matrix(centre, 0.0, [0.0, 0.0], 1.0, s) for s in shears])


def _translate(images: torch.Tensor, magnitudes: list[float], axis: int) -> torch.Tensor:
    moves = [[float(int(m)), 0.0] if axis == 0 else [0.0, float(int(m))] for m in magnitudes]
    return _affine(images, [_get_inverse_affine_matrix([0.0, 0.0], 0.0, t, 1.0, [0.0, 0.0]) for t in moves])


def _rotate(images: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    """torchvision's rotate_image, its fast paths included (0 and 180 degrees; 90 and 270 when square)."""
    h, w = images.shape[-2:]
    angles = [m % 360 for m in magnitudes]
    out = images.clone()
    turns: dict[int, list[int]] = defaultdict(list)
    warped = []
    for n, angle in enumerate(angles):
        if angle in (0, 180) or (h == w and angle in (90, 270)):
            turns[int(angle) // 90].append(n)
        else:
            warped.append(n)
    for k, members in turns.items():
        where = torch.tensor(members).to(images.device, non_blocking=True)
        out.index_copy_(0, where, torch.rot90(images.index_select(0, where), k=k, dims=(-2, -1)))
    if warped:
        where = torch.tensor(warped).to(images.device, non_blocking=True)
        matrices = [
            _get_inverse_affine_matrix([0.0, 0.0], -angles[n], [0.0, 0.0], 1.0, [0.0, 0.0]) for n in warped
        ]
        out.index_copy_(0, where, _affine(images.index_select(0, where), matrices))
    return out


def _sharpness(images: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    """torchvision's adjust_sharpness_image with a factor per image (1 + magnitude)."""
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    output = images.to(torch.float32, copy=True)
    blurred = torch.nn.functional.conv2d(output, _sharpen_kernel(images.device), groups=3).round_()
    view = output[..., 1:-1, 1:-1]
    view.addcmul_(blurred.sub_(view), _numbers([1.0 - (1.0 + m) for m in magnitudes], output))
    return _to_uint8(output)


@functools.lru_cache(maxsize=8)
def _sharpen_kernel(device: torch.device) -> torch.Tensor:
    a, b = 1.0 / 13.0, 5.0 / 13.0
    return torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32).to(device).expand(3, 1, 3, 3)


def _posterize(images: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    masks = [((1 << int(m)) - 1) << (8 - int(m)) for m in magnitudes]
    return images & torch.tensor(masks, dtype=torch.uint8).to(images.device, non_blocking=True).view(
        -1, 1, 1, 1
    )


def _solarize(images: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    return torch.where(
        images >= _numbers([255.0 * m for m in magnitudes], images), images.bitwise_not(), images
    )


OPS: dict[str, Callable[[torch.Tensor, list[float]], torch.Tensor]] = {
    "ShearX": functools.partial(_shear, axis=0),
    "ShearY": functools.partial(_shear, axis=1),
    "TranslateX": functools.partial(_translate, axis=0),
    "TranslateY": functools.partial(_translate, axis=1),
    "Rotate": _rotate,
    "Brightness": lambda images, ms: _to_uint8(images.mul(_numbers([1.0 + m for m in ms], images))),
    "Color": lambda images, ms: _blend(images, _grey(images), [1.0 + m for m in ms]),
    "Contrast": lambda images, ms: _blend(
        images, _grey(images).mean(dim=(-3, -2, -1), keepdim=True), [1.0 + m for m in ms]
    ),
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda images, ms: F.autocontrast(images),
    "Equalize": lambda images, ms: F.equalize(images),
    "Invert": lambda images, ms: F.invert(images),
}
