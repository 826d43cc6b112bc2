"""The `torch` backend: shard reading, decoding and cropping in DataLoader worker processes.

    build_loader(DataConfig(backend="torch", workers=8), "train", rank=rank, world_size=world_size, ...)

Each worker reads its share of the rank's samples through the shards' DALI index files (one read
per sample, no tar parsing), shuffles them in a buffer, decodes with libjpeg-turbo (TorchCodec, or
torchvision.io where it is missing: jpeg.py; DALI's CPU decoder is libjpeg-turbo too) and crops to
uint8. Normalization happens on the device. With data.decode_device=cuda (the default on a CUDA
device) the workers only read the JPEG bytes and draw the crops, and a thread of the training
process decodes each batch on the device (nvJPEG) and crops there, a batch or two ahead: see
gpu_decode.py.

Why not webdataset's own pipeline: it splits ranks and workers by whole files, so with uneven
files the ranks get unequal step counts, and with fewer files than ranks x workers some readers
get nothing; validation could not cover every sample exactly once. Splitting by sample (see
plan.py) fixes all three, and it is the split DALI makes, so both backends agree.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Iterator

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imagenet_ddp.data import gpu_decode, jpeg, plan
from imagenet_ddp.data.augment import torch_policy
from imagenet_ddp.data.base import Loader, shard_loader_fields
from imagenet_ddp.data.presets import (
    PAD_LABEL,
    center_crop_origin,
    eval_resize,
    eval_resize_shape,
    interpolation,
    random_resized_crop_box,
    resized_crop,
    to_model_input,
    train_size,
)
from imagenet_ddp.data.shardset import SampleIndex, ShardSplit, read_index
from imagenet_ddp.errors import UserError

Sample = tuple[memoryview, int, str]  # jpg bytes, label, "shard PATH, sample KEY" for errors


class ShardSamples(IterableDataset):
    """(uint8 image, label) of one rank, split among DataLoader workers by batch; with
    decode=False, undecoded samples (gpu_decode.Encoded) for the main process to decode."""

    def __init__(
        self, cfg, shards: ShardSplit, *, rank: int, world_size: int, seed: int, train: bool, decode: bool
    ):
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.seed, self.train, self.epoch, self.decode = seed, train, 0, decode
        self.skip = 0  # train batches at the start of the epoch to skip (TorchLoader.iter_from)
        self.sizes = [s.num_samples for s in shards.shards]
        self._indexes: dict[int, SampleIndex] = {}
        self.policy = torch_policy(cfg) if train else None  # after the flip (augment.py)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | gpu_decode.Encoded]:
        info = get_worker_info()
        reader, readers = (info.id, info.num_workers) if info else (0, 1)
        b = self.cfg.batch_size
        if self.train:
            rng = random.Random(plan.derive_seed(self.seed, self.epoch, self.rank, reader))
            pieces = plan.train_pieces(
                self.sizes, self.seed, self.epoch, self.rank, self.world_size, b, reader, readers,
                repeats=self.cfg.repeated_aug,
            )
            # This reader's batches that come before `skip` (round-robin, as in plan.reader_steps):
            # their samples are read and their random crops and flips drawn (so what follows is the
            # uninterrupted pass's), but not decoded; a 1x1 placeholder stands for each image.
            skipped = len(range(reader, self.skip, readers)) * b
            for n, sample in enumerate(_shuffled(self._read(pieces), self.cfg.shuffle_buffer, rng)):
                if not self.decode:  # the same draws from the header; no bytes for a skipped sample
                    box, flip, policy_seed = self._draw_crop(sample, rng)
                    yield b"" if n < skipped else sample[0], sample[1], box, flip, policy_seed, sample[2]
                elif n < skipped:
                    self._draw_crop(sample, rng)
                    yield self._layout(torch.zeros(3, 1, 1, dtype=torch.uint8)), sample[1]
                else:
                    yield self._train_image(sample, rng), sample[1]
            return
        if self.decode:
            pad = self._layout(torch.zeros(3, self.cfg.eval_size, self.cfg.eval_size, dtype=torch.uint8))
            pad = pad, PAD_LABEL
        else:
            pad = b"", PAD_LABEL, gpu_decode.NO_BOX, False, 0, "padding"
        for pieces in plan.eval_batches(self.sizes, self.rank, self.world_size, b, reader, readers):
            count = 0
            for sample in self._read(pieces):
                count += 1
                if self.decode:
                    yield self._eval_image(sample), sample[1]
                else:
                    yield sample[0], sample[1], gpu_decode.NO_BOX, False, 0, sample[2]
            for _ in range(b - count):
                yield pad

    def _draws(
        self, rng: random.Random, height: int, width: int
    ) -> tuple[tuple[int, int, int, int], bool, int]:
        """A train image's random crop box (top, left, h, w), flip and seed of its augmentation policy
        (0 without one), in the order they are drawn. The policy's own draws come from that seed:
        a skipped image (not decoded) advances `rng` exactly as a decoded one."""
        box, flip = random_resized_crop_box(rng, height, width, self.cfg.crop_area_min), rng.random() < 0.5
        return box, flip, 0 if self.policy is None else rng.getrandbits(63)

    def _train_image(self, sample: Sample, rng: random.Random) -> torch.Tensor:
        image = _decode(sample)
        (top, left, h, w), flip, policy_seed = self._draws(rng, image.shape[1], image.shape[2])
        image = resized_crop(image, top, left, h, w, train_size(self.cfg, self.epoch), interpolation(self.cfg))
        image = F.horizontal_flip(image) if flip else image  # keeps channels-last memory
        return self._layout(image if self.policy is None else self.policy(image, policy_seed))

    def _draw_crop(self, sample: Sample, rng: random.Random) -> tuple[tuple[int, int, int, int], bool, int]:
        """The random draws of _train_image for `sample`, from its JPEG header alone."""
        try:
            with Image.open(io.BytesIO(sample[0])) as image:
                width, height = image.size
        except (OSError, SyntaxError):
            raise UserError(f"{sample[2]}: cannot read its JPEG header") from None
        return self._draws(rng, height, width)

    def _eval_image(self, sample: Sample) -> torch.Tensor:
        image = _decode(sample)
        h, w = eval_resize_shape(image.shape[1], image.shape[2], eval_resize(self.cfg))
        image = F.resize(image, [h, w], interpolation=F.InterpolationMode(interpolation(self.cfg)), antialias=True)
        crop = self.cfg.eval_size
        return self._layout(
            F.crop(image, center_crop_origin(h, crop), center_crop_origin(w, crop), crop, crop)
        )

    def _layout(self, image: torch.Tensor) -> torch.Tensor:
        # Workers emit the memory layout the model asked for ([H,W,3] for channels_last): the
        # transposition then runs in parallel workers, not in the one process that feeds the model.
        return image.permute(1, 2, 0).contiguous() if self.cfg.channels_last else image.contiguous()

    def _read(self, pieces: list[plan.Piece]) -> Iterator[Sample]:
        for piece in pieces:
            shard = self.shards.shards[piece.shard]
            if piece.shard not in self._indexes:
                self._indexes[piece.shard] = read_index(shard)
            index = self._indexes[piece.shard]
            with open(shard.path, "rb", buffering=0) as f:
                for i in range(piece.start, piece.stop):
                    (jpg_at, jpg_size), (cls_at, cls_size) = index.jpg[i].tolist(), index.cls[i].tolist()
                    # jpg and cls are neighbours in the tar: one read covers both.
                    begin, end = min(jpg_at, cls_at), max(jpg_at + jpg_size, cls_at + cls_size)
                    where = f"shard {shard.path}, sample {index.keys[i]}"
                    f.seek(begin)
                    record = bytearray(end - begin)
                    if f.readinto(record) != len(record):
                        raise UserError(f"{where}: file ends early (truncated shard)")
                    try:
                        label = int(record[cls_at - begin : cls_at - begin + cls_size])
                    except ValueError:
                        raise UserError(f"{where}: .cls is not a class index") from None
                    if not 0 <= label < self.shards.num_classes:
                        raise UserError(f"{where}: class index {label} is not in the manifest's classes")
                    yield memoryview(record)[jpg_at - begin : jpg_at - begin + jpg_size], label, where


def _decode(sample: Sample) -> torch.Tensor:
    data, _, where = sample
    try:
        return jpeg.decode(data)
    except RuntimeError as e:
        raise UserError(f"{where}: cannot decode its JPEG ({jpeg.reason(e)})") from None


def _shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A permutation of `items` holding at most `size` of them at a time."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class TorchLoader(Loader):
    def __init__(self, cfg, shards: ShardSplit, *, rank, world_size, device, seed, train):
        super().__init__(
            **shard_loader_fields(
                shards, world_size=world_size, batch_size=cfg.batch_size, train=train, repeats=cfg.repeated_aug
            )
        )
        self.device, self.channels_last, self.cfg = device, cfg.channels_last, cfg
        on_device = gpu_decode.resolve(cfg.decode_device, device) == "cuda"
        self.dataset = ShardSamples(
            cfg, shards, rank=rank, world_size=world_size, seed=seed, train=train, decode=not on_device
        )
        self.decoder = None
        if on_device:  # decode_device=cuda: this process decodes on `device` (the CPU in tests)
            self.decoder = gpu_decode.DeviceDecoder(
                device=device,
                channels_last=cfg.channels_last,
                eval_size=cfg.eval_size,
                eval_resize=eval_resize(cfg),
                interpolation=interpolation(cfg),
                policy=self.dataset.policy,
            )
        self._loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            collate_fn=gpu_decode.collate if on_device else None,
            # Pinned uint8 images go faster to the GPU; JPEG bytes stay on the host (nvJPEG parses them there).
            pin_memory=device.type == "cuda" and not on_device,
            # Fresh workers each epoch: they fork with the current epoch number in the dataset.
            persistent_workers=False,
            prefetch_factor=4 if cfg.workers else None,
            # Its own generator: a DataLoader draws its workers' base seed at each pass from this, by
            # default from the process's global stream, which the model's dropout and drop path use
            # (a resumed run would then draw them differently). The workers seed themselves anyway.
            generator=torch.Generator(),
        )

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = self.epoch
        self._loader.generator.manual_seed(plan.derive_seed(self.dataset.seed, self.epoch, self.dataset.rank))

    def iter_from(self, batch: int):
        # A replay, but the workers only read the skipped batches' samples and draw their random
        # crops (from the JPEG header): ~50x cheaper than decoding them; their placeholders are dropped.
        self.dataset.skip = batch  # (eval passes do not read it)
        try:
            return super().iter_from(batch)  # the workers start (fork) inside, with `skip` set
        finally:
            self.dataset.skip = 0

    def _batches(self):
        skip = self.dataset.skip if self.train else 0  # read as the pass starts (inside iter_from)
        size = train_size(self.cfg, self.epoch) if self.train else None
        batches = iter(self._loader)
        try:
            if self.decoder is not None:  # skipped batches hold no bytes: iter_from drops them undecoded
                yield from self.decoder.ahead(batches, size, skip)
            else:
                for batch in batches:
                    yield self._from_workers(batch)
        except UserError as e:
            # A worker's error arrives wrapped with its traceback; keep the one line meant for the user.
            line = str(e).strip().splitlines()[-1]
            raise UserError(line.removeprefix(f"{UserError.__module__}.UserError: ")) from None
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # at once, rather than whenever the iterator is garbage collected

    def _from_workers(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # [B,H,W,3] memory seen as [B,3,H,W]
        images = to_model_input(images, self.device, self.channels_last)
        return images, labels.to(self.device, non_blocking=True)
