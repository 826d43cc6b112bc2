"""Preprocessing shared by every backend, so that they produce the same tensors.

train: RandomResizedCrop(train_size(cfg, epoch), area crop_area_min-1, aspect 3/4-4/3) + horizontal
       flip + the augmentation policy (augment.py); random erasing on the normalized device batch
eval:  resize the shorter side to eval_resize(cfg) (data.eval_resize_size, or eval_size /
       eval_crop_ratio), then center crop eval_size: torchvision's ImageClassification preset
       (e.g. ResNet50_Weights.IMAGENET1K_V2.transforms(): 232 then 224), to the pixel
Both resize antialiased with data.interpolation (bilinear or bicubic: `interpolation(cfg)`); the
augmentation policies keep their own bilinear.

Backends decode and crop to uint8 images, channels last in memory (as decoders and resizers make
them); `to_model_input` normalizes them on the training device (a quarter of the bytes of float32
cross the host/device boundary).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import threading

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)

# data.interpolation's values; None (unset) is resolved to the model's default by config.loader_config.
INTERPOLATIONS = ("bilinear", "bicubic")

# Label of a padding sample in an eval batch. It is cross_entropy's default ignore_index, so a
# summed loss skips padding without any code for it; count samples as (labels != PAD_LABEL).sum().
PAD_LABEL = -100


def eval_resize_size(eval_size: int, eval_crop_ratio: float, eval_resize: int = 0) -> int:
    """The shorter side before the eval centre crop: `eval_resize` when set, else from the ratio."""
    return eval_resize or round(eval_size / eval_crop_ratio)


def eval_resize(cfg) -> int:
    """eval_resize_size of a DataConfig."""
    return eval_resize_size(cfg.eval_size, cfg.eval_crop_ratio, cfg.eval_resize_size)


def interpolation(cfg) -> str:
    """The resize filter of a DataConfig: data.interpolation, bilinear when unset."""
    return cfg.interpolation or "bilinear"


def train_size(cfg, epoch: int) -> int:
    """The train crop side in `epoch` (0-based): data.image_size, or with progressive resizing FFCV's
    ramp (ffcv-imagenet's get_resolution): progressive_start_size up to progressive_start_epoch, then
    linear in the epoch to image_size at progressive_end_epoch, rounded to a multiple of
    progressive_step. A pure function of the epoch: a resumed run trains at the same sizes."""
    start, end = cfg.progressive_start_size, cfg.image_size
    if not start:
        return end
    first, last = cfg.progressive_start_epoch, cfg.progressive_end_epoch
    if epoch <= first:
        return start
    if epoch >= last:
        return end
    size = np.interp([epoch], [first, last], [start, end])[0]  # FFCV's own arithmetic, to the last bit
    return int(np.round(size / cfg.progressive_step)) * cfg.progressive_step


def eval_resize_shape(height: int, width: int, resize: int) -> tuple[int, int]:
    """Output (height, width) with the shorter side `resize`: the rule the DALI graph also computes."""
    short = min(height, width)
    return math.floor(resize * height / short), math.floor(resize * width / short)


def center_crop_origin(length: int, crop: int) -> int:
    """torchvision's center_crop: int(round(margin / 2)), Python's round, half to even (a margin of
    117 starts at 58, one of 119 at 60). DALI's crop_pos_x=0.5 rounds half up: the DALI graph
    computes this origin itself."""
    return int(round((length - crop) / 2))


def random_resized_crop_box(
    rng: random.Random, height: int, width: int, area_min: float = CROP_AREA[0]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn like torchvision's RandomResizedCrop.get_params, from `rng`."""
    area = height * width
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(area_min, CROP_AREA[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < CROP_ASPECT[0]:
        w, h = width, round(width / CROP_ASPECT[0])
    elif ratio > CROP_ASPECT[1]:
        w, h = round(height * CROP_ASPECT[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    image: torch.Tensor, top: int, left: int, h: int, w: int, size: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """A uint8 [3,H,W] image's box resized to size x size, antialiased with `interpolation` (bilinear
    or bicubic): torchvision's resized_crop to the pixel, returned channels last in memory (a [3,S,S]
    view of [S,S,3]).

    The box is copied to channels-last memory first: torch's uint8 antialiased kernel (torchvision's
    path on AVX2 and ARM CPUs) runs there natively (0.10 ms a 224 px train crop of a 500x375 JPEG,
    against 0.15 from the strided box), and PIL (the policies) and channels_last models then take
    the result without a transposition (0.03 ms to a PIL image, against 0.15 from [3,S,S] memory)."""
    box = image[:, top : top + h, left : left + w]
    box = box.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return F.resize(box, [size, size], interpolation=F.InterpolationMode(interpolation), antialias=True)


@functools.lru_cache(maxsize=16)
def _scale_shift(device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x * scale + shift == (x - 255 mean) / (255 std), per channel, tiled along a row of `width` RGB pixels."""
    scale = 1 / (torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255)
    shift = -torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    )
    return scale.repeat(width).float().to(device), shift.repeat(width).float().to(device)


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run the loader's own tensor work on CPU on one thread.

    It shares the cores with the decoding threads or processes, and torch's OpenMP threads spin
    after each parallel region: with 2 threads, per-image resizes took 4x more CPU time in total
    on a 2-core machine. Ops on a GPU are unaffected.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# torch's CPU generator is one per process: the training thread (batch augmentation) and the
# device-decode thread (policies) take turns with it.
_DRAWS = threading.RLock()


@contextlib.contextmanager
def cpu_draws(seed: int):
    """torch's CPU generator seeded with `seed` inside, as it was outside: random draws that depend on
    `seed` only. Only the CPU's: torch.manual_seed would reseed every GPU's too, where the model's
    dropout and drop path draw (and fork_rng(devices=[]) restores only the CPU's). One thread at a
    time: another thread's cpu_draws waits (draws outside cpu_draws, such as a model's dropout on a
    CPU device, are not ordered against it)."""
    with _DRAWS, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B,3,H,W] (any strides) -> normalized float32 on `device` in the requested layout."""
    with one_thread(device):
        return _normalize(images, device, channels_last)


def normalize_into(image: torch.Tensor, out: torch.Tensor) -> None:
    """One uint8 [3,H,W] image (any strides) normalized into `out`, a float32 [3,H,W] on the CPU.

    For a batch built one image at a time (`out` = batch[i]): the image is still in cache, so
    this costs a fifth of normalizing the finished uint8 batch in one pass.
    """
    c, h, w = image.shape
    scale, shift = _scale_shift(out.device, w)
    rows = out.permute(1, 2, 0)
    if rows.is_contiguous():  # `out` is a slice of a channels_last batch: rows of w*3 values
        torch.addcmul(shift, image.permute(1, 2, 0).reshape(h, w * c), scale, out=rows.view(h, w * c))
    else:
        torch.addcmul(shift[:c].view(c, 1, 1), image, scale[:c].view(c, 1, 1), out=out)


def _normalize(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    b, c, h, w = images.shape
    images = images.to(device, non_blocking=True)
    scale, shift = _scale_shift(device, w)
    # addcmul converts uint8 to float in the same pass (3x faster than .float().sub_().div_()).
    if not channels_last:
        return torch.addcmul(shift[:c].view(1, c, 1, 1), images.contiguous(), scale[:c].view(1, c, 1, 1))
    # Broadcasting a [1,3,1,1] statistic over channels_last memory is 5x slower on CPU than this:
    # rows of w*3 interleaved values times a row of tiled statistics (contiguous, vectorized).
    rows = images.permute(0, 2, 3, 1).contiguous().view(b * h, w * c)
    return torch.addcmul(shift, rows, scale).view(b, h, w, c).permute(0, 3, 1, 2)


def parse_ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """[B, L] uint8 ASCII decimals padded with zero bytes (as DALI delivers `cls`) -> int64 [B]."""
    digits = padded.to(torch.int64) - ord("0")
    is_digit = (digits >= 0) & (digits <= 9)
    labels = torch.zeros(padded.shape[0], dtype=torch.int64)
    for i in range(padded.shape[1]):
        labels = torch.where(is_digit[:, i], labels * 10 + digits[:, i], labels)
    if not bool(is_digit.any(1).all()):
        raise ValueError("a .cls field holds no decimal digits")
    return labels
