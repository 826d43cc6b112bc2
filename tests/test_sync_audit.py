"""No host-device sync between the loader's next() and the optimizer step, for the torchvision V2
recipe's ingredients (TrivialAugmentWide, random erasing, MixUp/CutMix, label smoothing, EMA,
channels_last), through the audit `bench gpu` runs on a GPU (bench/sync_audit.py): here its CPU
stand-in, which flags what would make a GPU's host wait. Negative controls: torchvision's own
RandomErasing (a box filled from a CPU tensor) and a loss read with .item() are caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from imagenet_ddp.bench.sync_audit import audit_recipe, no_host_syncs
from imagenet_ddp.data import mixing
from tests.needs import needs
from tests.test_train import make_tiny_shards

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("audit"))


def v2_recipe(shards: Path, backend: str, precision: str = "bf16") -> tuple[str, list[str]]:
    """configs/torchvision_resnet50_v2.yaml with only sizes, batch, workers and the backend changed
    (random erasing on every image, so that each step erases)."""
    return str(REPO / "configs/torchvision_resnet50_v2.yaml"), [
        f"data.root={shards}",
        f"data.backend={backend}",
        *(["data.decode_device=cuda"] if backend == "torch" else []),
        "data.workers=1",
        "data.image_size=32",
        "data.eval_size=32",
        "data.eval_resize_size=36",
        "data.random_erase=1.0",
        "train.batch_size=8",
        f"train.precision={precision}",
        "model.name=resnet18",
    ]


@pytest.mark.parametrize("backend, precision", [("torch", "bf16"), ("torch", "fp32"), ("dali", "bf16")])
def test_the_v2_recipes_step_makes_no_host_sync(shards, backend, precision):
    if backend == "dali":
        needs("nvidia.dali")
    recipe, overrides = v2_recipe(shards, backend, precision)
    assert audit_recipe(recipe, overrides, CPU) == []


def test_torchvisions_own_random_erasing_is_caught(shards, monkeypatch):
    """The erasing this project had: torchvision's RandomErasing per image fills the box from a CPU
    value tensor, a blocking copy per erased image on a GPU."""

    def torchvisions(self, images):
        return torch.stack([self.erase(image) for image in images])

    monkeypatch.setattr(mixing.BatchAugment, "_erase", torchvisions)
    syncs = audit_recipe(*v2_recipe(shards, "torch"), CPU)
    assert syncs and all("__setitem__() with a host tensor" in s for s in syncs), syncs


def test_the_stand_in_flags_reads_and_blocking_copies_and_passes_device_work():
    weights = torch.randn(4, 4)  # made before the audit: a device tensor to it
    with no_host_syncs(CPU) as audit:
        loss = (weights @ weights).sum()
        draw = torch.rand(1)  # a host draw, read on the host: fine
        assert bool(draw >= 0)
        scale = torch.tensor(2.0)  # a 0-dim host number in a device op: fine
        weights.mul_(scale)
        weights[0, :2] = 0.0  # a fill with a Python number: fine
        moved = torch.arange(4).to(CPU, non_blocking=True)  # an asynchronous upload: fine
        weights[1] += moved
    assert audit.syncs == []
    for sync in (
        lambda: loss.item(),
        lambda: weights.tolist(),
        lambda: bool(loss > 0),
        lambda: weights.__setitem__((0, slice(0, 2)), torch.tensor([1.0, 2.0])),
        lambda: torch.tensor([1.0, 2.0], device=CPU),
        lambda: torch.ones(3).to(CPU),
        lambda: weights.nonzero(),
    ):
        with no_host_syncs(CPU) as audit:
            sync()
        assert len(audit.syncs) == 1, audit.syncs


def test_torchvisions_erasing_boxes_are_drawn_as_torchvision_draws_them():
    """Rates, areas and aspect ratios of the erased boxes against torchvision's RandomErasing run on
    its own (other seeds), and a narrower area range (the negative control) told apart."""
    from scipy import stats

    def boxes(erase_batch, n: int):
        found = []
        for k in range(n):
            out = erase_batch(k)
            for image in out:
                zero = (image[0] == 0).nonzero()
                if len(zero):
                    h, w = (
                        int(zero[:, 0].max() - zero[:, 0].min() + 1),
                        int(zero[:, 1].max() - zero[:, 1].min() + 1),
                    )
                    found.append((h * w / (56 * 40), h / w))
                else:
                    found.append(None)
        return found

    images = torch.ones(32, 3, 56, 40)
    ours = mixing.BatchAugment(
        random_erase=0.3, mixup_alpha=0, cutmix_alpha=0, switch_prob=0.5, num_classes=2, seed=1, rank=0
    )
    theirs_transform = v2.RandomErasing(p=0.3, value=0)
    narrow_transform = v2.RandomErasing(p=0.3, scale=(0.02, 0.2), value=0)
    torch.manual_seed(12345)
    mine = boxes(lambda k: ours(images, torch.zeros(32, dtype=torch.long), 0, k)[0], 25)
    theirs = boxes(lambda k: torch.stack([theirs_transform(i) for i in images]), 25)
    narrow = boxes(lambda k: torch.stack([narrow_transform(i) for i in images]), 25)
    rate = lambda found: sum(b is not None for b in found)  # noqa: E731
    assert stats.binomtest(rate(mine), len(mine), 0.3).pvalue > 1e-3
    assert stats.binomtest(rate(theirs), len(theirs), 0.3).pvalue > 1e-3
    for i in (0, 1):  # area fraction, aspect ratio
        a, b, c = ([x[i] for x in found if x] for found in (mine, theirs, narrow))
        assert stats.ks_2samp(a, b).pvalue > 1e-3
    assert stats.ks_2samp([x[0] for x in mine if x], [x[0] for x in narrow if x]).pvalue < 1e-3
