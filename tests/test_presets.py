"""Train and eval preprocessing: eval crops against torchvision's presets, progressive train sizes against FFCV.

A user holds this project against `ResNet50_Weights.IMAGENET1K_V1.transforms()` (resize 256, crop
224) and `IMAGENET1K_V2.transforms()` (232, 224). The JPEGs are textured and of ImageNet's shapes,
with odd and even margins, so a crop one pixel off shows as tens of grey levels.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.models import ResNet50_Weights

from imagenet_ddp.data import DataConfig, build_loader, jpeg
from imagenet_ddp.data.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_LABEL,
    center_crop_origin,
    eval_resize_shape,
    resized_crop,
    train_size,
)
from imagenet_ddp.synth import jpeg_bytes
from tests.test_loaders import DALI

REPO = Path(__file__).resolve().parent.parent
# (height, width): ImageNet's commonest shapes (375 x 500 gives margins of 117 at 256, 85 at 232:
# where rounding half up and half to even differ) and more of both kinds, portrait ones too.
SHAPES = [(375, 500), (333, 500), (500, 332), (301, 500), (304, 500), (480, 640), (317, 500), (399, 600)]
PRESETS = {"V1": (ResNet50_Weights.IMAGENET1K_V1, 256), "V2": (ResNet50_Weights.IMAGENET1K_V2, 232)}


def textured(rng, height: int, width: int) -> Image.Image:
    """Noise over stripes: neighbouring pixels differ by tens of levels, as in fur or foliage."""
    y, x = np.mgrid[0:height, 0:width]
    stripes = 127 + 100 * np.sin(x / 3.0 + y / 7.0)[..., None] * np.array([1.0, 0.6, -0.8])
    noise = rng.normal(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(stripes + noise, 0, 255).astype(np.uint8))


def textured_shards(tmp_path_factory, shapes, seed: int) -> tuple[Path, list[bytes]]:
    """Shards (train and val) of textured JPEGs of `shapes`, one class per image (a label names its
    image), and the JPEG bytes."""
    src = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(seed)
    data = []
    for i, (h, w) in enumerate(shapes):
        blob = jpeg_bytes(textured(rng, h, w), quality=90)
        data.append(blob)
        for split in ("train", "val"):
            (src / split / f"c{i}").mkdir(parents=True)
            (src / split / f"c{i}" / "img.jpg").write_bytes(blob)
    out = tmp_path_factory.mktemp("textured-shards")
    cmd = [sys.executable, "make_shards.py", "folder", "--src", str(src), "--out", str(out), "--workers", "1"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return out, data


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> tuple[Path, list[bytes]]:
    return textured_shards(tmp_path_factory, SHAPES, seed=0)


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """Normalized images back to 0-255 levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1) * 255
    return images * std + mean


def test_center_crop_origin_rounds_as_torchvision():
    from torchvision.transforms.v2.functional import center_crop

    for length in range(224, 300):
        marks = torch.arange(length).view(1, 1, length).expand(1, 1, length)
        assert int(center_crop(marks.view(1, 1, length), [1, 224])[0, 0, 0]) == center_crop_origin(
            length, 224
        )
    assert center_crop_origin(341, 224) == 58  # round(58.5): half to even, not 59
    assert center_crop_origin(343, 224) == 60  # round(59.5)


@pytest.mark.parametrize("backend", ["torch", DALI])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_eval_crops_equal_torchvisions_preset(jpegs, backend, preset):
    root, data = jpegs
    weights, resize = PRESETS[preset]
    reference = weights.transforms()
    assert (reference.resize_size, reference.crop_size) == ([resize], [224])
    cfg = DataConfig(
        root=str(root), backend=backend, eval_size=224, eval_resize_size=resize, batch_size=4, workers=1
    )
    with build_loader(cfg, "val", train=False) as loader:
        batches = [(x.clone(), y.clone()) for x, y in loader]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    half_up_differs = 0
    for image, label in zip(images, labels, strict=True):
        if label == PAD_LABEL:
            continue
        pixels = jpeg.decode(bytearray(data[label]))
        expected = grey_levels(reference(pixels)[None])[0]
        got = grey_levels(image[None])[0]
        assert float((got - expected).abs().max()) <= 1.0 + 1e-3, f"image {SHAPES[label]}"
        h, w = eval_resize_shape(*SHAPES[label], resize)
        half_up_differs += sum(center_crop_origin(n, 224) != (n - 223) // 2 for n in (h, w))
    assert half_up_differs >= 3  # the shapes do test the rounding


def ffcv_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet's train_imagenet.py get_resolution, as published."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def test_the_train_crop_is_torchvisions_resized_crop_in_channels_last_memory():
    """presets.resized_crop (both backends' CPU train crop) against torchvision's resized_crop, on a
    decoded JPEG's memory layout: random boxes, a 1-pixel box, the whole image, upscaling."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (375, 500, 3), np.uint8)).permute(2, 0, 1)  # as decode_jpeg
    boxes = [(0, 0, 375, 500), (7, 9, 1, 1), (100, 200, 50, 60), (0, 0, 375, 1)]
    boxes += [
        tuple(int(v) for v in (rng.integers(0, 200), rng.integers(0, 250), *rng.integers(1, 175, 2)))
        for _ in range(40)
    ]
    for size in (224, 176, 32):
        for top, left, h, w in boxes:
            got = resized_crop(image, top, left, h, w, size)
            want = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
            assert torch.equal(got, want), (top, left, h, w, size)
            assert got.permute(1, 2, 0).is_contiguous()  # channels last: PIL and the model take it as is


@pytest.mark.parametrize(
    "ramp",
    [
        (160, 192, 13, 11),
        (160, 192, 76, 65),
        (160, 192, 85, 76),
        (128, 224, 40, 3),
        (160, 256, 30, 0),
        (96, 224, 7, 5),
    ],
)
def test_the_progressive_train_size_is_ffcvs_formula(ramp):
    min_res, max_res, end_ramp, start_ramp = ramp
    cfg = DataConfig(
        image_size=max_res,
        progressive_start_size=min_res,
        progressive_start_epoch=start_ramp,
        progressive_end_epoch=end_ramp,
    )
    sizes = [train_size(cfg, epoch) for epoch in range(100)]
    assert sizes == [ffcv_resolution(epoch, *ramp) for epoch in range(100)]
    assert sizes[0] == min_res and sizes[-1] == max_res
    assert train_size(DataConfig(image_size=176), 5) == 176  # off: always image_size


@pytest.mark.parametrize("backend", ["torch", DALI, "synthetic"])
def test_loaders_train_at_the_epochs_size_and_evaluate_at_eval_size(jpegs, backend):
    root, _ = jpegs
    cfg = DataConfig(
        root=str(root),
        backend=backend,
        image_size=64,
        eval_size=48,
        batch_size=2,
        workers=1,
        progressive_start_size=32,
        progressive_start_epoch=1,
        progressive_end_epoch=3,
        progressive_step=16,
    )
    with build_loader(cfg, "train") as train, build_loader(cfg, "val", train=False) as val:
        for epoch, side in [(0, 32), (1, 32), (2, 48), (3, 64), (9, 64)]:
            train.set_epoch(epoch)
            val.set_epoch(epoch)
            assert {tuple(x.shape[2:]) for x, _ in train} == {(side, side)}
            assert {tuple(x.shape[2:]) for x, _ in val} == {(48, 48)}


def test_progressive_settings_are_checked():
    from imagenet_ddp.errors import UserError

    with pytest.raises(UserError, match="progressive_start_size"):
        DataConfig(image_size=128, progressive_start_size=160, progressive_end_epoch=5)
    with pytest.raises(UserError, match="progressive_start_epoch .* before"):
        DataConfig(
            image_size=192, progressive_start_size=160, progressive_start_epoch=5, progressive_end_epoch=5
        )
    with pytest.raises(UserError, match="eval_resize_size"):
        DataConfig(eval_size=224, eval_resize_size=200)
