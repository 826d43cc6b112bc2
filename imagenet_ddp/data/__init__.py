"""The loader contract: one factory, three backends (dali, torch, synthetic).

    torchrun --standalone --nproc_per_node=8 train_ddp.py data.root=shards/imagenet data.backend=dali

    loader = build_loader(cfg, "train", rank=rank, world_size=world_size, device=device, seed=seed)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:       # float32 [B,3,H,W] on device, int64 [B]
            ...
    loader.close()

Every backend's loader:
- yields (images, labels): images normalized (ImageNet mean/std) on `device`, channels_last when
  `cfg.channels_last`; labels int64 class indexes;
- has len() = steps per epoch, the same on every rank (unequal counts hang DDP);
- set_epoch(e): the samples and their order in epoch e are a pure function of (seed, e) for a
  given (world_size, cfg); train batches are always full (an epoch drops < world_size x batch
  samples, different ones each epoch; with data.repeated_aug = k, an epoch reads about N / k
  samples, each on k different ranks, at DeiT's length: plan.py);
- eval (split != "train", or train=False): visits every sample of the split exactly once across
  ranks. Batches keep their size; padding samples carry label PAD_LABEL (-100, cross_entropy's
  ignore_index; any negative label works as the test): count real samples as
  (labels >= 0).sum(), and sum that over ranks;
- end_pass(): ends the running pass (its workers or pipeline go; DALI keeps the next epoch's
  pipeline it builds ahead); close() (or `with`): releases everything;
- iter_from(k): the epoch's batches from number k on, for a run resumed mid-epoch: the same
  batches as the uninterrupted pass. state_dict() taken after k batches and given back to
  load_state_dict() lets a backend start there without re-reading the first k (DALI restores
  its reader's checkpoint); otherwise the pass replays them (the torch backend without decoding).

Ranks split a split's samples, not its files (plan.py), with GLOBAL ranks: any number of shard
files serves any world size, with equal steps; fewer files than ranks x readers only warns.

Backends are imported on demand: only `backend="dali"` needs NVIDIA DALI.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from imagenet_ddp.data.base import Loader
from imagenet_ddp.data.presets import INTERPOLATIONS, PAD_LABEL
from imagenet_ddp.errors import UserError

__all__ = ["BACKENDS", "PAD_LABEL", "DataConfig", "Loader", "build_loader"]

BACKENDS = ("dali", "torch", "synthetic")
# nvJPEG's preallocations (bytes, pixels): 0 is allowed (no padding, no hint).
DALI_SIZES = (
    "dali_device_memory_padding",
    "dali_host_memory_padding",
    "dali_preallocate_width_hint",
    "dali_preallocate_height_hint",
)
DALI_INSTALL = "pip install nvidia-dali-cuda130 (or: pip install -e .[dali])"


@dataclass
class DataConfig:
    """The `data` section of a training config."""

    root: str = "shards/imagenet"  # holds <split>/manifest.json and its shards (make_shards.py --out)
    backend: str = "dali"  # dali | torch | synthetic (random tensors, for benchmarks)
    image_size: int = 224  # train crop side (RandomResizedCrop output)
    eval_size: int = 224  # eval crop side; the image is first resized to eval_size / eval_crop_ratio
    eval_crop_ratio: float = 0.875  # 224 / 256, as in the reference ResNet evaluation
    batch_size: int = 256  # per process
    workers: int = 4  # per process: DataLoader worker processes (torch) or CPU threads (dali)
    channels_last: bool = True  # memory format of the images (faster convolutions with AMP)
    shuffle_buffer: int = 1024  # samples each reader holds to shuffle train order (~110 KB each)
    crop_area_min: float = 0.08  # RandomResizedCrop's smallest area fraction (larger for small images)
    # Policy on each train crop after the flip (augment.py): none | ta_wide (TrivialAugmentWide) |
    # ra (RandAugment) | imagenet (AutoAugment's ImageNet policy). torchvision.transforms.v2 on the
    # torch backend, nvidia.dali.auto_aug on the dali one.
    auto_augment: Literal["none", "ta_wide", "ra", "imagenet"] = "none"
    ra_num_ops: int = 2  # RandAugment: ops per image
    ra_magnitude: int = 9  # RandAugment: magnitude bin of 31 (torchvision's scale: timm's m9 is bin 27)
    ra_magnitude_std: float = 0.0  # RandAugment: per image, the bin is drawn from N(magnitude, std) (timm's mstd x 3)
    random_erase: float = 0.0  # probability of torchvision's RandomErasing on each normalized train image
    # Repeated augmentation (DeiT's RASampler, torchvision's --ra-reps): each train sample of an epoch
    # read by this many different ranks, each with its own augmentation; an epoch then covers about
    # 1/repeated_aug of the split at DeiT's epoch length (plan.py). 1: off; at most world_size.
    repeated_aug: int = 1
    eval_resize_size: int = 0  # shorter side before the eval centre crop; 0: round(eval_size / eval_crop_ratio)
    # Filter of the train crop's and the eval image's resize (antialiased), on every backend; the
    # augmentation policies keep their bilinear. None: the model's default (timm's pretrained_cfg,
    # e.g. bicubic for ViTs, EfficientNets), bilinear where it names none.
    interpolation: Literal["bilinear", "bicubic"] | None = None
    # Progressive resizing (FFCV): the train crop side grows from progressive_start_size at epoch
    # progressive_start_epoch to image_size at progressive_end_epoch, rounded to progressive_step; 0: off.
    progressive_start_size: int = 0
    progressive_start_epoch: int = 0  # progressive resizing: the epoch the ramp starts at
    progressive_end_epoch: int = 0  # progressive resizing: the epoch from which crops are image_size
    progressive_step: int = 32  # progressive resizing: crop sides are multiples of this
    # torch backend: where JPEGs are decoded. cuda: the workers only read bytes, the main process
    # decodes each batch with nvJPEG and crops, resizes, flips and normalizes on the GPU (on a CPU
    # device: the same path with the CPU decoder, as the tests run it); auto: cuda on a CUDA device,
    # else cpu (the workers decode with libjpeg-turbo).
    decode_device: Literal["auto", "cpu", "cuda"] = "auto"
    # dali backend on a GPU (nvJPEG, `mixed`); none changes which samples or crops a pass yields.
    # CPU threads per GPU are data.workers (NVIDIA's ResNet-50 examples: 4 to 6).
    dali_hw_decoder_load: float = 0.65  # JPEGs' share for the A100/H100 hardware decoder: DALI's default (MLPerf 0-.99)
    dali_prefetch_queue_depth: int = 2  # batches prepared ahead: DALI's default, its ResNet-50 example's (MLPerf: 3-5)
    dali_device_memory_padding: int = 211_025_920  # nvJPEG GPU buffer bytes: DALI's ResNet-50 example (default 16 MiB)
    dali_host_memory_padding: int = 140_544_512  # nvJPEG's pinned host buffer bytes: the same example (default 8 MiB)
    dali_preallocate_width_hint: int = 5980  # hardware decoder's buffers: ImageNet's widest image; 0: off
    dali_preallocate_height_hint: int = 6430  # hardware decoder's buffers: ImageNet's tallest image; 0: off
    # Node-local copies of the shards (e.g. $SLURM_TMPDIR/shards; variables are expanded on each node):
    # before training, one process per node copies and verifies the shards its ranks will read, and
    # the loaders read them there (data/stage.py, slurm/README.md). None: read data.root only.
    stage_dir: str | None = None
    # Splits scored beside val while training (make_shards.py split folders, e.g.
    # shards/imagenet-v2/matched-frequency; a folder of splits such as shards/imagenet-c: each of them),
    # as predict.py --evaluate scores them: logged as eval/<set>/<split>/top1, top5, real_top1, and eval/<set>/mce.
    extra_eval: list[str] = field(default_factory=list)
    extra_eval_every: int = 0  # epochs between the extra evaluations, which also follow the last epoch; 0: only then

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"data.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        for name in ("image_size", "eval_size", "batch_size", "shuffle_buffer"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"data.{name} must be at least 1, not {getattr(self, name)}")
        if self.workers < 0:
            raise UserError(f"data.workers must be 0 or more, not {self.workers}")
        if not 0 < self.crop_area_min <= 1:
            raise UserError(f"data.crop_area_min must be in (0, 1], not {self.crop_area_min}")
        if not 0 < self.eval_crop_ratio <= 1:
            raise UserError(f"data.eval_crop_ratio must be in (0, 1], not {self.eval_crop_ratio}")
        if self.eval_resize_size and self.eval_resize_size < self.eval_size:
            raise UserError(
                f"data.eval_resize_size ({self.eval_resize_size}) must be at least data.eval_size "
                f"({self.eval_size}), or 0 for eval_size / eval_crop_ratio"
            )
        if not 0 <= self.random_erase <= 1:
            raise UserError(f"data.random_erase is a probability in [0, 1], not {self.random_erase}")
        if self.repeated_aug < 1:
            raise UserError(f"data.repeated_aug must be at least 1 (1: off), not {self.repeated_aug}")
        if self.interpolation not in (None, *INTERPOLATIONS):
            raise UserError(
                f"data.interpolation must be one of {', '.join(INTERPOLATIONS)} (or null), not {self.interpolation!r}"
            )
        if self.extra_eval_every < 0:
            raise UserError(f"data.extra_eval_every must be 0 (after the last epoch only) or more, not {self.extra_eval_every}")
        self._check_augment()
        self._check_dali()
        if self.progressive_start_size:
            self._check_progressive()

    def _check_augment(self) -> None:
        from imagenet_ddp.data.augment import NUM_BINS, POLICIES

        if self.auto_augment not in POLICIES:
            raise UserError(
                f"data.auto_augment must be one of {', '.join(POLICIES)}, not {self.auto_augment!r}"
            )
        if self.ra_num_ops < 1:
            raise UserError(f"data.ra_num_ops must be at least 1 (ops per image), not {self.ra_num_ops}")
        if not 0 <= self.ra_magnitude < NUM_BINS:
            raise UserError(f"data.ra_magnitude is a bin in [0, {NUM_BINS - 1}], not {self.ra_magnitude}")
        if not self.ra_magnitude_std >= 0:
            raise UserError(f"data.ra_magnitude_std must be 0 (off) or more, not {self.ra_magnitude_std}")

    def _check_dali(self) -> None:
        if not 0 <= self.dali_hw_decoder_load <= 1:
            raise UserError(f"data.dali_hw_decoder_load is a share in [0, 1], not {self.dali_hw_decoder_load}")
        if self.dali_prefetch_queue_depth < 1:
            raise UserError(f"data.dali_prefetch_queue_depth must be at least 1, not {self.dali_prefetch_queue_depth}")
        for name in DALI_SIZES:
            if getattr(self, name) < 0:
                raise UserError(f"data.{name} must be 0 or more, not {getattr(self, name)}")

    def _check_progressive(self) -> None:
        if not 0 < self.progressive_start_size <= self.image_size:
            raise UserError(
                f"data.progressive_start_size ({self.progressive_start_size}) must be in (0, data.image_size="
                f"{self.image_size}]: the crop grows to image_size; 0 turns progressive resizing off"
            )
        if not 0 <= self.progressive_start_epoch < self.progressive_end_epoch:
            raise UserError(
                f"data.progressive_start_epoch ({self.progressive_start_epoch}) must be >= 0 and before "
                f"data.progressive_end_epoch ({self.progressive_end_epoch})"
            )
        step = self.progressive_step
        if step < 1 or self.progressive_start_size % step or self.image_size % step:
            raise UserError(
                f"data.progressive_step ({step}) must be >= 1 and divide data.progressive_start_size "
                f"({self.progressive_start_size}) and data.image_size ({self.image_size}): the ramp rounds to it"
            )


def build_loader(
    cfg: DataConfig,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    train: bool | None = None,
) -> Loader:
    """A loader of `split` for global `rank` of `world_size`; train mode defaults to split == "train"."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    device = torch.device(device)
    train = split == "train" if train is None else train
    args = dict(rank=rank, world_size=world_size, device=device, seed=seed, train=train)
    if cfg.backend == "synthetic":
        from imagenet_ddp.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, split, **args)

    from imagenet_ddp.data.shardset import open_split

    shards = open_split(cfg.root, split)
    if cfg.stage_dir:
        from imagenet_ddp.data.stage import use_staged

        shards = use_staged(shards, cfg.stage_dir)
    shards.check_files()
    readers = max(1, cfg.workers) if cfg.backend == "torch" else 1
    if len(shards.shards) < world_size * readers:
        hint = "; more shards shuffle better (make_shards.py --shard-size)" if train else ""
        warnings.warn(
            f"{shards.dir}: {len(shards.shards)} shard files for {world_size} ranks x {readers} readers: "
            f"readers share files (steps stay equal){hint}",
            stacklevel=2,
        )
    if cfg.backend == "torch":
        from imagenet_ddp.data.torch_backend import TorchLoader

        return TorchLoader(cfg, shards, **args)
    try:
        from imagenet_ddp.data.dali_backend import DaliLoader
    except ImportError as e:
        raise UserError(f"data.backend 'dali' needs NVIDIA DALI ({e}): {DALI_INSTALL}") from None
    return DaliLoader(cfg, shards, **args)
