"""data.interpolation: every backend's train crop and eval resize against torchvision's transforms.

The reference is torchvision.transforms.v2 (Resize + CenterCrop for eval, RandomResizedCrop's
resized_crop for train) with the same filter and antialiasing, on decoded JPEGs of ImageNet's
shapes. Each check has its negative control: the other filter's reference is far off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

from imagenet_ddp.data import DataConfig, build_loader, jpeg
from imagenet_ddp.data.presets import PAD_LABEL, resized_crop
from imagenet_ddp.errors import UserError
from tests.test_loaders import DALI, TORCH_ON_DEVICE
from tests.test_presets import grey_levels, textured_shards

REPO = Path(__file__).resolve().parent.parent
# Aspect ratios inside RandomResizedCrop's 3/4-4/3: with crop_area_min=1 no drawn box fits, and the
# train crop falls back to the whole image, the same box for every backend (only the flip is drawn).
SHAPES = [(375, 500), (480, 640), (500, 400), (240, 320)]
MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
RESIZE, CROP, TRAIN = 146, 128, 96
# DALI's own resampling (its cubic: Keys' a=-0.5 as torch's antialiased bicubic, from a 129-point
# table): measured against torchvision's on these images, bicubic at most 3 grey levels apart and
# 0.14 on average, bilinear at most 1 and 0.12.
DALI_MAX, DALI_MEAN = 4.0, 0.35
OTHER_FILTER_MEAN = 1.0  # bilinear against bicubic: 2-3 grey levels on average on these images


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> tuple[Path, list[bytes]]:
    return textured_shards(tmp_path_factory, SHAPES, seed=1)


def loader_images(root: Path, backend: str, split: str, **kw) -> list[tuple[int, torch.Tensor]]:
    """(label, grey levels [3,S,S]) of every real sample of one pass."""
    if backend == TORCH_ON_DEVICE:
        backend, kw = "torch", {"decode_device": "cuda", **kw}
    cfg = DataConfig(root=str(root), backend=backend, batch_size=2, workers=1, channels_last=False, **kw)
    with build_loader(cfg, split, train=split == "train") as loader:
        out = [(int(y), grey_levels(x[None])[0]) for xs, ys in loader for x, y in zip(xs, ys, strict=True)]
    return [(label, image) for label, image in out if label != PAD_LABEL]


def eval_reference(blob: bytes, mode: str) -> torch.Tensor:
    preset = T.Compose([T.Resize(RESIZE, interpolation=MODES[mode], antialias=True), T.CenterCrop(CROP)])
    return preset(jpeg.decode(bytearray(blob))).float()


def train_reference(blob: bytes, mode: str) -> torch.Tensor:
    """RandomResizedCrop's resize of the whole-image box (its fallback with no box fitting)."""
    pixels = jpeg.decode(bytearray(blob))
    h, w = pixels.shape[1:]
    return F.resized_crop(
        pixels, 0, 0, h, w, [TRAIN, TRAIN], interpolation=MODES[mode], antialias=True
    ).float()


def farthest(got: list[tuple[int, torch.Tensor]], want, data: list[bytes], mode: str) -> tuple[float, float]:
    """(largest, mean) absolute difference in grey levels over the samples; a train image is compared
    with the reference or its mirror, whichever is closer (the flip is drawn)."""
    worst, means = 0.0, []
    for label, image in got:
        ref = want(data[label], mode)
        diff = min(((image - r).abs() for r in (ref, ref.flip(-1))), key=lambda d: float(d.max()))
        worst, means = max(worst, float(diff.max())), [*means, float(diff.mean())]
    assert len(got) == len(data)
    return worst, sum(means) / len(means)


@pytest.mark.parametrize("backend", ["torch", TORCH_ON_DEVICE])
def test_the_torch_backend_resizes_as_torchvision_with_the_filter_asked(jpegs, backend):
    """Bicubic (bilinear, the default, is held against torchvision's presets in test_presets)."""
    root, data = jpegs
    mode, other = "bicubic", "bilinear"
    val = loader_images(root, backend, "val", eval_size=CROP, eval_resize_size=RESIZE, interpolation=mode)
    train = loader_images(root, backend, "train", image_size=TRAIN, crop_area_min=1.0, interpolation=mode)
    for got, want in ((val, eval_reference), (train, train_reference)):
        assert farthest(got, want, data, mode)[0] <= 1.0 + 1e-3  # within a grey level
        assert farthest(got, want, data, other)[1] > OTHER_FILTER_MEAN  # negative control


@pytest.mark.parametrize("mode", list(MODES))
def test_dali_resizes_within_a_stated_tolerance_of_torchvision(jpegs, mode):
    """DALI's eval resize (its own filters) against torchvision's; DALI's CPU train path crops in
    DALI and resizes with torchvision's kernel: within a grey level."""
    root, data = jpegs
    other = "bilinear" if mode == "bicubic" else "bicubic"
    val = loader_images(
        root, DALI.values[0], "val", eval_size=CROP, eval_resize_size=RESIZE, interpolation=mode
    )
    worst, mean = farthest(val, eval_reference, data, mode)
    print(f"dali {mode} eval vs torchvision: max {worst:.0f}, mean {mean:.3f} grey levels")
    assert worst <= DALI_MAX and mean <= DALI_MEAN
    assert farthest(val, eval_reference, data, other)[1] > OTHER_FILTER_MEAN
    train = loader_images(root, "dali", "train", image_size=TRAIN, crop_area_min=1.0, interpolation=mode)
    assert farthest(train, train_reference, data, mode)[0] <= 1.0 + 1e-3
    assert farthest(train, train_reference, data, other)[1] > OTHER_FILTER_MEAN


def test_the_train_crop_is_torchvisions_bicubic_resized_crop():
    """presets.resized_crop (the workers' and the CPU device path's train crop) with bicubic against
    torchvision's resized_crop: random boxes, shrinking and enlarging, a one-pixel box."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (120, 160, 3), np.uint8)).permute(2, 0, 1)
    boxes = [(0, 0, 120, 160), (7, 9, 1, 1), (10, 20, 30, 40)]
    boxes += [
        (int(rng.integers(0, 60)), int(rng.integers(0, 80)), *map(int, rng.integers(1, 60, 2)))
        for _ in range(20)
    ]
    for top, left, h, w in boxes:
        for size in (48, 24):
            got = resized_crop(image, top, left, h, w, size, "bicubic")
            want = F.resized_crop(image, top, left, h, w, [size, size], MODES["bicubic"], antialias=True)
            assert (got.int() - want.int()).abs().max() <= 1, (top, left, h, w, size)
            if h * w > 100:  # negative control: torchvision's bilinear is another image
                bilinear = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
                assert (got.int() - bilinear.int()).abs().max() > 1


def test_an_unknown_interpolation_is_refused_in_one_line():
    with pytest.raises(UserError, match="data.interpolation must be one of bilinear, bicubic.*'nearest'"):
        DataConfig(interpolation="nearest")


def test_an_unset_interpolation_is_the_models_own_and_a_set_one_wins():
    from imagenet_ddp.config import load_config, loader_config, resolve

    def chosen(*overrides):
        cfg = load_config(None, ["train.precision=fp32", *overrides])
        return loader_config(cfg).interpolation, resolve(
            cfg, 1, "cpu", batches_per_epoch=4
        ).derived.interpolation

    assert chosen("model.name=timm/vit_small_patch16_224") == ("bicubic", "bicubic")  # timm's pretrained_cfg
    assert chosen("model.name=resnet50") == ("bilinear", "bilinear")  # torchvision's V1/V2 weights
    assert chosen("model.name=timm/vit_small_patch16_224", "data.interpolation=bilinear") == (
        "bilinear",
        "bilinear",
    )
    assert chosen("model.name=resnet50", "data.interpolation=bicubic") == ("bicubic", "bicubic")


def test_predict_resizes_with_the_checkpoints_interpolation(jpegs):
    """A checkpoint records the run's filter; predict.py's transform (Classifier.preprocess) uses it."""
    from PIL import Image

    from imagenet_ddp import checkpoint as ck
    from imagenet_ddp.inference import Classifier
    from imagenet_ddp.models import build_model

    _, data = jpegs
    arch = {"name": "resnet18", "num_classes": 2, "small_input": False, "zero_init_residual": True}
    weights = build_model(**arch).state_dict()
    images = [Image.fromarray(jpeg.decode(bytearray(blob)).permute(1, 2, 0).numpy()) for blob in data]
    info = ck.inference_info(arch, ["a", "b"], ["a", "b"], RESIZE, CROP, interpolation="bicubic")
    assert info["preprocess"]["interpolation"] == "bicubic"
    clf = Classifier({**info, "model": weights}, device="cpu")
    for blob, image in zip(data, images, strict=True):
        got = clf.preprocess(image).float()
        assert (got - eval_reference(blob, "bicubic")).abs().max() <= 1.0
        assert (got - eval_reference(blob, "bilinear")).abs().mean() > OTHER_FILTER_MEAN
