"""The DALI graph of the `dali` backend: what a pipeline reads, decodes and outputs for one pass.

    pipe = built(dict(paths=..., index_paths=..., train=True, decoder="mixed", image_size=224, ...), None)

Train: fn.readers.webdataset over the pass's shards and index ranges, the random crop decoded (nvJPEG
with `decoder="mixed"`), then flip, resize and the augmentation policy (augment.py) unless the CPU
path leaves them to torch (`crop_only`). Eval: decode, resize the shorter side as torchvision
(presets.eval_resize_shape) and a centre crop at torchvision's origin. dali_backend.py builds the
arguments of each pass and runs it.
"""

from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from imagenet_ddp.data.augment import dali_policy
from imagenet_ddp.data.presets import CROP_ASPECT

# data.interpolation in DALI's terms. DALI's cubic is the kernel of torch's antialiased bicubic (Keys'
# a=-0.5, PIL's) read from a 129-point table: up to 3 grey levels from torchvision's (docs/loaders.md).
INTERP_TYPES = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def mixed_decoder_args(cfg, train: bool) -> dict:
    """What nvJPEG (`device="mixed"`) gets: the data.dali_* GPU settings (DataConfig documents each).

    The buffers sized for ImageNet's largest image (nvJPEG's paddings, the hardware decoder's
    preallocation) go to the train decoder only, as in NVIDIA's DALI ResNet-50 example: the val pass
    runs while the next epoch's train pipeline is being built, and a second decoder per GPU holding
    buffers for the largest image would keep that memory for a short pass whose few reallocations
    cost little."""
    args = {
        "hw_decoder_load": cfg.dali_hw_decoder_load,
        # libjpeg-turbo's (the CPU decoder's, and PIL's) chroma upsampling: GPU evaluation then decodes
        # like the CPU path and predict.py --evaluate.
        "jpeg_fancy_upsampling": True,
    }
    if train:
        args |= {
            "device_memory_padding": cfg.dali_device_memory_padding,
            "host_memory_padding": cfg.dali_host_memory_padding,
            "preallocate_width_hint": cfg.dali_preallocate_width_hint,
            "preallocate_height_hint": cfg.dali_preallocate_height_hint,
        }
    return args


@pipeline_def
def pipeline(
    paths,
    index_paths,
    train,
    decoder,
    image_size,
    resize,
    shuffle_buffer,
    crop_only,
    crop_area,
    augment,
    interpolation="bilinear",
    decoder_args=None,
):
    jpegs, cls = fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=["jpg", "cls"],  # the files and index ranges are this rank's share: no DALI sharding
        random_shuffle=train,
        initial_fill=shuffle_buffer,
        dont_use_mmap=True,  # a damaged file then raises an error instead of crashing the process
        missing_component_behavior="error",
        name="reader",
    )
    hints = decoder_args or {}
    interp = {"interp_type": INTERP_TYPES[interpolation], "antialias": True}
    if train:
        images = fn.decoders.image_random_crop(
            jpegs,
            **hints,
            device=decoder,
            output_type=types.RGB,
            random_area=list(crop_area),
            random_aspect_ratio=list(CROP_ASPECT),
            num_attempts=10,
        )
        if not crop_only:
            # Flipping the crop before resizing it is the same as after, and cheaper.
            images = fn.flip(images, horizontal=fn.random.coin_flip())
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, **interp)
            images = dali_policy(images, image_size, augment)
    else:
        # The output size is computed here rather than with resize_shorter, whose scale keeps the
        # unrounded long side: then DALI and torchvision sample the same grid (presets.eval_resize_shape).
        shape = fn.peek_image_shape(jpegs)
        height = fn.cast(shape[0], dtype=types.FLOAT)
        width = fn.cast(shape[1], dtype=types.FLOAT)
        short = dmath.min(height, width)
        images = fn.decoders.image(jpegs, **hints, device=decoder, output_type=types.RGB)
        resized_y, resized_x = dmath.floor(resize * height / short), dmath.floor(resize * width / short)
        images = fn.resize(images, resize_y=resized_y, resize_x=resized_x, **interp)
        # crop_pos 0.5 would round the origin half up: torchvision (presets.center_crop_origin) rounds
        # half to even.
        top, left = center_crop_origin(resized_y, image_size), center_crop_origin(resized_x, image_size)
        start = fn.cast(fn.stack(top, left), dtype=types.INT32)
        images = fn.slice(images, start=start, shape=[image_size, image_size], axis_names="HW")
    # `cls` is ASCII of varying length ("5", "123"); a batch must be one dense tensor.
    return images, fn.pad(cls, fill_value=0)


def center_crop_origin(length, crop: int):
    """presets.center_crop_origin in DALI arithmetic: round((length - crop) / 2), half to even."""
    margin = length - crop
    half = dmath.floor(margin / 2)
    odd_margin = margin - 2 * half  # 0 or 1
    odd_half = half - 2 * dmath.floor(half / 2)
    return half + odd_margin * odd_half  # x.5 goes up to the even neighbour only from an odd half


def built(args: dict, checkpoint: bytes | None):
    pipe = pipeline(**args, checkpoint=checkpoint)
    pipe.build()
    return pipe
