"""The torch backend's device decode (data.decode_device=cuda): workers read, a decode thread decodes.

    torchrun --nproc_per_node=8 train_ddp.py data.backend=torch            # decode_device auto: cuda on GPUs
    torchrun --nproc_per_node=8 train_ddp.py data.backend=torch data.decode_device=cpu   # decode in workers

The DataLoader workers read each sample's JPEG bytes and label, and draw its train crop box, flip
and policy seed from the JPEG header with the same generator calls as the worker-decode path
(torch_backend.ShardSamples._draws): a pass is the same pure function of (seed, epoch, rank,
reader), with the same crops. `collate` packs a batch's files end to end in one uint8 tensor
(one shared-memory block per batch, not one per image).

A thread of the training process (`DeviceDecoder.ahead`) takes the batches from the workers and
prepares batch N+1 (and N+2) on a CUDA stream of its own while the training thread runs step N: one
batched decode (jpeg.decode_many: nvJPEG), then per image only the crop's conversion to float and
one antialiased resample of the crop box (data.interpolation: bilinear or bicubic) to the output size (torch's kernel); per batch,
one flip of the mirrored images, one rounding to whole grey levels, the normalization
(presets.to_model_input). A bounded queue (`prefetch` batches) holds what is ready; the training
stream waits for each batch's event, not the host. torch's ops release the GIL, so the two threads
overlap on the host too. Eval batches: each image resized to presets.eval_resize_shape, centre
crop at presets.center_crop_origin. With a policy (data.auto_augment), policy_batch.BatchPolicy runs
torchvision's ops on the whole batch, each image's drawn from its own seed as on the CPU path.

Pixels: the worker path resizes uint8 images with torch's fixed-point kernel, this path resamples
float32 and rounds once: within one grey level of each other (tests/test_gpu_decode.py).

decode_device names where decoding runs, not the hardware: "cuda" is this path on the loader's
`device`. On a CPU device it runs the same code, thread and queue included, with libjpeg-turbo
standing in for nvJPEG (the tests' stand-in).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as NF

from imagenet_ddp.data import jpeg
from imagenet_ddp.data.augment import TorchPolicy
from imagenet_ddp.data.policy_batch import BatchPolicy
from imagenet_ddp.data.presets import (
    center_crop_origin,
    eval_resize_shape,
    one_thread,
    resized_crop,
    to_model_input,
)
from imagenet_ddp.errors import UserError

NO_BOX = (0, 0, 0, 0)
PREFETCH = 2  # batches prepared ahead of the one in use: decode N+1 while N trains, N+2 queued

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
        interpolation: str = "bilinear",
        prefetch: int = PREFETCH,
    ):
        self.device, self.channels_last, self.interpolation = device, channels_last, interpolation
        self.eval_size, self.eval_resize, self.policy = eval_size, eval_resize, policy
        self.prefetch = prefetch  # 0: decode in the caller's thread, when asked (no thread)
        self.batch_policy = BatchPolicy(policy) if policy is not None else None
        self._stream = None  # CUDA: the stream the batches are decoded and preprocessed on

    def ahead(self, batches: Iterator[JpegBatch], train_size: int | None, skip: int = 0) -> Iterator:
        """(images, labels) of `batches`, prepared `prefetch` batches ahead in a thread of their own.
        The first `skip` batches are not decoded: (empty tensor, labels) stand for them (iter_from)."""
        if self.prefetch == 0:
            for n, batch in enumerate(batches):
                yield (
                    (torch.empty(0), batch.labels)
                    if n < skip
                    else self.ready(self.prepare(batch, train_size))
                )
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.05)
                    return True
            return False

        def work() -> None:
            try:
                for n, batch in enumerate(batches):
                    item = (
                        (torch.empty(0), batch.labels, None) if n < skip else self.prepare(batch, train_size)
                    )
                    if not put(item):
                        return
                put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
                put(e)

        thread = threading.Thread(target=work, name="decode-ahead", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield self.ready(item)
        finally:
            stop.set()
            thread.join()  # after the batch it is decoding, if any; then the workers may go

    def __call__(self, batch: JpegBatch, train_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch prepared in the caller's thread (`train_size`: this epoch's crop side; None: eval)."""
        return self.ready(self.prepare(batch, train_size))

    def prepare(self, batch: JpegBatch, train_size: int | None):
        """(images, labels, event): the batch on the decode stream, `event` recorded after it (CUDA)."""
        if self.device.type != "cuda":
            with one_thread(self.device):
                return self._images(batch, train_size), batch.labels, None
        # torchvision's CUDA decoder allocates its output on the caller's stream but writes it from
        # a stream of its own that does not wait for the caller's (pytorch/vision#9606): on the
        # training stream it could overwrite a freed block that queued training kernels still
        # read. On a stream of ours, after its previous work is done (the last batch's preprocessing,
        # not the training), every block it can get is free. The wait is this thread's alone.
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device):
            self._stream.synchronize()
            with torch.cuda.stream(self._stream):
                images = self._images(batch, train_size)
                labels = batch.labels.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        return images, labels, event

    def ready(self, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        """A prepared batch for the training stream: it waits for the batch's event (the host does not)."""
        images, labels, event = prepared
        if event is not None:
            training = torch.cuda.current_stream(self.device)
            training.wait_event(event)
            for t in (images, labels):  # not reused by the decode stream until the training used it
                t.record_stream(training)
        return images, labels

    def _images(self, batch: JpegBatch, train_size: int | None) -> torch.Tensor:
        side = self.eval_size if train_size is None else train_size
        sizes = batch.sizes.tolist()
        real = [i for i, size in enumerate(sizes) if size]  # eval padding stays 0
        files = batch.data.split(sizes)
        images = decode([files[i] for i in real], [batch.where[i] for i in real], self.device)
        if train_size is None:
            resized = [self._eval(image) for image in images]
        else:
            boxes = batch.boxes.tolist()
            resized = [
                self._crop(image, boxes[i], side, batch.where[i])
                for i, image in zip(real, images, strict=True)
            ]
        if not resized:  # padding alone
            return to_model_input(self._padded(len(sizes), side), self.device, self.channels_last)
        stacked = torch.cat(resized)
        flips = batch.flips[real]
        if train_size is not None and bool(flips.any()):
            mirrored = flips.nonzero().view(-1).to(self.device, non_blocking=True)  # the mirrored images only
            stacked.index_copy_(0, mirrored, stacked.index_select(0, mirrored).flip(3))
        if stacked.is_floating_point():
            stacked = stacked.round_().clamp_(0, 255)  # whole grey levels, as a uint8 image holds
        if self.policy is not None and train_size is not None:  # each image's own draws, ops by group
            seeds = batch.seeds.tolist()
            stacked = self.batch_policy(stacked.to(torch.uint8), [seeds[i] for i in real])
        if len(real) == len(sizes):
            return to_model_input(stacked, self.device, self.channels_last)
        out = self._padded(len(sizes), side)
        out.index_copy_(0, torch.tensor(real).to(self.device, non_blocking=True), stacked.to(out.dtype))
        return to_model_input(out, self.device, self.channels_last)

    def _padded(self, count: int, side: int) -> torch.Tensor:
        """A batch of black images (padding samples stay so; real ones are copied in)."""
        return torch.zeros(count, 3, side, side, device=self.device, dtype=_resample_dtype(self.device))

    def _crop(self, image: torch.Tensor, box, size: int, where: str) -> torch.Tensor:
        """[1,3,size,size]: the crop box resampled, antialiased where it shrinks (torchvision's
        resized_crop; float32 on CUDA, see _resample_dtype)."""
        top, left, h, w = box
        if top + h > image.shape[1] or left + w > image.shape[2]:  # the header's size was not the image's
            raise UserError(f"{where}: its JPEG header says another size than its decoded image")
        if image.device.type == "cpu":  # the worker path's own resize (uint8, channels-last memory)
            return resized_crop(image, top, left, h, w, size, self.interpolation)[None]
        crop = image[None, :, top : top + h, left : left + w].float()
        # Bicubic overshoots below 0 and above 255: the batch is clamped once, in _images.
        return NF.interpolate(
            crop, size=(size, size), mode=self.interpolation, antialias=True, align_corners=False
        )

    def _eval(self, image: torch.Tensor) -> torch.Tensor:
        h, w = eval_resize_shape(image.shape[1], image.shape[2], self.eval_resize)
        image = NF.interpolate(
            image[None].to(_resample_dtype(image.device)),
            size=(h, w),
            mode=self.interpolation,
            antialias=True,
            align_corners=False,
        )
        crop = self.eval_size
        top, left = center_crop_origin(h, crop), center_crop_origin(w, crop)
        return image[:, :, top : top + crop, left : left + crop]


def _resample_dtype(device: torch.device) -> torch.dtype:
    """What torch's antialiased bilinear kernel takes on `device`: float32 on CUDA (one conversion per
    crop, one rounding per batch); uint8 on a CPU, its fixed-point kernel (torchvision's, as on the
    worker path: the stand-in's pixels are the worker path's, and it costs less CPU time)."""
    return torch.uint8 if device.type == "cpu" else torch.float32


def decode(files: list[torch.Tensor], where: list[str], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 [3,H,W] images on `device`, from 1-D uint8 CPU tensors of JPEG files: one batched
    call (nvJPEG on CUDA). On failure, the files are decoded one by one to name the bad one; when
    each decodes alone, the batched call's own error is raised (a device failure, not the data)."""
    if not files:
        return []
    try:
        return jpeg.decode_many(files, device)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:
        first = e
    for file, name in zip(files, where, strict=True):
        try:
            jpeg.decode_many([file], device)
        except RuntimeError as e:
            raise UserError(f"{name}: cannot decode its JPEG ({jpeg.reason(e)})") from None
    raise RuntimeError(
        f"{where[0]} and the rest of its batch: the batched JPEG decoder failed, yet each file decodes "
        f"alone ({jpeg.reason(first)})"
    ) from first
