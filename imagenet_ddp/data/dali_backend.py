"""The `dali` backend: NVIDIA DALI reads the shards through their index files and decodes.

    build_loader(DataConfig(backend="dali", workers=8), "train", rank=rank, world_size=world_size,
                 device=torch.device("cuda", local_rank), seed=seed)

On a CUDA device the JPEGs are decoded by nvJPEG (`device="mixed"`), flipped and resized on the
GPU. On a CPU device DALI runs on `workers` CPU threads (`device_id=None`): it reads and decodes
only the random crop's region; torch then resizes, flips and normalizes (see _resize_crops).

Ranks are DALI shards (`shard_id=rank, num_shards=world_size`, the GLOBAL rank): DALI splits the
samples, not the files, so any file count serves any world size (see plan.py).

Epoch order: each pass builds a new pipeline whose file order is the epoch's permutation (the one
the torch backend uses) and whose seed is derived from (seed, epoch, rank); the pass stops after
exactly len(loader) batches. DALI's shuffle buffer (`shuffle_buffer` samples) draws only from the
current pass over the rank's share, so a train epoch is a permutation of the share less the
few samples still in the buffer at its end, as with the torch backend. Building costs well under
a second per epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
import torchvision.transforms.v2.functional as F
from nvidia.dali import __version__ as dali_version
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from imagenet_ddp.data import plan
from imagenet_ddp.data.base import Loader, shard_loader_fields
from imagenet_ddp.data.presets import (
    CROP_AREA,
    CROP_ASPECT,
    PAD_LABEL,
    eval_resize_size,
    normalize_into,
    one_thread,
    parse_ascii_labels,
    to_model_input,
)
from imagenet_ddp.data.shardset import ShardSplit
from imagenet_ddp.errors import UserError


@pipeline_def
def _pipeline(
    paths,
    index_paths,
    rank,
    world_size,
    train,
    decoder,
    image_size,
    resize,
    shuffle_buffer,
    crop_only,
    crop_area,
):
    jpegs, cls = fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=["jpg", "cls"],
        shard_id=rank,
        num_shards=world_size,
        stick_to_shard=True,  # the file order already changes each epoch (a new pipeline each pass)
        random_shuffle=train,
        initial_fill=shuffle_buffer,
        dont_use_mmap=True,  # a damaged file then raises an error instead of crashing the process
        missing_component_behavior="error",
        name="reader",
    )
    if train:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decoder,
            output_type=types.RGB,
            random_area=list(crop_area),
            random_aspect_ratio=list(CROP_ASPECT),
            num_attempts=10,
        )
        if not crop_only:
            # Flipping the crop before resizing it is the same as after, and cheaper.
            images = fn.flip(images, horizontal=fn.random.coin_flip())
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True)
    else:
        # The output size is computed here rather than with resize_shorter, whose scale keeps the
        # unrounded long side: then DALI and torchvision sample the same grid (presets.eval_resize_shape).
        shape = fn.peek_image_shape(jpegs)
        height = fn.cast(shape[0], dtype=types.FLOAT)
        width = fn.cast(shape[1], dtype=types.FLOAT)
        short = dmath.min(height, width)
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.resize(
            images,
            resize_y=dmath.floor(resize * height / short),
            resize_x=dmath.floor(resize * width / short),
            antialias=True,
        )
        images = fn.crop(images, crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5)
    # `cls` is ASCII of varying length ("5", "123"); a batch must be one dense tensor.
    return images, fn.pad(cls, fill_value=0)


class DaliLoader(Loader):
    def __init__(self, cfg, shards: ShardSplit, *, rank, world_size, device, seed, train):
        super().__init__(
            **shard_loader_fields(shards, world_size=world_size, batch_size=cfg.batch_size, train=train)
        )
        self.cfg, self.shards, self.device = cfg, shards, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sizes = [s.num_samples for s in shards.shards]
        self.image_size = cfg.image_size if train else cfg.eval_size
        self.crop_only = train and device.type != "cuda"  # DALI crops, torch flips and resizes
        self._pipe, self._done, self._saved = None, 0, None

    def _order(self) -> list[int]:
        if not self.train:
            return list(range(len(self.sizes)))
        return plan.epoch_layout(len(self.sizes), self.num_samples, self.seed, self.epoch)[0]

    def _pipeline_args(self, order: list[int]) -> tuple[dict, str]:
        """The pass's pipeline arguments, and their digest: DALI restores a checkpoint into a pipeline
        of other arguments without a word (and then yields other samples), so the digest guards it."""
        cuda = self.device.type == "cuda"
        files = [self.shards.shards[i] for i in order]
        args = dict(
            paths=[str(s.path) for s in files],
            index_paths=[str(s.index_path) for s in files],
            rank=self.rank,
            world_size=self.world_size,
            train=self.train,
            decoder="mixed" if cuda else "cpu",
            image_size=self.image_size,
            resize=eval_resize_size(self.cfg.eval_size, self.cfg.eval_crop_ratio),
            shuffle_buffer=self.cfg.shuffle_buffer,
            crop_only=self.crop_only,
            crop_area=(self.cfg.crop_area_min, CROP_AREA[1]),
            batch_size=self.batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=_cuda_index(self.device) if cuda else None,
            seed=plan.derive_seed(self.seed, self.epoch, self.rank),
            prefetch_queue_depth=2,
            enable_checkpointing=self.train,
        )
        # Not in it: where the shards are (staged to node-local disk by many jobs) and what does not
        # change the samples or the random draws (threads, device, queue depth).
        stable = {k: v for k, v in args.items() if k not in _NOT_IN_STATE}
        stable["shards"] = [(s.path.name, s.num_samples) for s in files]
        stable["dali"] = dali_version
        return args, hashlib.sha256(repr(sorted(stable.items())).encode()).hexdigest()

    def iter_from(self, batch: int):
        saved, self._saved = self._saved, None
        self.close()
        key = self._pipeline_args(self._order())[1]
        where = (saved.get("epoch"), saved.get("batch"), saved.get("key")) if saved else None
        self.restored = where == (self.epoch, batch, key)
        self._running = self._batches(batch, saved["dali"] if self.restored else None)
        return self._running

    def state_dict(self) -> dict:
        if self._pipe is None or not self.train:
            return {}
        # The reader's position and the random generators' states after the last batch handed
        # out (not the ones DALI prefetched): ~500 bytes, whatever the shuffle buffer holds.
        key = self._pipeline_args(self._order())[1]
        return {"epoch": self.epoch, "batch": self._done, "key": key, "dali": self._pipe.checkpoint()}

    def load_state_dict(self, state: dict) -> None:
        self._saved = dict(state) if state else None

    def _batches(self, start: int = 0, checkpoint: bytes | None = None):
        order = self._order()
        lo, hi = plan.rank_range(self.num_samples, self.rank, self.world_size)
        if hi == lo:  # more ranks than eval samples: this rank only pads
            yield from itertools.islice(self._padding_only(), start, None)
            return
        pipe = None
        try:
            args = self._pipeline_args(order)[0]
            try:
                pipe = _built(args, checkpoint)
            except RuntimeError as e:
                if checkpoint is None:
                    raise self._read_error(e, order) from None
                warnings.warn(f"DALI could not restore its checkpoint ({_dali_reason(str(e))}): replaying")
                checkpoint, self.restored = None, False
                pipe = self._guarded(lambda: _built(args, None), order)
            if checkpoint is None:
                for _ in range(start):  # replay: DALI reads and decodes them again, torch skips its part
                    self._guarded(pipe.run, order)
            self._pipe, self._done = pipe, start
            for step in range(start, self.steps):
                images, labels = self._guarded(pipe.run, order)
                self._done = step + 1
                yield self._to_torch(images, labels, step)
        finally:
            self._pipe = None
            del pipe  # stops the pipeline's threads now rather than at garbage collection

    def _to_torch(self, images, labels, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.image_size
        if self.crop_only:
            memory = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
            x = torch.empty((self.batch_size, 3, s, s), memory_format=memory)
            # The flips are a function of (seed, epoch, rank, step), as DALI's own would be.
            flips = torch.Generator().manual_seed(plan.derive_seed(self.seed, self.epoch, self.rank, step))
            with one_thread(self.device):
                _resize_crops(images, torch.rand(self.batch_size, generator=flips) < 0.5, x)
        else:
            out = torch.empty((self.batch_size, s, s, 3), dtype=torch.uint8, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
            # NHWC memory seen as NCHW is channels_last already: no copy when that is what is asked.
            x = to_model_input(out.permute(0, 3, 1, 2), self.device, self.cfg.channels_last)
        try:
            y = parse_ascii_labels(torch.from_numpy(np.array(labels.as_tensor())))
        except ValueError as e:
            raise UserError(f"{self.shards.dir}: {e}") from None
        if int(y.max()) >= self.num_classes:
            raise UserError(f"{self.shards.dir}: class index {int(y.max())} is not in the manifest's classes")
        if not self.train:
            # The reader continues past this rank's samples to fill the last batch: mark those.
            valid = plan.eval_valid_count(self.num_samples, self.rank, self.world_size, self.batch_size, step)
            y[valid:] = PAD_LABEL
        return x, y.to(self.device, non_blocking=True)

    def _padding_only(self):
        s = self.image_size
        images = torch.zeros((self.batch_size, 3, s, s), dtype=torch.uint8)
        labels = torch.full((self.batch_size,), PAD_LABEL, dtype=torch.int64)
        for _ in range(self.steps):
            yield to_model_input(images, self.device, self.cfg.channels_last), labels.to(self.device)

    def _guarded(self, call, order: list[int]):
        try:
            return call()
        except RuntimeError as e:  # how DALI reports any failure of a pipeline
            raise self._read_error(e, order) from None

    def _read_error(self, error: RuntimeError, order: list[int]) -> UserError:
        """Name the damaged shard: DALI's own message often names no file (or the wrong one)."""
        mine = plan.rank_shards(self.sizes, order, self.rank, self.world_size)
        bad = self.shards.find_corrupt([self.shards.shards[i] for i in mine])
        detail = _dali_reason(str(error))
        if bad is not None:
            return UserError(
                f"shard {bad.path} is damaged (its sha256 differs from {self.shards.dir}/manifest.json): "
                f"re-run make_shards.py; DALI said: {detail}"
            )
        return UserError(
            f"DALI failed reading {self.shards.dir} (rank {self.rank}): {detail}; "
            f"check the shards with: python make_shards.py verify {self.shards.dir}"
        )


def _resize_crops(crops, flips: torch.Tensor, out: torch.Tensor) -> None:
    """Resize DALI's variable-size HWC crops, flip them where `flips`, normalize into `out` [B,3,S,S].

    CPU ms per 224 px train image on this project's 2-core test machine: DALI decodes the crop in
    0.8, but its resize costs 1.0 and its flip of the crop 0.1. Here, torchvision's uint8
    antialiased resize (the torch backend's) takes 0.2, flipping the small result 0.01, and
    normalizing it while it is in cache 0.05 (against 0.25 for the whole batch afterwards). This
    runs in the calling thread while DALI's threads decode the next batch.
    """
    size = list(out.shape[2:])
    for i in range(out.shape[0]):
        crop = torch.from_numpy(np.asarray(crops[i])).permute(2, 0, 1)  # a view of DALI's buffer
        image = F.resize(crop, size, antialias=True)
        normalize_into(F.horizontal_flip(image) if flips[i] else image, out[i])


_NOT_IN_STATE = ("paths", "index_paths", "num_threads", "device_id", "prefetch_queue_depth")


def _built(args: dict, checkpoint: bytes | None):
    pipe = _pipeline(**args, checkpoint=checkpoint)
    pipe.build()
    return pipe


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _dali_reason(message: str) -> str:
    """The operator and cause from DALI's multi-line error (which also quotes our source code)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    where = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    after = lines.index("encountered:") + 1 if "encountered:" in lines else None
    cause = lines[after] if after is not None and after < len(lines) else (lines[0] if lines else "")
    return f"{where}: {cause}" if where else cause
