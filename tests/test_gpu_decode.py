"""The torch backend's device decode (data.decode_device=cuda): workers read, the main process decodes.

No GPU here: decode_device=cuda on a CPU device runs the same main-process path, libjpeg-turbo
standing in for nvJPEG. The loader contract tests in test_loaders.py run it too (TORCH_ON_DEVICE);
these check that it makes the worker-decode path's images, and what only it does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagenet_ddp.data import PAD_LABEL, DataConfig, build_loader, gpu_decode
from imagenet_ddp.data.presets import IMAGENET_STD
from tests.fixtures import make_imagenet_extracted

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 24
GREY_LEVEL = 1 / (255 * max(IMAGENET_STD))  # one grey level, normalized (the smallest step of any channel)
pytestmark = pytest.mark.filterwarnings("ignore:.*readers share files")  # 3 train shards, 2 ranks x 2 readers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 classes, 2 train and 1 val image each, 40 to 120 px, in shards of 16."""
    src = tmp_path_factory.mktemp("source")
    make_imagenet_extracted(
        src, num_classes=NUM_CLASSES, per_class=2, val_per_class=1, bad=False, side_range=(40, 120)
    )
    out = tmp_path_factory.mktemp("shards")
    cmd = [sys.executable, "make_shards.py", "folder", "--src", str(src), "--out", str(out)]
    subprocess.run(cmd + ["--shard-size", "16", "--workers", "1"], cwd=REPO, check=True, capture_output=True)
    return out


def config(root, decode_device, **kw) -> DataConfig:
    args = dict(root=str(root), backend="torch", image_size=32, eval_size=32, batch_size=8, workers=2)
    return DataConfig(**{**args, "decode_device": decode_device, **kw})


def epoch(cfg, split, at=0, **where) -> tuple[torch.Tensor, torch.Tensor]:
    with build_loader(cfg, split, **where) as loader:
        loader.set_epoch(at)
        batches = [(x.clone(), y.clone()) for x, y in loader]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("channels_last", [True, False])
# 24 val samples: 3 ranks of 8 share 3 batches of 8; rank 5 of 7 holds 3, in 2 batches of 3: the second
# is padding alone.
@pytest.mark.parametrize("rank, world_size, batch", [(0, 1, 8), (1, 3, 8), (5, 7, 3)])
def test_eval_images_are_the_worker_decode_paths(shards, channels_last, rank, world_size, batch):
    where, kw = dict(rank=rank, world_size=world_size), dict(channels_last=channels_last, batch_size=batch)
    cpu = epoch(config(shards, "cpu", eval_size=40, **kw), "val", **where)
    device = epoch(config(shards, "cuda", eval_size=40, **kw), "val", **where)
    assert torch.equal(cpu[1], device[1])
    assert torch.equal(cpu[0], device[0])  # the same decoder and ops: the same pixels, padding included
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert device[0].is_contiguous(memory_format=fmt)
    assert (device[1][-batch:] == PAD_LABEL).all() == (world_size == 7)


@pytest.mark.parametrize("at, side", [(0, 16), (2, 24), (5, 32)])
def test_train_images_are_the_worker_decode_paths_at_each_progressive_size(shards, at, side):
    # The same crop boxes and flips (drawn from the JPEG header in the workers), the same resizes.
    ramp = dict(progressive_start_size=16, progressive_end_epoch=4, progressive_step=8)
    where = dict(rank=1, world_size=2, seed=5)
    cpu = epoch(config(shards, "cpu", **ramp), "train", at=at, **where)
    device = epoch(config(shards, "cuda", **ramp), "train", at=at, **where)
    assert device[0].shape[1:] == (3, side, side)
    assert torch.equal(cpu[1], device[1])
    assert float((cpu[0] - device[0]).abs().max()) <= GREY_LEVEL


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet"])
def test_a_policy_draws_the_worker_paths_ops_from_each_images_seed(shards, policy):
    # torchvision v2 on the device tensor instead of on PIL: the same ops and magnitudes for the
    # same seed; PIL's and torch's kernels round differently (rotation edges, blends).
    cpu = epoch(config(shards, "cpu", auto_augment=policy), "train", seed=3)
    device = epoch(config(shards, "cuda", auto_augment=policy), "train", seed=3)
    again = epoch(config(shards, "cuda", auto_augment=policy), "train", seed=3)
    assert torch.equal(cpu[1], device[1]) and torch.equal(device[0], again[0])
    per_image = (cpu[0] - device[0]).abs().flatten(1).mean(1) / GREY_LEVEL
    assert float(per_image.max()) < 4
    none = epoch(config(shards, "cuda"), "train", seed=3)[0]  # the policy does change the images
    assert float((none - device[0]).abs().mean()) > 4 * GREY_LEVEL


def test_a_resumed_pass_decodes_no_batch_before_it(shards, monkeypatch):
    from imagenet_ddp.data import torch_backend

    decoded, decode = [], gpu_decode.decode
    counted = lambda files, *args: decoded.append(len(files)) or decode(files, *args)  # noqa: E731
    monkeypatch.setattr(gpu_decode, "decode", counted)
    monkeypatch.setattr(torch_backend, "_decode", lambda sample: pytest.fail("a worker decoded"))
    cfg = config(shards, "cuda", workers=0)  # workers in this process: the patch reaches them
    with build_loader(cfg, "train") as loader:
        rest = list(loader.iter_from(2))
    assert len(rest) == loader.steps - 2 and decoded == [8] * len(rest)


def test_decode_device_names_the_path(shards):
    """auto: cuda on a CUDA device, else cpu; cuda on a CPU device: the main-process path (stand-in)."""
    assert gpu_decode.resolve("auto", torch.device("cuda", 1)) == "cuda"
    assert gpu_decode.resolve("auto", torch.device("cpu")) == "cpu"
    assert gpu_decode.resolve("cpu", torch.device("cuda")) == "cpu"
    with build_loader(config(shards, "auto"), "val") as loader:
        assert loader.decoder is None
    with build_loader(config(shards, "cuda"), "val") as loader:
        assert loader.decoder is not None
        batch = next(iter(loader._loader))  # what the workers hand over: bytes, not images
        assert isinstance(batch, gpu_decode.JpegBatch) and batch.data.dtype == torch.uint8
        assert int(batch.sizes.sum()) == batch.data.numel() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_images_are_close_to_libjpeg_turbos(shards):
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's: close, not equal.
    cpu = epoch(config(shards, "cpu", eval_size=40), "val")
    cuda = epoch(config(shards, "cuda", eval_size=40), "val", device="cuda")
    assert cuda[0].is_cuda and torch.equal(cpu[1], cuda[1].cpu())
    diff = (cpu[0] - cuda[0].cpu()).abs() / GREY_LEVEL
    assert float(diff.mean()) < 2
