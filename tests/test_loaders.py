"""The loader contract, checked on every backend installed here, over shards made by make_shards.py.

The fixture dataset has 130 classes (labels "5" and "123" share batches), 2 train images and
1 val image per class, so a val label names one sample: exact-once coverage is a label check.
Shard sizes are uneven (48 samples per shard plus a remainder) so ranks get unequal file counts.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from imagenet_ddp.data import PAD_LABEL, DataConfig, build_loader
from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ddp.data.shardset import open_split, read_index
from imagenet_ddp.errors import UserError
from tests.fixtures import make_imagenet_extracted
from tests.needs import needs

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES, TRAIN_PER_CLASS = 130, 2
SIZE, BATCH = 32, 8

DALI = pytest.param("dali", marks=pytest.mark.needs("nvidia.dali"))
# The torch backend decoding in the main process (data.decode_device=cuda, gpu_decode.py), on the
# loader's device: here the CPU, libjpeg-turbo standing in for nvJPEG.
TORCH_ON_DEVICE = "torch-decode-on-device"
REAL = ["torch", TORCH_ON_DEVICE, DALI]
ALL = ["torch", TORCH_ON_DEVICE, DALI, "synthetic"]


def make_shards(src: Path, out: Path, shard_size: int) -> Path:
    cmd = [sys.executable, "make_shards.py", "folder", "--src", str(src), "--out", str(out)]
    cmd += ["--shard-size", str(shard_size), "--workers", "1"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    make_imagenet_extracted(
        root,
        num_classes=NUM_CLASSES,
        per_class=TRAIN_PER_CLASS,
        val_per_class=1,
        bad=False,
        side_range=(40, 120),
    )
    return root


@pytest.fixture(scope="session")
def shards(source, tmp_path_factory) -> Path:
    """train: 5 shards of 48 + one of 20; val: 48, 48, 34."""
    return make_shards(source, tmp_path_factory.mktemp("shards"), 48)


@pytest.fixture(scope="session")
def unique(tmp_path_factory) -> Path:
    """One train image per class (130, in shards of 48): a train label names one sample."""
    root = tmp_path_factory.mktemp("unique-source")
    make_imagenet_extracted(root, num_classes=NUM_CLASSES, per_class=1, val_per_class=1, bad=False)
    return make_shards(root, tmp_path_factory.mktemp("unique"), 48)


@pytest.fixture(scope="session")
def one_shard(source, tmp_path_factory) -> Path:
    return make_shards(source, tmp_path_factory.mktemp("one_shard"), 1000)


def config(root, backend, **kw) -> DataConfig:
    if backend == TORCH_ON_DEVICE:
        backend, kw = "torch", {"decode_device": "cuda", **kw}
    args = dict(root=str(root), backend=backend, image_size=SIZE, eval_size=SIZE, batch_size=BATCH, workers=2)
    return DataConfig(**{**args, **kw})


def epoch(cfg, split, *, rank=0, world_size=1, seed=0, at=0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with build_loader(cfg, split, rank=rank, world_size=world_size, seed=seed) as loader:
        loader.set_epoch(at)
        batches = [(x.clone(), y.clone()) for x, y in loader]
        assert len(batches) == len(loader)
    return [x for x, _ in batches], [y for _, y in batches]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_have_the_contract_shapes(shards, backend, split, channels_last):
    cfg = config(shards, backend, channels_last=channels_last, image_size=40, eval_size=SIZE)
    with build_loader(cfg, split, device="cpu") as loader:
        assert loader.num_classes == NUM_CLASSES
        assert loader.num_samples == open_split(shards, split).num_samples
        count = 0
        for images, labels in loader:
            side = 40 if split == "train" else SIZE
            assert images.shape == (BATCH, 3, side, side) and images.dtype == torch.float32
            assert images.device.type == "cpu" and labels.device.type == "cpu"
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert images.is_contiguous(memory_format=fmt)
            assert labels.shape == (BATCH,) and labels.dtype == torch.int64
            assert ((labels >= 0) & (labels < NUM_CLASSES) | (labels == PAD_LABEL)).all()
            count += 1
        assert count == len(loader) > 0
    if backend != "synthetic":
        # Normalized with ImageNet statistics: the JPEG pixels land in [-2.2, 2.7].
        assert float(images.min()) >= -2.2 and float(images.max()) <= 2.7


@pytest.mark.filterwarnings("ignore:.*readers share files")
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_steps_and_val_sees_every_sample_once(shards, backend, world_size):
    val_cfg, train_cfg = config(shards, backend), config(shards, backend)
    steps, seen, train_steps = [], [], []
    for rank in range(world_size):
        _, labels = epoch(val_cfg, "val", rank=rank, world_size=world_size)
        steps.append(len(labels))
        seen += [y for batch in labels for y in batch.tolist() if y != PAD_LABEL]
        with build_loader(train_cfg, "train", rank=rank, world_size=world_size) as loader:
            train_steps.append(len(loader))
    assert len(set(steps)) == 1 and len(set(train_steps)) == 1
    assert train_steps[0] == NUM_CLASSES * TRAIN_PER_CLASS // (world_size * BATCH)
    if backend != "synthetic":
        assert sorted(seen) == list(range(NUM_CLASSES))  # val label i is sample i: each exactly once
    else:
        assert len(seen) == NUM_CLASSES


@pytest.mark.parametrize("backend", REAL)
@pytest.mark.parametrize("buffer", [16, 1024])  # smaller and larger than a rank's 86 samples
def test_a_train_epoch_visits_no_sample_twice(unique, backend, buffer):
    # An epoch is a permutation of (all but < world_size x batch) samples. DALI's shuffle buffer
    # draws only from the current pass over the rank's share, so its epochs are exact too.
    world_size, labels = 3, []
    for rank in range(world_size):
        cfg = config(unique, backend, shuffle_buffer=buffer)
        labels += epoch(cfg, "train", rank=rank, world_size=world_size, at=1)[1]
    labels = torch.cat(labels).tolist()
    assert len(set(labels)) == len(labels) == NUM_CLASSES // (world_size * BATCH) * world_size * BATCH


@pytest.mark.parametrize("backend", REAL)
def test_dali_and_torch_batches_mix_one_and_three_digit_labels(shards, backend):
    _, labels = epoch(config(shards, backend), "train")
    assert any((b < 10).any() and (b >= 100).any() for b in labels)


@pytest.mark.parametrize("backend", ALL)
def test_epoch_order_is_a_function_of_seed_and_epoch(shards, backend):
    cfg = config(shards, backend)
    images, labels = epoch(cfg, "train", seed=7, at=1)
    with build_loader(cfg, "train", seed=7) as loader:  # resumed run: epoch 0, then epoch 1
        list(loader)
        loader.set_epoch(1)
        again = [(x.clone(), y.clone()) for x, y in loader]
    assert all(torch.equal(y, y2) for y, (_, y2) in zip(labels, again, strict=True))
    assert all(torch.equal(x, x2) for x, (x2, _) in zip(images, again, strict=True))
    other_epoch = torch.cat(epoch(cfg, "train", seed=7, at=2)[1])
    other_seed = torch.cat(epoch(cfg, "train", seed=8, at=1)[1])
    assert not torch.equal(other_epoch, torch.cat(labels)) and not torch.equal(other_seed, torch.cat(labels))


def saved_and_loaded(state: dict) -> dict:
    """A loader state as a resumed run gets it: through torch.save and torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def first_batches(cfg, count: int, **where) -> tuple[list[torch.Tensor], dict]:
    """The labels of an epoch-1 pass interrupted after `count` batches, and the loader's state then."""
    with build_loader(cfg, "train", **where) as loader:
        loader.set_epoch(1)
        batches = iter(loader)
        labels = [next(batches)[1].clone() for _ in range(count)]
        return labels, saved_and_loaded(loader.state_dict())


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("start", [1, 6])
def test_a_pass_resumed_mid_epoch_continues_where_it_stopped(unique, backend, start):
    where = dict(rank=1, world_size=2, seed=3)
    cfg = config(unique, backend, shuffle_buffer=16)
    images, labels = epoch(cfg, "train", at=1, **where)
    before, saved = first_batches(cfg, start, **where)
    if backend == "dali":  # DALI's state does not depend on its thread count: resume with another
        cfg = config(unique, backend, shuffle_buffer=16, workers=1)
    with build_loader(cfg, "train", **where) as loader:
        loader.set_epoch(1)
        loader.load_state_dict(saved)
        rest = [(x.clone(), y.clone()) for x, y in loader.iter_from(start)]
        if backend == "dali":
            assert saved["batch"] == start and len(saved["dali"]) < 4096
            assert loader.restored  # from DALI's reader checkpoint: the first batches were not read again
    assert len(rest) == len(labels) - start
    assert all(torch.equal(a, b) for a, b in zip(before, labels[:start], strict=True))
    assert all(torch.equal(y, y2) for y, (_, y2) in zip(labels[start:], rest, strict=True))
    assert all(torch.equal(x, x2) for x, (x2, _) in zip(images[start:], rest, strict=True))
    if backend != "synthetic":  # nothing of the epoch skipped or seen twice across the interruption
        seen = torch.cat(before + [y for _, y in rest]).tolist()
        assert len(set(seen)) == len(seen) == len(labels) * BATCH


def test_the_torch_backend_resumes_without_decoding_the_batches_before(shards, monkeypatch):
    from imagenet_ddp.data import torch_backend

    decoded = []
    decode = torch_backend._decode
    monkeypatch.setattr(torch_backend, "_decode", lambda sample: decoded.append(1) or decode(sample))
    with build_loader(config(shards, "torch", workers=0), "train") as loader:  # in this process
        rest = list(loader.iter_from(5))
    assert len(rest) == loader.steps - 5 and len(decoded) == len(rest) * BATCH


@pytest.mark.needs("nvidia.dali")
@pytest.mark.parametrize(
    "change",
    [{"shuffle_buffer": 32}, {"epoch": 2}, {"batch": 3}, {"dali": b"\x01damaged"}],
    ids=["other-pipeline", "other-epoch", "other-batch", "unreadable-checkpoint"],
)
def test_dali_state_from_another_pass_is_not_restored_but_replayed(shards, change):
    where = dict(rank=0, world_size=2, seed=3)
    _, saved = first_batches(config(shards, "dali", shuffle_buffer=16), 2, **where)
    cfg = config(shards, "dali", shuffle_buffer=change.get("shuffle_buffer", 16))
    labels = epoch(cfg, "train", at=1, **where)[1]
    with build_loader(cfg, "train", **where) as loader:
        loader.set_epoch(1)
        loader.load_state_dict({**saved, **{k: v for k, v in change.items() if k in saved}})
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            rest = [y.clone() for _, y in loader.iter_from(2)]
        assert not loader.restored
        if "dali" in change:  # DALI rejects it when building: a warning, then the replay
            assert any("DALI could not restore its checkpoint" in str(w.message) for w in warned)
    assert all(torch.equal(a, b) for a, b in zip(labels[2:], rest, strict=True))


@pytest.mark.needs("nvidia.dali")
def test_dali_and_torch_eval_images_agree(shards):
    # Same libjpeg-turbo decode, same resize grid and crop origin: only rounding may differ.
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    out = {}
    for backend in ("torch", "dali"):
        images, labels = epoch(config(shards, backend, eval_size=40, batch_size=16), "val")
        out[backend] = torch.cat(images) * std + mean, torch.cat(labels)
    assert torch.equal(out["torch"][1], out["dali"][1])
    real = out["torch"][1] != PAD_LABEL
    diff = (out["torch"][0] - out["dali"][0])[real].abs()
    assert float(diff.max()) <= 2.01 and float(diff.mean()) < 0.5


@pytest.mark.parametrize("backend", REAL)
def test_fewer_shards_than_readers_warns_and_keeps_steps_equal(one_shard, backend):
    cfg, world_size = config(one_shard, backend), 3
    seen, val_steps, train_steps = [], set(), set()
    for rank in range(world_size):
        with pytest.warns(UserWarning, match="1 shard files for 3 ranks"):
            _, labels = epoch(cfg, "val", rank=rank, world_size=world_size)
        val_steps.add(len(labels))
        seen += [y for batch in labels for y in batch.tolist() if y != PAD_LABEL]
        with pytest.warns(UserWarning, match="1 shard files for 3 ranks"):
            train_steps.add(len(epoch(cfg, "train", rank=rank, world_size=world_size)[1]))
    assert len(val_steps) == 1 and len(train_steps) == 1
    assert sorted(seen) == list(range(NUM_CLASSES))


def corrupt_copy(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


@pytest.mark.parametrize("backend", REAL)
def test_truncated_shard_is_named_before_reading(shards, tmp_path, backend):
    root = corrupt_copy(shards, tmp_path)
    victim = root / "train" / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[:-3000])
    with pytest.raises(UserError, match=r"shard .*train-000002\.tar is \d+ bytes, the manifest says"):
        build_loader(config(root, backend), "train")


@pytest.mark.parametrize("backend", REAL)
def test_damaged_jpeg_names_the_shard(shards, tmp_path, backend):
    root = corrupt_copy(shards, tmp_path)
    split = open_split(root, "val")
    victim = split.shards[1]
    offset = int(read_index(victim).jpg[3, 0])
    with open(victim.path, "r+b") as f:  # same size: only the content check can find it
        f.seek(offset)
        f.write(b"\0" * 64)
    with pytest.raises(UserError, match=r"val-000001\.tar"):
        epoch(config(root, backend), "val")


@pytest.mark.parametrize(
    "change, message",
    [
        ("no_root", r"shards directory .* does not exist"),
        ("no_split", r"no 'val' split in .*splits found: train"),
        ("empty", r"split 'val' in .* is empty"),
        ("classes", r"classes differ between .*val/manifest.json and .*train/manifest.json"),
    ],
)
def test_bad_roots_give_one_line_errors(shards, tmp_path, change, message):
    root = corrupt_copy(shards, tmp_path)
    manifest = root / "val" / "manifest.json"
    if change == "no_root":
        root = tmp_path / "nowhere"
    elif change == "no_split":
        shutil.rmtree(root / "val")
    else:
        data = json.loads(manifest.read_text())
        if change == "empty":
            data.update(num_samples=0, shards=[])
        else:
            data["classes"][3], data["classes"][4] = data["classes"][4], data["classes"][3]
        manifest.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as info:
        build_loader(config(root, "torch"), "val")
    assert "\n" not in str(info.value)


def test_closing_mid_epoch_leaves_no_worker_processes(shards):
    loader = build_loader(config(shards, "torch", workers=2), "train")
    next(iter(loader))
    assert multiprocessing.active_children()
    loader.close()
    assert not multiprocessing.active_children()
    for _ in loader:  # a pass broken off by a new pass also shuts its workers down
        break
    next(iter(loader))
    assert len(multiprocessing.active_children()) == 2
    loader.close()
    assert not multiprocessing.active_children()


def test_synthetic_without_shards_is_imagenet_sized(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "none"), backend="synthetic", batch_size=256, image_size=16)
    with build_loader(cfg, "train", rank=1, world_size=8) as loader:
        assert len(loader) == 1_281_167 // (8 * 256) and loader.num_classes == 1000
        images, labels = next(iter(loader))
        assert images.shape == (256, 3, 16, 16) and labels.max() < 1000


def test_unknown_backend_is_a_config_error():
    with pytest.raises(UserError, match="data.backend must be one of dali, torch, synthetic"):
        DataConfig(backend="ffcv")


def test_without_dali_the_torch_backend_works_and_dali_says_how_to_install(shards):
    # A fresh interpreter in which `import nvidia.dali` fails, as on a machine without it.
    code = f"""
import sys
from importlib.abc import MetaPathFinder
class NoDali(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, NoDali())
from imagenet_ddp.data import DataConfig, build_loader
from imagenet_ddp.errors import UserError
cfg = DataConfig(root={str(shards)!r}, backend="torch", eval_size=32, batch_size=8, workers=0)
with build_loader(cfg, "val") as loader:
    images, labels = next(iter(loader))
print("torch ok", tuple(images.shape))
try:
    build_loader(DataConfig(root={str(shards)!r}, backend="dali"), "val")
except UserError as e:
    print("error:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "torch ok (8, 3, 32, 32)" in out.stdout
    assert "error: data.backend 'dali' needs NVIDIA DALI" in out.stdout
    assert "pip install nvidia-dali-cuda130" in out.stdout


@pytest.mark.needs("nvidia.dali")
@pytest.mark.parametrize("policy", ["none", "ta_wide", "ra", "imagenet"])
def test_dali_train_graph_of_cuda_devices_runs(shards, policy):
    # No GPU here: run the graph that CUDA devices use (DALI resizes, not torchvision) on CPU threads.
    from imagenet_ddp.data.augment import settings
    from imagenet_ddp.data.dali_graph import pipeline

    split = open_split(shards, "train")
    augment = settings(DataConfig(auto_augment=policy))
    pipe = pipeline(
        paths=[str(s.path) for s in split.shards],
        index_paths=[str(s.index_path) for s in split.shards],
        train=True,
        decoder="cpu",
        image_size=SIZE,
        resize=SIZE,
        shuffle_buffer=16,
        crop_only=False,
        crop_area=(0.08, 1.0),
        augment=augment,
        enable_conditionals=policy != "none",
        batch_size=BATCH,
        num_threads=1,
        device_id=None,
        seed=0,
    )
    pipe.build()
    images, labels = pipe.run()
    assert images.as_tensor().shape() == [BATCH, SIZE, SIZE, 3]
    assert labels.as_tensor().shape()[0] == BATCH
    del pipe


GPU_SETTINGS = dict(
    dali_hw_decoder_load=0.99,
    dali_prefetch_queue_depth=5,
    dali_device_memory_padding=256 << 20,
    dali_host_memory_padding=128 << 20,
    dali_preallocate_width_hint=4000,
    dali_preallocate_height_hint=3000,
)


@pytest.mark.needs("nvidia.dali")
def test_the_mixed_decoders_get_the_configs_gpu_settings_and_libjpeg_upsampling(shards):
    """No GPU here to run them: the data.dali_* settings must reach a CUDA device's pipeline, each as
    an argument DALI's decoders accept, without changing the checkpoint key (they change no sample)."""
    from nvidia.dali import backend

    cfg = config(shards, "dali", **GPU_SETTINGS)
    with build_loader(cfg, "train", device="cuda:0") as loader:  # nothing touches the GPU until a pass
        args, key = loader._pipeline_args(0)
    decoder = args["decoder_args"]
    assert decoder == {
        "hw_decoder_load": 0.99,
        "device_memory_padding": 256 << 20,
        "host_memory_padding": 128 << 20,
        "preallocate_width_hint": 4000,
        "preallocate_height_hint": 3000,
        "jpeg_fancy_upsampling": True,
    }
    assert (args["decoder"], args["prefetch_queue_depth"], args["num_threads"]) == ("mixed", 5, cfg.workers)
    for op in ("decoders__ImageRandomCrop", "decoders__Image"):
        schema = backend.GetSchema(op)
        assert all(schema.HasArgument(name) for name in decoder), op
        assert not schema.HasArgument("no_such_argument")
    with build_loader(config(shards, "dali"), "train", device="cuda:0") as loader:
        assert loader._pipeline_args(0)[1] == key
    with build_loader(cfg, "train") as loader:  # the CPU decoder takes none of them
        assert loader._pipeline_args(0)[0]["decoder_args"] == {}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dali_hw_decoder_load": 1.2}, "data.dali_hw_decoder_load is a share in [0, 1], not 1.2"),
        ({"dali_prefetch_queue_depth": 0}, "data.dali_prefetch_queue_depth must be at least 1"),
        ({"dali_preallocate_width_hint": -1}, "data.dali_preallocate_width_hint must be 0 or more"),
        ({"dali_device_memory_padding": -5}, "data.dali_device_memory_padding must be 0 or more"),
    ],
)
def test_out_of_range_dali_gpu_settings_give_one_line_errors(change, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        DataConfig(**change)
    assert "\n" not in str(e.value)


@pytest.mark.needs("nvidia.dali")
def test_dali_index_files_cut_for_earlier_epochs_do_not_pile_up(shards):
    """Each train epoch cuts a rank's first and last shard to its own range; 300 epochs must not leave
    300 epochs' worth of files in the temporary folder."""
    with build_loader(config(shards, "dali"), "train", rank=1, world_size=3) as loader:
        counts = []
        for e in range(6):
            loader.set_epoch(e)
            list(loader)
            counts.append(len(os.listdir(loader._index_dir)))
    assert max(counts) <= 4, counts  # this pass's cuts and the next one's (built ahead)


@pytest.mark.needs("nvidia.dali")
def test_a_dali_train_pass_built_ahead_gives_the_same_batches_as_one_built_when_asked(shards):
    """The next epoch's train pipeline is built as the last batch is handed out (its build overlaps
    validation); it must be the pipeline that epoch would have built."""
    cfg = config(shards, "dali")
    with build_loader(cfg, "train", rank=1, world_size=2, seed=3) as loader:
        list(loader)
        loader.set_epoch(1)
        ahead = [(x.clone(), y.clone()) for x, y in loader]
        assert loader.ahead, "the pass should have used the pipeline built ahead"
    fresh = epoch(cfg, "train", rank=1, world_size=2, seed=3, at=1)
    assert all(torch.equal(a, b) for (a, _), b in zip(ahead, fresh[0], strict=True))
    assert all(torch.equal(a, b) for (_, a), b in zip(ahead, fresh[1], strict=True))
    with build_loader(cfg, "val") as loader:  # val is not built ahead: it would idle through training
        list(loader)
        list(loader)
        assert not loader.ahead
    with build_loader(cfg, "train") as loader:  # nor after a pass that was not finished
        next(iter(loader))
        loader.end_pass()
        next(iter(loader))
        assert not loader.ahead


@pytest.mark.needs("nvidia.dali")
def test_close_drops_the_pipeline_built_ahead_and_its_thread(shards):
    import threading

    with build_loader(config(shards, "dali"), "train") as loader:
        batches = iter(loader)
        for _ in range(len(loader)):  # paused after the last batch, as a run stopped there is
            next(batches)
        assert loader._next is not None
        loader.close()
        assert loader._next is None
        assert not [t for t in threading.enumerate() if t.name.startswith("dali-next-pass")]


OPEN_FILES = """
import resource, sys, warnings
from imagenet_ddp.data import DataConfig, build_loader
from imagenet_ddp.errors import UserError
warnings.simplefilter("ignore")
soft, hard, world_size = map(int, sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
cfg = DataConfig(root=sys.argv[4], backend=sys.argv[5], image_size=16, eval_size=16, batch_size=4, workers=1)
try:
    for rank in range(world_size):
        with build_loader(cfg, "train", rank=rank, world_size=world_size) as train, \\
                build_loader(cfg, "val", rank=rank, world_size=world_size) as val:
            for epoch in range(2):
                train.set_epoch(epoch)
                steps = sum(1 for _ in train) + sum(1 for _ in val)
    print("ok", steps, getattr(train, "ahead", None))
except UserError as e:
    print("error:", e)
"""


@pytest.fixture(scope="module")
def many_shards(source, tmp_path_factory) -> Path:
    """260 train images in 130 shards of 2, 130 val images in 65: more files than the limits below."""
    return make_shards(source, tmp_path_factory.mktemp("many"), 2)


@pytest.mark.parametrize("backend", ["torch", DALI])  # a worker-side limit: decoding does not change it
def test_more_shards_than_the_open_file_soft_limit_still_load(many_shards, backend):
    """ImageNet packs 1,025 train shards; clusters often set a soft limit of 1,024 (SLURM passes the
    user's on). Here 130 shards under a soft limit of 100: the DALI backend raises the soft limit to
    the hard one, and with more ranks each rank opens only the shards that hold its samples."""

    def run(soft, hard, world_size):
        args = [str(soft), str(hard), str(world_size), str(many_shards), backend]
        out = subprocess.run(
            [sys.executable, "-c", OPEN_FILES, *args], cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run(100, 4096, 1) == ("ok 98 True" if backend == "dali" else "ok 98 None")
    assert run(100, 100, 8).startswith("ok")  # ~17 shards per rank
    if backend == "dali":
        # Room for one pipeline of all 130 shards but not for a second one built ahead: no ahead build.
        assert run(220, 220, 1) == "ok 98 False"
        # One rank needs all 130 at once: the limit is named, no shard is hashed.
        message = run(100, 100, 1)
        assert message.startswith(
            "error: rank 0 reads 130 shard files at once, beyond the open-file limit (100 soft, 100 hard"
        )
        assert "ulimit -n" in message and "--shard-size" in message


def damage(shard, how: str) -> None:
    """Damage a val shard the loader has already checked (as a disk or a network file system may)."""
    if how == "undecodable jpeg":  # its 4th JPEG's bytes replaced, the size unchanged
        offset, size = (int(v) for v in read_index(shard).jpg[3, :2])
        with open(shard.path, "r+b") as f:
            f.seek(offset)
            f.write(bytes(random.Random(0).randrange(256) for _ in range(size)))
    elif how == "truncated shard":
        shard.path.write_bytes(shard.path.read_bytes()[: shard.bytes // 2])
    elif how == "missing shard":
        shard.path.unlink()


@pytest.mark.needs("nvidia.dali")
@pytest.mark.parametrize(
    "how, dali_said",
    [
        pytest.param(
            "undecodable jpeg",
            "Error in CPU operator `nvidia.dali.fn.decoders.image`: ",
            id="undecodable jpeg",
        ),
        pytest.param("truncated shard", "offset is outside of the archive file", id="truncated shard"),
        pytest.param("missing shard", "No such file or directory", id="missing shard"),
    ],
)
def test_a_real_dali_read_failure_names_the_damaged_shard(shards, tmp_path, monkeypatch, how, dali_said):
    """DALI's own failure, provoked after the loader's checks passed: the pass's shards are hashed
    and the damaged one is named, with DALI's cause on the same line."""
    from imagenet_ddp.data.shardset import ShardSplit

    root = corrupt_copy(shards, tmp_path)
    hashed, find_corrupt = [], ShardSplit.find_corrupt
    monkeypatch.setattr(
        ShardSplit, "find_corrupt", lambda self, found: hashed.append(found) or find_corrupt(self, found)
    )
    with build_loader(config(root, "dali", workers=1), "val") as loader:
        victim = loader.shards.shards[1]
        damage(victim, how)
        with pytest.raises(UserError) as e:
            list(loader)
    message = str(e.value)
    said = {"undecodable jpeg": "is damaged: its sha256", "truncated shard": "bytes, not the manifest's"}
    assert message.startswith(f"shard {victim.path} ") and "re-run make_shards.py" in message
    assert said.get(how, "is gone") in message.split(" (", 1)[0]
    assert dali_said in message.split("; DALI said: ", 1)[1]
    assert "\n" not in message and len(hashed) == 1


DALI_FAILURE = """
import os, resource, sys, warnings
from imagenet_ddp.data import DataConfig, build_loader, dali_backend
from imagenet_ddp.data.shardset import ShardSplit
from imagenet_ddp.errors import UserError
warnings.simplefilter("ignore")
hashed = []
find_corrupt = ShardSplit.find_corrupt
ShardSplit.find_corrupt = lambda self, shards: hashed.append(len(shards)) or find_corrupt(self, shards)
cfg = DataConfig(root=sys.argv[1], backend="dali", image_size=16, eval_size=16, batch_size=4, workers=1)
with build_loader(cfg, "val") as loader:
    if sys.argv[2] == "open files":  # past the loader's own check, which refuses before DALI opens a shard
        dali_backend._allow_open_files = lambda *args, **kwargs: True
        limit = len(os.listdir("/proc/self/fd")) + 2
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    try:
        print("passes:", sum(1 for _ in loader))
    except UserError as e:
        print("error:", e)
print("hashed:", hashed)
"""


@pytest.mark.needs("nvidia.dali")
@pytest.mark.parametrize("how", ["permission denied", "open files"])
def test_a_real_dali_failure_that_is_not_about_the_data_hashes_no_shard(shards, tmp_path, how):
    """Only a read or decode failure is worth hashing the pass's shards (minutes for a rank's share
    of ImageNet): a resource failure, DALI's own (a shard it may not read: as root, run without the
    capability to override file permissions; the open-file limit met in DALI), is named at once."""
    root = corrupt_copy(shards, tmp_path)
    command = [sys.executable, "-c", DALI_FAILURE, str(root), how]
    if how == "permission denied":
        (root / "val" / "val-000001.tar").chmod(0)
        if os.geteuid() == 0:
            drop = "-dac_override,-dac_read_search"
            command = [needs("setpriv"), f"--bounding-set={drop}", f"--inh-caps={drop}", *command]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    error, hashed = out.stdout.strip().splitlines()
    assert hashed == "hashed: []"
    if how == "permission denied":
        assert error.startswith("error: DALI failed on rank 0 (Permission denied), not because of the data: ")
        assert f"Could not open file {root / 'val' / 'val-000001.tar'}: Permission denied" in error
    else:
        assert (
            error.startswith("error: DALI could not open the shards of ")
            and "too many open files (limit " in error
        )
        assert (
            "raise it with `ulimit -n`; DALI said: Error in CPU operator `nvidia.dali.fn.readers.webdataset`"
            in error
        )
