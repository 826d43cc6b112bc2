"""The `dali` backend: NVIDIA DALI reads the shards through their index files and decodes.

    build_loader(DataConfig(backend="dali", workers=8), "train", rank=rank, world_size=world_size,
                 device=torch.device("cuda", local_rank), seed=seed)

On a CUDA device the JPEGs are decoded by nvJPEG (`device="mixed"`), flipped and resized on the
GPU. On a CPU device DALI runs on `workers` CPU threads (`device_id=None`): it reads and decodes
only the random crop's region; torch then resizes, flips and normalizes (see _resize_crops),
unless an augmentation policy (data.auto_augment, augment.py) is on: DALI then flips, resizes and
applies it in the pipeline.

Ranks split the samples, not the files (plan.py, with the GLOBAL rank): each rank's pipeline reads
only the shard files that hold its samples of the pass, the first and last through index files cut
to its range (written to a temporary folder), so any file count serves any world size, a rank opens
~files/world_size shards (not all 1,025 of ImageNet: open-file limits) and parses only their indexes.

Epoch order: each pass builds a new pipeline over the epoch's sample stream (the torch backend's:
shards in the epoch's permutation, rotated) with a seed derived from (seed, epoch, rank); the pass
stops after exactly len(loader) batches. DALI's shuffle buffer (`shuffle_buffer` samples) draws only
from the rank's share, so a train epoch is a permutation of the share less the few samples still in
the buffer at its end, as with the torch backend. The next epoch's train pipeline is built in a
thread as the last batch of a pass is handed out, so its build overlaps validation.

Memory over hundreds of epochs (python -m imagenet_ddp.bench soak): a pass's pipeline leaves
reference cycles (DALI's graph nodes and operator instances) that only a full garbage collection
frees, which Python runs rarely beside torch's hundreds of thousands of long-lived objects, and
DALI's threads leave freed heap in glibc's arenas. Each pass therefore ends with a full collection
and malloc_trim (_release_memory), and the index files cut for earlier epochs are deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import itertools
import os
import resource
import shutil
import tempfile
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from nvidia.dali import __version__ as dali_version
from nvidia.dali.plugin.pytorch import feed_ndarray

from imagenet_ddp.data import plan
from imagenet_ddp.data.augment import settings as augment_settings
from imagenet_ddp.data.base import Loader, shard_loader_fields
from imagenet_ddp.data.dali_graph import built, mixed_decoder_args
from imagenet_ddp.data.presets import (
    CROP_AREA,
    PAD_LABEL,
    eval_resize,
    interpolation,
    normalize_into,
    one_thread,
    parse_ascii_labels,
    to_model_input,
    train_size,
)
from imagenet_ddp.data.shardset import Shard, ShardSplit
from imagenet_ddp.errors import UserError


class DaliLoader(Loader):
    def __init__(self, cfg, shards: ShardSplit, *, rank, world_size, device, seed, train):
        super().__init__(
            **shard_loader_fields(
                shards, world_size=world_size, batch_size=cfg.batch_size, train=train, repeats=cfg.repeated_aug
            )
        )
        self.cfg, self.shards, self.device = cfg, shards, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sizes = [s.num_samples for s in shards.shards]
        # On a CPU device, DALI crops and torch flips and resizes (cheaper, see _resize_crops),
        # unless an augmentation policy runs in the pipeline after the flip and the resize.
        self.crop_only = train and device.type != "cuda" and cfg.auto_augment == "none"
        self._pipe, self._done, self._saved = None, 0, None
        self._next: tuple[str, Future] | None = None  # the next pass's pipeline, being built
        self._next_index_paths: list[str] = []  # what it reads: kept by _forget_cuts
        self._builder: ThreadPoolExecutor | None = None
        self._index_dir: str | None = None  # index files cut to this rank's ranges
        self.ahead = False  # whether the running pass's pipeline was built ahead of it

    @property
    def image_size(self) -> int:
        return self._image_size(self.epoch)

    def _image_size(self, epoch: int) -> int:
        return train_size(self.cfg, epoch) if self.train else self.cfg.eval_size

    def _pieces(self, epoch: int) -> list[plan.Piece]:
        """The samples of this rank's pass over epoch `epoch`, as (shard, start, stop) pieces."""
        lo, hi = plan.rank_range(self.num_samples, self.rank, self.world_size)
        if not self.train:
            return plan.stream_pieces(self.sizes, list(range(len(self.sizes))), 0, lo, hi - lo)
        if self.cfg.repeated_aug > 1:  # exactly the pass's samples: the windows overlap (plan.pass_spans)
            return plan.train_pieces(
                self.sizes, self.seed, epoch, self.rank, self.world_size, self.batch_size,
                repeats=self.cfg.repeated_aug,
            )
        order, offset = plan.epoch_layout(len(self.sizes), self.num_samples, self.seed, epoch)
        return plan.stream_pieces(self.sizes, order, offset, lo, hi - lo)

    def _pipeline_args(self, epoch: int) -> tuple[dict, str]:
        """The pass's pipeline arguments, and their digest: DALI restores a checkpoint into a pipeline
        of other arguments without a word (and then yields other samples), so the digest guards it."""
        cuda = self.device.type == "cuda"
        pieces = self._pieces(epoch)
        augment = augment_settings(self.cfg) if self.train else ("none",)
        args = dict(
            paths=[str(self.shards.shards[p.shard].path) for p in pieces],
            index_paths=[self._index_path(p) for p in pieces],
            train=self.train,
            decoder="mixed" if cuda else "cpu",
            image_size=self._image_size(epoch),
            resize=eval_resize(self.cfg),
            shuffle_buffer=self.cfg.shuffle_buffer,
            crop_only=self.crop_only,
            crop_area=(self.cfg.crop_area_min, CROP_AREA[1]),
            augment=augment,
            interpolation=interpolation(self.cfg),
            decoder_args=mixed_decoder_args(self.cfg, self.train) if cuda else {},
            enable_conditionals=augment != ("none",),  # auto_aug applies ops to samples by `if`
            batch_size=self.batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=_cuda_index(self.device) if cuda else None,
            seed=plan.derive_seed(self.seed, epoch if self.train else 0, self.rank),  # eval: no draws
            prefetch_queue_depth=self.cfg.dali_prefetch_queue_depth,
            enable_checkpointing=self.train,
        )
        # Not in it: where the shards are (staged to node-local disk by many jobs) and what does not
        # change the samples or the random draws (threads, device, queue depth, nvJPEG's settings).
        stable = {k: v for k, v in args.items() if k not in _NOT_IN_STATE}
        stable["shards"] = [(self.shards.shards[p.shard].path.name, p.start, p.stop) for p in pieces]
        stable["dali"] = dali_version
        return args, hashlib.sha256(repr(sorted(stable.items())).encode()).hexdigest()

    def _index_path(self, piece: plan.Piece) -> str:
        """The shard's own index when the piece is the whole shard, else one cut to the piece."""
        shard = self.shards.shards[piece.shard]
        if (piece.start, piece.stop) == (0, shard.num_samples):
            return str(shard.index_path)
        if self._index_dir is None:
            self._index_dir = tempfile.mkdtemp(prefix=f"imagenet-ddp-dali-rank{self.rank}-")
            weakref.finalize(self, shutil.rmtree, self._index_dir, ignore_errors=True)
        path = os.path.join(self._index_dir, f"{shard.index_path.stem}.{piece.start}-{piece.stop}.idx")
        if not os.path.exists(path):
            _write_index_range(shard, piece.start, piece.stop, path)
        return path

    def iter_from(self, batch: int):
        saved, self._saved = self._saved, None
        self.end_pass()
        key = self._pipeline_args(self.epoch)[1]
        where = (saved.get("epoch"), saved.get("batch"), saved.get("key")) if saved else None
        self.restored = where == (self.epoch, batch, key)
        self._running = self._batches(batch, saved["dali"] if self.restored else None)
        return self._running

    def state_dict(self) -> dict:
        if self._pipe is None or not self.train:
            return {}
        # The reader's position and the random generators' states after the last batch handed
        # out (not the ones DALI prefetched): ~500 bytes, whatever the shuffle buffer holds.
        key = self._pipeline_args(self.epoch)[1]
        return {"epoch": self.epoch, "batch": self._done, "key": key, "dali": self._pipe.checkpoint()}

    def load_state_dict(self, state: dict) -> None:
        self._saved = dict(state) if state else None

    def close(self) -> None:
        """End the current pass and drop the pipeline built for the next one (end_pass keeps it)."""
        self.end_pass()
        self._drop_next()

    def _batches(self, start: int = 0, checkpoint: bytes | None = None):
        lo, hi = plan.rank_range(self.num_samples, self.rank, self.world_size)
        if hi == lo:  # more ranks than eval samples: this rank only pads
            yield from itertools.islice(self._padding_only(), start, None)
            return
        pipe = run = args = None
        try:
            args, key = self._pipeline_args(self.epoch)
            pipe = self._take_next(key) if start == 0 and checkpoint is None else None
            self.ahead = pipe is not None
            if pipe is None:
                self._drop_next()
                pipe = self._build(args, checkpoint)
                if pipe is None:  # the checkpoint did not restore
                    checkpoint = None
                    pipe = self._build(args, None)
            run = self._runner(pipe, args["paths"])
            if checkpoint is None:
                for _ in range(start):  # replay: DALI reads and decodes them again, torch skips its part
                    run()
            self._pipe, self._done = pipe, start
            for step in range(start, self.steps):
                images, labels = run()
                self._done = step + 1
                if self._done == self.steps and self.train:  # its build overlaps validation
                    self._prepare_next()
                yield self._to_torch(images, labels, step)
        finally:
            # The pipeline goes now (its threads stop) rather than at garbage collection: `run` holds it too.
            self._pipe = run = pipe = None
            self._forget_cuts(args["index_paths"] if args else [])
            _release_memory()

    def _build(self, args: dict, checkpoint: bytes | None):
        """A built pipeline; None when `checkpoint` does not restore (a warning says why)."""
        _allow_open_files(len(args["paths"]), self.rank)
        try:
            return built(args, checkpoint)
        except RuntimeError as e:
            if checkpoint is None:
                raise self._read_error(e, args["paths"]) from None
            warnings.warn(
                f"DALI could not restore its checkpoint ({_dali_reason(str(e))}): replaying", stacklevel=3
            )
            self.restored = False
            return None

    def _runner(self, pipe, paths: list[str]):
        """pipe.run, its errors named (among `paths`); on a GPU its outputs are ordered on torch's
        current stream, so the host does not wait for them."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return lambda: self._guarded(lambda: pipe.run(stream) if stream is not None else pipe.run(), paths)

    def _prepare_next(self) -> None:
        """Build the next epoch's train pipeline in a thread, if the open-file limit leaves room for
        it beside the running one (it is an optimization: without room, it is built when asked)."""
        args, key = self._pipeline_args(self.epoch + 1)
        self._drop_next()
        if not _allow_open_files(len(args["paths"]), self.rank, strict=False):
            return
        self._builder = self._builder or ThreadPoolExecutor(1, thread_name_prefix="dali-next-pass")
        self._next = key, self._builder.submit(built, args, None)
        self._next_index_paths = args["index_paths"]

    def _forget_cuts(self, in_use: list[str]) -> None:
        """Delete the index files cut for other passes than this one and the next: each train epoch
        cuts its own ranges (its shard order is rotated), so over hundreds of epochs they would pile up."""
        if self._index_dir is None:
            return
        keep = {os.path.basename(p) for p in (*in_use, *self._next_index_paths)}
        for name in os.listdir(self._index_dir):
            if name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self._index_dir, name))

    def _take_next(self, key: str):
        """The pipeline built ahead for this pass, if it was built for these arguments and built well."""
        if self._next is None or self._next[0] != key:
            return None
        future, self._next = self._next[1], None
        try:
            return future.result()
        except RuntimeError:  # built again in the foreground, where its error is explained
            return None

    def _drop_next(self) -> None:
        self._next_index_paths = []
        if self._next is not None:
            future, self._next = self._next[1], None
            if not future.cancel():
                future.exception()  # wait: the pipeline goes now, not with the thread
        if self._builder is not None:
            self._builder.shutdown(wait=True)
            self._builder = None

    def _to_torch(self, images, labels, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.image_size
        if self.crop_only:
            memory = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
            x = torch.empty((self.batch_size, 3, s, s), memory_format=memory)
            # The flips are a function of (seed, epoch, rank, step), as DALI's own would be.
            flips = torch.Generator().manual_seed(plan.derive_seed(self.seed, self.epoch, self.rank, step))
            with one_thread(self.device):
                _resize_crops(images, torch.rand(self.batch_size, generator=flips) < 0.5, x, interpolation(self.cfg))
        else:
            out = torch.empty((self.batch_size, s, s, 3), dtype=torch.uint8, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
            # NHWC memory seen as NCHW is channels_last already: no copy when that is what is asked.
            x = to_model_input(out.permute(0, 3, 1, 2), self.device, self.cfg.channels_last)
        try:
            y = parse_ascii_labels(torch.as_tensor(np.array(labels.as_tensor())))
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

    def _guarded(self, call, paths: list[str]):
        try:
            return call()
        except RuntimeError as e:  # how DALI reports any failure of a pipeline
            raise self._read_error(e, paths) from None

    def _read_error(self, error: RuntimeError, paths: list[str]) -> UserError:
        """One line naming the cause. For a data error (a read or decode failure), the damaged shard
        among `paths` (the pass's), which DALI's own message often does not name (or names wrongly):
        hashing them is worth it only then."""
        detail = _dali_reason(str(error))
        resource_error = next((m for m in _RESOURCE_ERRORS if m in str(error)), None)
        if resource_error == "Too many open files":
            return UserError(
                f"DALI could not open the shards of {self.shards.dir} (rank {self.rank}): too many open files "
                f"(limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}); raise it with `ulimit -n`; DALI said: {detail}"
            )
        if resource_error is not None:
            return UserError(
                f"DALI failed on rank {self.rank} ({resource_error}), not because of the data: {detail}"
            )
        by_path = {str(s.path): s for s in self.shards.shards}
        bad = self.shards.find_corrupt([by_path[p] for p in dict.fromkeys(paths) if p in by_path])
        if bad is not None:
            what = _damage(bad)
            return UserError(
                f"shard {bad.path} {what} ({self.shards.dir}/manifest.json): re-run make_shards.py; DALI said: {detail}"
            )
        return UserError(
            f"DALI failed reading {self.shards.dir} (rank {self.rank}): {detail}; "
            f"check the shards with: python make_shards.py verify {self.shards.dir}"
        )


# DALI failures that say nothing about the shards' bytes: hashing the shards would only delay the answer.
_RESOURCE_ERRORS = (
    "Too many open files",
    "Cannot allocate memory",
    "out of memory",
    "CUDA error",
    "CUDA driver",
    "Permission denied",
    "Resource temporarily unavailable",  # memory refused under an address-space limit (RLIMIT_AS)
    "std::bad_alloc",
)


def _damage(shard) -> str:
    """What is wrong with a shard find_corrupt returned, in a few words."""
    if not shard.path.is_file():
        return "is gone"
    if shard.path.stat().st_size != shard.bytes:
        return f"is {shard.path.stat().st_size} bytes, not the manifest's {shard.bytes}"
    return "is damaged: its sha256 differs from the manifest's"


def _allow_open_files(files: int, rank: int, strict: bool = True) -> bool:
    """Make room for `files` more descriptors (DALI keeps each shard of a pipeline open): raise the
    soft open-file limit towards the hard one. Where the hard limit is too low: a one-line error when
    `strict`, else False."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    needed = in_use + files + 32  # headroom for what the process opens meanwhile (logs, sockets)
    if needed <= soft:
        return True
    if hard != resource.RLIM_INFINITY and needed > hard:
        if not strict:
            return False
        raise UserError(
            f"rank {rank} reads {files} shard files at once, beyond the open-file limit ({soft} soft, "
            f"{hard} hard, {in_use} in use): raise it (`ulimit -n {needed}`; under SLURM, the nodes' "
            "limits.conf or --propagate=NOFILE), run more ranks, or pack larger shards (make_shards.py --shard-size)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    return True


def _write_index_range(shard: Shard, start: int, stop: int, path: str) -> None:
    """A DALI webdataset index (v1.2) of samples [start, stop) of `shard`, written atomically."""
    lines = shard.index_path.read_text().splitlines()
    if not lines or lines[0].split()[:1] != ["v1.2"] or len(lines) - 1 < stop:
        raise UserError(
            f"bad index file {shard.index_path}: expected 'v1.2 {shard.num_samples}' and a line per sample"
        )
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join([f"v1.2 {stop - start}", *lines[1 + start : 1 + stop]]) + "\n")
    os.replace(tmp, path)


def _resize_crops(crops, flips: torch.Tensor, out: torch.Tensor, interpolation: str) -> None:
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
        image = F.resize(crop, size, interpolation=F.InterpolationMode(interpolation), antialias=True)
        normalize_into(F.horizontal_flip(image) if flips[i] else image, out[i])


_NOT_IN_STATE = ("paths", "index_paths", "num_threads", "device_id", "prefetch_queue_depth", "decoder_args")


def _release_memory() -> None:
    """Return a finished pass's memory: a full collection frees the reference cycles its pipeline
    leaves (DALI's graph nodes and operator instances; Python would otherwise collect them only after
    ~25% more long-lived objects, hundreds of passes beside torch), and malloc_trim hands the heap
    freed by DALI's threads back to the system (glibc keeps it in per-thread arenas). ~0.1-0.3 s a pass."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _dali_reason(message: str) -> str:
    """The operator and cause from DALI's multi-line error (which also quotes our source code)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    where = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    after = lines.index("encountered:") + 1 if "encountered:" in lines else None
    cause = lines[after] if after is not None and after < len(lines) else (lines[0] if lines else "")
    return f"{where}: {cause}" if where else cause
