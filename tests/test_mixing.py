"""Random erasing, MixUp and CutMix on the device batch, against torchvision's transforms and their
published distributions (Zhang et al. 2018: lambda ~ Beta(alpha, alpha); Yun et al. 2019: the pasted
box covers 1 - lambda of the image)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from imagenet_ddp.data.mixing import _STREAM, BatchAugment, hard_labels
from imagenet_ddp.data.plan import derive_seed

B, C, S = 8, 10, 16


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that are each one constant value (so a pixel tells which image it came from) and distinct labels."""
    values = torch.arange(1, B + 1, dtype=torch.float32).view(B, 1, 1, 1)
    return values.expand(B, 3, S, S).contiguous(), torch.randperm(
        C, generator=torch.Generator().manual_seed(seed)
    )[:B]


def make(**kw) -> BatchAugment:
    args = dict(
        random_erase=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, num_classes=C, seed=3, rank=1
    )
    return BatchAugment(**{**args, **kw})


def test_random_erasing_is_torchvisions_per_image_under_the_batch_seed():
    images, labels = torch.randn(B, 3, S, S), torch.arange(B)
    out, targets = make(random_erase=0.5)(images, labels, epoch=2, batch=7)
    torch.manual_seed(derive_seed(_STREAM, 3, 1, 2, 7))
    erase = v2.RandomErasing(p=0.5, value=0)
    expected = torch.stack([erase(image) for image in images])
    assert torch.equal(out, expected) and torch.equal(targets, labels)
    erased = (out == 0).flatten(1).any(1)
    assert 0 < int(erased.sum()) < B  # some erased, some not: the draw is per image
    assert torch.equal(images[~erased], out[~erased])  # and the input is left as it was


def test_the_draws_are_a_pure_function_of_the_batch_position_and_leave_the_global_stream_alone():
    augment = make(random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)
    images, labels = batch()
    before = torch.get_rng_state()
    first = augment(images, labels, epoch=1, batch=4)
    assert torch.equal(torch.get_rng_state(), before)
    again = augment(images, labels, epoch=1, batch=4)
    other = augment(images, labels, epoch=1, batch=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(
        first[0], make(random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, rank=2)(images, labels, 1, 4)[0]
    )


def test_mixup_lambda_follows_beta_alpha_alpha():
    augment = make(mixup_alpha=0.2)
    images, labels = batch()
    lams = []
    for step in range(800):
        out, targets = augment(images, labels, epoch=0, batch=step)
        lam = float(targets[0, labels[0]])
        lams.append(lam)
        # The images are mixed with the same lambda as the targets, with the batch rolled by one.
        assert torch.allclose(out, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-5)
        assert torch.allclose(targets.sum(1), torch.ones(B))
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 1e-3


def test_cutmix_box_covers_one_minus_lambda_and_lambda_follows_beta():
    augment = make(cutmix_alpha=1.0)
    images, labels = batch()
    lams = []
    for step in range(800):
        out, targets = augment(images, labels, epoch=0, batch=step)
        lam = float(targets[0, labels[0]])
        pasted = float((out[0, 0] != images[0, 0]).float().mean())
        assert pasted == pytest.approx(1 - lam, abs=1e-6)  # the pixels pasted are 1 - lambda of the image
        if pasted:  # from the previous image of the batch (the batch rolled by one)
            assert out[0, 0][out[0, 0] != images[0, 0]].unique().tolist() == [float(B)]
        lams.append(lam)
    # lambda is drawn from Beta(1, 1) (uniform); a box clipped at the border pastes less, which
    # raises the area lambda above the drawn one (a box centred in a corner pastes a quarter at
    # most): its mean lies above 1/2, its spread stays wide.
    assert 0.5 < sum(lams) / len(lams) < 0.75
    assert min(lams) < 0.3 and max(lams) == 1.0


def test_with_both_on_cutmix_is_chosen_with_switch_prob():
    augment = make(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3)
    images, labels = batch()
    cut = 0
    n = 600
    for step in range(n):
        out, _ = augment(images, labels, epoch=0, batch=step)
        # CutMix copies pixels (values stay integers); MixUp blends them.
        cut += bool(torch.equal(out, out.round()))
    assert stats.binomtest(cut, n, 0.3).pvalue > 1e-3


def test_soft_targets_score_top1_against_the_dominant_class():
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    assert hard_labels(targets).tolist() == [0, 2]
    assert hard_labels(torch.tensor([2, 1])).tolist() == [2, 1]
    assert not make().active
