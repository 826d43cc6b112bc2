"""Augmentation policies on the train crop (data.auto_augment), the one place both backends build them.

    torchrun --nproc_per_node=8 train_ddp.py data.auto_augment=ta_wide
    torchrun --nproc_per_node=8 train_ddp.py data.auto_augment=ra data.ra_magnitude=9 data.ra_magnitude_std=0.5

Applied after RandomResizedCrop and the flip, on uint8 images, as torchvision's
ClassificationPresetTrain does. Policies by name (POLICIES): torchvision.transforms.v2 on the torch
backend (`torch_policy`), nvidia.dali.auto_aug inside the pipeline on the dali one (`dali_policy`):

- ta_wide:  TrivialAugmentWide (one op of 14, magnitude bin uniform of 31);
- ra:       RandAugment (ra_num_ops ops of 14, bin ra_magnitude of 31; with ra_magnitude_std > 0
            the bin is drawn per image from N(ra_magnitude, ra_magnitude_std), rounded and clipped
            to [0, 30], the same bin for all ops of the image; timm's mstd draws per op, unbinned);
- imagenet: AutoAugment's ImageNet policy, torchvision's table (25 sub-policies, 10 bins).

The DALI side is built from DALI's augmentations with torchvision's op lists, magnitude tables,
fill and interpolation, so both backends draw from the same distribution of transformations
(not the same draws: each backend has its own random generators). Where DALI's defaults differ,
torchvision's are used:
- imagenet: DALI's auto_augment_image_net is another policy (TF's EfficientNet "v0": 25 other
  sub-policies with solarize_add and translate_y, 11 bins); torchvision's table is run with
  DALI's apply_auto_augment instead;
- fill 0 (torchvision's default for uint8; DALI's is 128) and bilinear interpolation in shear,
  translate and rotate (what torchvision's reference recipe passes to its policies, whose own
  default is nearest; DALI's default is linear too);
- translations in whole pixels, truncated toward zero as torchvision does: ta_wide up to 32 px
  (DALI's default too), ra up to 150/331 of the side (DALI's default: 100 px);
- ta_wide's enhance ops (brightness, color, contrast, sharpness) span factors 1 +- [0, 0.99]
  (DALI's default: [0.01, 0.99]); solarize thresholds 255 down to 0 (DALI's: 256 down to 0).
What stays different, pixel by pixel, not in kind: Equalize follows PIL on torchvision and OpenCV
on DALI (the lookup tables differ by a level or two); Sharpness keeps the 1-pixel border on
torchvision, DALI filters it too; blends (brightness, contrast, color, sharpness) truncate to
uint8 on torchvision and round on DALI; PIL's and DALI's bilinear warps round differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from imagenet_ddp.data.presets import cpu_draws

POLICIES = ("none", "ta_wide", "ra", "imagenet")
NUM_BINS = 31  # TrivialAugmentWide's and RandAugment's magnitude bins
FILL = 0  # torchvision's fill for uint8 images outside a shear, translation or rotation


def settings(cfg) -> tuple:
    """What of a DataConfig the policy depends on (DALI's pipeline arguments and their digest)."""
    if cfg.auto_augment == "ra":
        return ("ra", int(cfg.ra_num_ops), int(cfg.ra_magnitude), float(cfg.ra_magnitude_std))
    return (cfg.auto_augment,)


def round_bin(value: float) -> int:
    """A drawn magnitude to a bin: to the nearest (halves up), clipped to [0, NUM_BINS - 1]."""
    return min(max(math.floor(value + 0.5), 0), NUM_BINS - 1)


# --- torch backend: torchvision.transforms.v2 ---------------------------------------------------


# torchvision's reference recipe (references/classification/presets.py) gives its policies
# bilinear interpolation; the transforms' own default is nearest.
INTERPOLATION = v2.InterpolationMode.BILINEAR


class _WholePixelShifts:
    """Mixed into torchvision's policies: TranslateX/Y of a PIL image as a paste onto the fill.

    torchvision translates by int(magnitude) through PIL's affine transform, which with bilinear
    interpolation samples pixel centres exactly at whole-pixel offsets: the paste gives the same
    pixels (tested against torchvision's own method for every offset), in 0.01 ms instead of 0.77
    (a 224 px image). Tensors, and any fill but torchvision's default (0), take torchvision's path."""

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        if (
            transform_id in ("TranslateX", "TranslateY")
            and isinstance(image, Image.Image)
            and self.fill is None
        ):
            offset = (int(magnitude), 0) if transform_id == "TranslateX" else (0, int(magnitude))
            shifted = Image.new(image.mode, image.size, (FILL,) * len(image.getbands()))
            shifted.paste(image, offset)
            return shifted
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)


class _TrivialAugmentWide(_WholePixelShifts, v2.TrivialAugmentWide):
    pass


class _RandAugment(_WholePixelShifts, v2.RandAugment):
    pass


class _AutoAugment(_WholePixelShifts, v2.AutoAugment):
    pass


class _RandAugmentDrawnBin(_RandAugment):
    """torchvision's RandAugment, its magnitude bin drawn per image from N(mean, std) first."""

    def __init__(self, num_ops: int, mean: int, std: float):
        super().__init__(
            num_ops=num_ops, magnitude=mean, num_magnitude_bins=NUM_BINS, interpolation=INTERPOLATION
        )
        self.mean, self.std = mean, std

    def forward(self, *inputs):
        self.magnitude = round_bin(self.mean + self.std * float(torch.randn(())))
        return super().forward(*inputs)


def _torch_rand_augment(cfg) -> v2.Transform:
    if cfg.ra_magnitude_std > 0:
        return _RandAugmentDrawnBin(cfg.ra_num_ops, cfg.ra_magnitude, cfg.ra_magnitude_std)
    return _RandAugment(
        num_ops=cfg.ra_num_ops,
        magnitude=cfg.ra_magnitude,
        num_magnitude_bins=NUM_BINS,
        interpolation=INTERPOLATION,
    )


_TORCH: dict[str, Callable[..., v2.Transform]] = {
    "ta_wide": lambda cfg: _TrivialAugmentWide(num_magnitude_bins=NUM_BINS, interpolation=INTERPOLATION),
    "ra": _torch_rand_augment,
    "imagenet": lambda cfg: _AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=INTERPOLATION),
}


class TorchPolicy:
    """policy(image, seed): a uint8 [3,H,W] image through the v2 transform, its random draws
    taken from torch's generator seeded with `seed` (the caller's generator left as it was), so
    an image's augmentation depends on its own seed only, not on which images went before.

    The transform runs on a PIL image, as in torchvision's reference recipe (its presets'
    default backend): PIL's ops cost a half to two thirds of the tensor ones on a CPU core. At
    224 px, TrivialAugmentWide's ops average 0.25 ms an image (shear and rotate, bilinear, 0.7 ms
    each; translations 0.01, see _WholePixelShifts), and the conversions 0.06 ms from the
    channels-last memory presets.resized_crop returns (0.3 ms from [3,H,W] memory)."""

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        with cpu_draws(seed):
            pil = self.transform(pil)
        return torch.from_numpy(np.array(pil)).permute(2, 0, 1)

    def on_tensor(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The same draws on a uint8 [3,H,W] tensor, on its device (torch's kernels: the pixels differ
        from PIL's by rounding)."""
        with cpu_draws(seed):
            return self.transform(image)


def torch_policy(cfg) -> TorchPolicy | None:
    """The torch backend's policy for a DataConfig; None for "none"."""
    build = _TORCH.get(cfg.auto_augment)
    return None if build is None else TorchPolicy(build(cfg))


# --- dali backend: nvidia.dali.auto_aug, inside the pipeline ------------------------------------


def _whole_pixels_x(magnitude):
    """A translation's offset in whole pixels, toward zero, as torchvision's int(magnitude)."""
    return [float(np.trunc(magnitude)), 0.0]


def _whole_pixels_y(magnitude):
    return [0.0, float(np.trunc(magnitude))]


def _equalize(data, _):
    import nvidia.dali.fn as fn

    return fn.equalize(data)


def _sharpen(data, kernel):
    import nvidia.dali.fn as fn

    return fn.filter(data, kernel)


def _dali_ops(max_translate: float, shear: float, rotate: float, enhance: tuple, posterize: tuple) -> dict:
    """DALI augmentations named as torchvision's, with torchvision's magnitude ranges. Equalize and
    Sharpness are DALI's own, on the operators that replace the deprecated fn.experimental ones
    they call (which warn at every pipeline build)."""
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    return {
        "TranslateX": a.translate_x_no_shape.augmentation((0, max_translate), True, _whole_pixels_x),
        "TranslateY": a.translate_y_no_shape.augmentation((0, max_translate), True, _whole_pixels_y),
        "ShearX": a.shear_x.augmentation((0, shear), True),
        "ShearY": a.shear_y.augmentation((0, shear), True),
        "Rotate": a.rotate.augmentation((0, rotate), True),
        "Brightness": a.brightness.augmentation(enhance, True, a.shift_enhance_range),
        "Contrast": a.contrast.augmentation(enhance, True, a.shift_enhance_range),
        "Color": a.color.augmentation(enhance, True, a.shift_enhance_range),
        "Sharpness": augmentation(
            _sharpen,
            mag_range=enhance,
            randomly_negate=True,
            mag_to_param=a.sharpness_kernel,
            param_device="auto",
            name="sharpness",
        ),
        "Posterize": a.posterize.augmentation(posterize, False, a.poster_mask_uint8),  # bits kept
        "Solarize": a.solarize.augmentation((255, 0)),  # threshold: pixels >= it are inverted
        "Equalize": augmentation(_equalize, name="equalize"),
        "AutoContrast": a.auto_contrast,
        "Identity": a.identity,
        "Invert": a.invert,
    }


def dali_suite(policy: str, size: int) -> dict:
    """The DALI augmentations a policy draws from, by torchvision's op names, at the policy's magnitude
    ranges (torchvision's) for crops of side `size`: TrivialAugmentWide's, RandAugment's, or every op
    the ImageNet AutoAugment table may name (RandAugment's ranges, and Identity)."""
    if policy == "ta_wide":
        ops = _dali_ops(32, 0.99, 135, (0, 0.99), (8, 2))
        return {name: ops[name] for name in v2.TrivialAugmentWide._AUGMENTATION_SPACE}
    ops = _dali_ops(150 / 331 * size, 0.3, 30, (0, 0.9), (8, 4))
    return ops if policy == "imagenet" else {name: ops[name] for name in v2.RandAugment._AUGMENTATION_SPACE}


def _dali_kwargs() -> dict:
    import nvidia.dali.types as types

    return {"fill_value": FILL, "interp_type": types.INTERP_LINEAR}


def dali_magnitude_bin(mean: int, std: float):
    """Per sample: a bin drawn from N(mean, std), rounded (halves up) and clipped as round_bin."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    drawn = fn.random.normal(mean=float(mean), stddev=float(std), dtype=types.FLOAT)
    return fn.cast(dmath.clamp(dmath.floor(drawn + 0.5), 0.0, float(NUM_BINS - 1)), dtype=types.INT32)


def _dali_trivial_augment(images, size: int, _settings: tuple):
    from nvidia.dali.auto_aug.trivial_augment import apply_trivial_augment

    suite = list(dali_suite("ta_wide", size).values())
    return apply_trivial_augment(suite, images, num_magnitude_bins=NUM_BINS, **_dali_kwargs())


def _dali_rand_augment(images, size: int, ra: tuple):
    """DALI's apply_rand_augment, with a bin that may be drawn per sample (it takes one int bin):
    `select` applies op i of the suite to the samples that drew i, each at its own signed bin."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.auto_aug.core import select, signed_bin

    _, num_ops, magnitude, std = ra
    suite = list(dali_suite("ra", size).values())
    magnitude_bin = dali_magnitude_bin(magnitude, std) if std > 0 else magnitude
    chosen = fn.random.uniform(values=list(range(len(suite))), shape=(num_ops,), dtype=types.INT32)
    negate = fn.random.uniform(values=[0, 1], shape=(num_ops,), dtype=types.INT32)
    for i in range(num_ops):
        level = signed_bin(magnitude_bin, random_sign=negate[i])
        images = select(
            suite, chosen[i], images, magnitude_bin=level, num_magnitude_bins=NUM_BINS, **_dali_kwargs()
        )
    return images


def _dali_auto_augment(images, size: int, _settings: tuple):
    from nvidia.dali.auto_aug.auto_augment import apply_auto_augment
    from nvidia.dali.auto_aug.core import Policy

    ops = dali_suite("imagenet", size)
    table = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies  # (op, probability, bin) pairs
    # One of its steps is an Equalize at probability 0 (DALI warns at every build): run as Identity.
    steps = [
        [("Identity", 1.0, None) if p == 0 else (name, p, bin_) for name, p, bin_ in sub] for sub in table
    ]
    policy = Policy(
        "torchvision ImageNet",
        num_magnitude_bins=10,
        sub_policies=[[(ops[name], p, bin_) for name, p, bin_ in sub] for sub in steps],
    )
    return apply_auto_augment(policy, images, **_dali_kwargs())


_DALI = {"ta_wide": _dali_trivial_augment, "ra": _dali_rand_augment, "imagenet": _dali_auto_augment}


def dali_policy(images, size: int, policy: tuple):
    """DALI HWC uint8 `images` of side `size` through the policy of `settings(cfg)` (in a
    pipeline_def with enable_conditionals=True); unchanged for "none"."""
    apply = _DALI.get(policy[0])
    return images if apply is None else apply(images, size, policy)
