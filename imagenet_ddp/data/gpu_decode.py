"""The torch backend's device decode (data.decode_device=cuda): workers read, the main process decodes.

    torchrun --nproc_per_node=8 train_ddp.py data.backend=torch            # decode_device auto: cuda on GPUs
    torchrun --nproc_per_node=8 train_ddp.py data.backend=torch data.decode_device=cpu   # decode in workers

The DataLoader workers read each sample's JPEG bytes and label, and draw its train crop box, flip
and policy seed from the JPEG header with the same generator calls as the worker-decode path
(torch_backend.ShardSamples._draws): a pass is the same pure function of (seed, epoch, rank,
reader), with the same crops. `collate` packs a batch's files end to end in one uint8 tensor
(one shared-memory block per batch, not one per image). The main process decodes the batch with
torchvision.io.decode_jpeg(list, device=...): nvJPEG's batched decoder on a CUDA device. Then
per image on that device: train: resized_crop to the box (antialiased), flip, the policy
(torchvision v2 on the tensor, seeded per image as on the CPU path); eval: resize to
presets.eval_resize_shape, centre crop at presets.center_crop_origin. The batch is normalized
with presets.to_model_input, as the worker path's.

decode_device names where decoding runs, not the hardware: "cuda" is this main-process path on
the loader's `device`. On a CPU device it runs the same code with libjpeg-turbo standing in for
nvJPEG (the tests' stand-in): the same decoder and ops as the workers', so the same pixels.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from imagenet_ddp.data.augment import TorchPolicy
from imagenet_ddp.data.presets import (
    center_crop_origin,
    eval_resize_shape,
    one_thread,
    to_model_input,
)
from imagenet_ddp.errors import UserError

NO_BOX = (0, 0, 0, 0)

# One sample as a worker yields it: JPEG bytes (empty for a padding sample or one skipped by
# iter_from), label, train crop box (top, left, h, w), flip, policy seed, "shard PATH, sample KEY".
Encoded = tuple[memoryview | bytes, int, tuple[int, int, int, int], bool, int, str]


def resolve(decode_device: str, device: torch.device) -> str:
    """data.decode_device with "auto" resolved: "cuda" on a CUDA device, else "cpu"."""
    if decode_device == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    return decode_device


@dataclass
class JpegBatch:
    """A batch of undecoded samples, as the workers hand it to the main process."""

    data: torch.Tensor  # uint8 [total]: the batch's JPEG files end to end
    sizes: torch.Tensor  # int64 [B]: bytes of each file in `data` (0: nothing to decode)
    labels: torch.Tensor  # int64 [B]
    boxes: torch.Tensor  # int64 [B, 4]: train crop (top, left, h, w)
    flips: torch.Tensor  # bool [B]
    seeds: torch.Tensor  # int64 [B]: policy seeds (0 without a policy)
    where: list[str]


def collate(samples: list[Encoded]) -> JpegBatch:
    """DataLoader collate_fn of the device-decode path (runs in the workers)."""
    data, labels, boxes, flips, seeds, where = zip(*samples, strict=True)
    joined = bytearray().join(data)
    return JpegBatch(
        data=torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8),
        sizes=torch.tensor([len(d) for d in data], dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        boxes=torch.tensor(boxes, dtype=torch.int64).view(-1, 4),
        flips=torch.tensor(flips, dtype=torch.bool),
        seeds=torch.tensor(seeds, dtype=torch.int64),
        where=list(where),
    )


class DeviceDecoder:
    """JpegBatch -> (normalized float images [B,3,S,S] on `device`, int64 labels on `device`)."""

    def __init__(
        self,
        *,
        device: torch.device,
        channels_last: bool,
        eval_size: int,
        eval_resize: int,
        policy: TorchPolicy | None,
    ):
        self.device, self.channels_last = device, channels_last
        self.eval_size, self.eval_resize, self.policy = eval_size, eval_resize, policy
        self._stream = None  # CUDA: the stream the batches are decoded and preprocessed on

    def __call__(self, batch: JpegBatch, train_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`train_size`: the train crop side this epoch; None for an eval batch."""
        labels = batch.labels.to(self.device, non_blocking=True)
        if self.device.type != "cuda":
            with one_thread(self.device):
                return self._images(batch, train_size), labels
        # torchvision's CUDA decoder allocates its output on the caller's stream but writes it from
        # a stream of its own that does not wait for the caller's (pytorch/vision#9606): on the
        # training stream it could overwrite a freed block that queued training kernels still
        # read. On a stream of ours, after its previous work is done (this batch's preprocessing,
        # not the training), every block it can get is free.
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.synchronize()
        with torch.cuda.stream(self._stream):
            images = self._images(batch, train_size)
        training = torch.cuda.current_stream(self.device)
        training.wait_stream(self._stream)
        images.record_stream(training)  # not reused by our stream until the training used it
        return images, labels

    def _images(self, batch: JpegBatch, train_size: int | None) -> torch.Tensor:
        side = self.eval_size if train_size is None else train_size
        out = torch.zeros(len(batch.labels), 3, side, side, dtype=torch.uint8, device=self.device)
        real = [i for i, size in enumerate(batch.sizes.tolist()) if size]  # eval padding stays 0
        files = batch.data.split(batch.sizes.tolist())
        images = decode([files[i] for i in real], [batch.where[i] for i in real], self.device)
        boxes, flips, seeds = batch.boxes.tolist(), batch.flips.tolist(), batch.seeds.tolist()
        for i, image in zip(real, images, strict=True):
            if train_size is None:
                out[i] = self._eval(image)
            else:
                out[i] = self._train(image, boxes[i], flips[i], seeds[i], train_size, batch.where[i])
        return to_model_input(out, self.device, self.channels_last)

    def _train(self, image, box, flip, seed, size, where) -> torch.Tensor:
        top, left, h, w = box
        if top + h > image.shape[1] or left + w > image.shape[2]:  # the header's size was not the image's
            raise UserError(f"{where}: its JPEG header says another size than its decoded image")
        image = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        image = F.horizontal_flip(image) if flip else image
        return image if self.policy is None else self.policy.on_tensor(image, seed)

    def _eval(self, image: torch.Tensor) -> torch.Tensor:
        h, w = eval_resize_shape(image.shape[1], image.shape[2], self.eval_resize)
        image = F.resize(image, [h, w], antialias=True)
        crop = self.eval_size
        return F.crop(image, center_crop_origin(h, crop), center_crop_origin(w, crop), crop, crop)


def decode(files: list[torch.Tensor], where: list[str], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 [3,H,W] images on `device`, from 1-D uint8 CPU tensors of JPEG files: one batched
    call (nvJPEG on CUDA). On failure, the files are decoded one by one to name the bad one."""
    if not files:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for torchcodec (see torch_backend._decode).
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        try:
            return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        for file, name in zip(files, where, strict=True):
            try:
                decode_jpeg(file, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                reason = re.sub(r"^.*\.cpp:\d+, ", "", str(e).strip().splitlines()[0])  # no C++ location
                raise UserError(f"{name}: cannot decode its JPEG ({reason})") from None
        raise UserError(f"{where[0]} and the rest of its batch: the batched JPEG decoder failed")
