"""The torch backend's device decode (data.decode_device=cuda): workers read, the main process decodes.

No GPU here: decode_device=cuda on a CPU device runs the same main-process path, libjpeg-turbo
standing in for nvJPEG. The loader contract tests in test_loaders.py run it too (TORCH_ON_DEVICE);
these check that it makes the worker-decode path's images, and what only it does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagenet_ddp.data import PAD_LABEL, DataConfig, build_loader, gpu_decode
from imagenet_ddp.data.presets import IMAGENET_STD
from imagenet_ddp.errors import UserError
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


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalized images in grey levels of each channel."""
    return (a - b).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


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
    # The same decoder; uint8 fixed-point resizing there, float32 rounded once here: a grey level at most.
    assert float(grey_levels(cpu[0], device[0]).max()) <= 1.001
    padding = cpu[1] == PAD_LABEL
    assert torch.equal(cpu[0][padding], device[0][padding])
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
    assert float(grey_levels(cpu[0], device[0]).max()) <= 1.001


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet"])
def test_a_policy_draws_the_worker_paths_ops_from_each_images_seed(shards, policy):
    # torchvision v2 on the device tensor instead of on PIL: the same ops and magnitudes for the
    # same seed; PIL's and torch's kernels round differently (rotation edges, blends).
    cpu = epoch(config(shards, "cpu", auto_augment=policy), "train", seed=3)
    device = epoch(config(shards, "cuda", auto_augment=policy), "train", seed=3)
    again = epoch(config(shards, "cuda", auto_augment=policy), "train", seed=3)
    assert torch.equal(cpu[1], device[1]) and torch.equal(device[0], again[0])
    per_image = grey_levels(cpu[0], device[0]).flatten(1).mean(1)
    # Inputs within a grey level (see above) go through the same op at the same magnitude; where an
    # op is a threshold (posterize, solarize, equalize), a level can move a pixel far: a few images.
    assert float(per_image.median()) < 1.5 and float((per_image < 4).float().mean()) >= 0.75, per_image
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


@pytest.mark.parametrize("prefetch", [gpu_decode.PREFETCH, 0])
def test_the_next_batch_is_decoded_while_the_current_one_is_in_use(shards, monkeypatch, prefetch):
    """The decode thread starts batch N+1 before the training releases batch N, and stops `prefetch`
    batches (+1 in hand) ahead. prefetch=0 (no thread, the negative control) decodes only when asked."""
    started, decode = [], gpu_decode.decode
    record = lambda files, where, device: started.append(where[0]) or decode(files, where, device)  # noqa: E731
    monkeypatch.setattr(gpu_decode, "decode", record)
    with build_loader(config(shards, "cuda"), "train") as loader:
        loader.decoder.prefetch = prefetch
        batches = iter(loader)
        first = next(batches)  # in use from here on
        deadline = time.monotonic() + (5 if prefetch else 1)
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (len(started) >= 2) == (prefetch > 0)
        time.sleep(0.5)
        assert len(started) <= 2 + prefetch  # bounded: this batch, `prefetch` queued, one waiting to be
        assert first[0].shape == (8, 3, 32, 32)
        assert len([first, *batches]) == loader.steps  # and the pass goes on to its end


def test_a_batched_decoder_failure_that_no_single_file_repeats_keeps_its_cause(shards, monkeypatch):
    from imagenet_ddp.data import jpeg

    real = jpeg.decode_many

    def flaky(files, device):  # as a device failure would: the batch fails, each file alone decodes
        if len(files) > 1:
            raise RuntimeError("nvjpeg.cpp:123, NVJPEG_STATUS_EXECUTION_FAILED")
        return real(files, device)

    monkeypatch.setattr(jpeg, "decode_many", flaky)
    with (
        build_loader(config(shards, "cuda", workers=0), "val") as loader,
        pytest.raises(
            RuntimeError, match="each file decodes alone \\(NVJPEG_STATUS_EXECUTION_FAILED\\)"
        ) as e,
    ):
        next(iter(loader))
    assert not isinstance(e.value, UserError) and "NVJPEG_STATUS" in str(e.value.__cause__)


def test_a_bad_file_is_named_by_the_one_by_one_retry(shards, monkeypatch):
    from imagenet_ddp.data import jpeg

    files = [torch.frombuffer(bytearray(b"not a jpeg"), dtype=torch.uint8)]
    with pytest.raises(UserError, match="^shard x, sample 7: cannot decode its JPEG \\(Not a JPEG file"):
        gpu_decode.decode(files, ["shard x, sample 7"], torch.device("cpu"))
    assert jpeg.backend()[0] == "torchcodec"


def test_decoding_uses_torchcodec_without_a_deprecation_warning_and_torchvision_where_it_is_missing(
    shards, monkeypatch
):
    import sys
    import warnings

    from imagenet_ddp.data import jpeg

    files = sorted((shards / "val").glob("*.tar"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from torchvision.io (or anything else)
        assert jpeg.backend()[0] == "torchcodec"
        cfg = config(shards, "cuda", workers=0, eval_size=40)
        codec = epoch(cfg, "val")
        monkeypatch.setitem(sys.modules, "torchcodec", None)  # as if not installed
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
        jpeg.backend.cache_clear()
        try:
            assert jpeg.backend()[0] == "torchvision"
            fallback = epoch(cfg, "val")
        finally:
            jpeg.backend.cache_clear()
    assert files and torch.equal(codec[0], fallback[0])  # libjpeg-turbo both: the same pixels
