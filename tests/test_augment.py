"""Augmentation policies (data.auto_augment): torchvision's own transforms on the torch backend,
the same distributions on DALI, and train passes that stay deterministic and resumable.

Fixture: 256 train JPEGs (64 classes x 4, 64-128 px sides) in shards of 48.
"""

from __future__ import annotations

import io
import math
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import v2

from imagenet_ddp.data import DataConfig, build_loader, jpeg
from imagenet_ddp.data.augment import NUM_BINS, dali_suite, settings, torch_policy
from imagenet_ddp.errors import UserError
from tests.fixtures import make_imagenet_extracted

needs_dali = pytest.mark.needs("nvidia.dali")
DALI = pytest.param("dali", marks=needs_dali)

REPO = Path(__file__).resolve().parent.parent
SIDE = 48  # of the crops the policies see
POLICIES = {  # id: DataConfig fields
    "ta_wide": {"auto_augment": "ta_wide"},
    "ra": {"auto_augment": "ra", "ra_num_ops": 2, "ra_magnitude": 9},
    "ra-mstd": {"auto_augment": "ra", "ra_num_ops": 2, "ra_magnitude": 15, "ra_magnitude_std": 5.0},
    "imagenet": {"auto_augment": "imagenet"},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("augment-source")
    make_imagenet_extracted(
        root, num_classes=64, per_class=4, val_per_class=1, bad=False, side_range=(64, 128)
    )
    return root


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("augment-shards")
    cmd = [sys.executable, "make_shards.py", "folder", "--src", str(source), "--out", str(out)]
    subprocess.run([*cmd, "--shard-size", "48", "--workers", "1"], cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def crops(source) -> torch.Tensor:
    """The fixture's train JPEGs decoded and resized to SIDE x SIDE: uint8 [256, 3, SIDE, SIDE]."""
    files = sorted((source / "train").rglob("*.JPEG"))
    with warnings.catch_warnings():  # torchvision 0.29's deprecation of its decoders, at every call
        warnings.simplefilter("ignore", DeprecationWarning)
        images = [jpeg.decode(bytearray(f.read_bytes())) for f in files]
    return torch.stack([F.resize(image, [SIDE, SIDE], antialias=True) for image in images])


BILINEAR = v2.InterpolationMode.BILINEAR  # what torchvision's reference recipe gives its policies


def torchvision_transform(policy: str) -> v2.Transform:
    return {
        "ta_wide": v2.TrivialAugmentWide(interpolation=BILINEAR),
        "ra": v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation=BILINEAR),
        "imagenet": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=BILINEAR),
    }[policy]


def on_pil(transform: v2.Transform, image: torch.Tensor) -> torch.Tensor:
    """`transform` as torchvision's reference recipe applies it: to a PIL image."""
    return v2.functional.pil_to_tensor(transform(v2.functional.to_pil_image(image)))


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet"])
def test_the_torch_policy_is_torchvisions_own_transform(crops, policy):
    ours, theirs = torch_policy(DataConfig(**POLICIES[policy])), torchvision_transform(policy)
    for i, crop in enumerate(crops[:24]):
        seed = 1000 + i
        torch.manual_seed(seed)
        assert torch.equal(ours(crop, seed), on_pil(theirs, crop))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    ours(crops[0], 5)
    assert torch.equal(torch.rand(4), expected)  # the caller's generator is left as it was


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet"])
def test_whole_pixel_translations_are_torchvisions_pixels(policy):
    """The policies translate a PIL image by pasting it (augment._WholePixelShifts): the same
    pixels as torchvision's affine path, for every offset up to beyond the side, on each axis."""
    ours, theirs = torch_policy(DataConfig(**POLICIES[policy])).transform, torchvision_transform(policy)
    rng = np.random.default_rng(0)
    for width, height in [(48, 48), (37, 29)]:
        image = v2.functional.to_pil_image(
            torch.from_numpy(rng.integers(0, 256, (3, height, width), np.uint8))
        )
        for transform_id in ("TranslateX", "TranslateY"):
            for magnitude in [*np.linspace(-50.0, 50.0, 81), 0.4, -0.99, 31.7]:
                args = (transform_id, float(magnitude), BILINEAR, theirs._fill)
                got = ours._apply_image_or_video_transform(image, *args)
                want = theirs._apply_image_or_video_transform(image, *args)
                assert np.array_equal(np.asarray(got), np.asarray(want)), (width, transform_id, magnitude)
    assert type(ours)._apply_image_or_video_transform is not type(theirs)._apply_image_or_video_transform


def test_ra_with_magnitude_std_is_torchvisions_randaugment_at_the_drawn_bin(crops):
    """Each image: torchvision's RandAugment at the bin drawn for it (which bins are drawn, and how
    often, is timm's distribution: the test below), its ops drawn after the one draw of the bin."""
    ours = torch_policy(DataConfig(**POLICIES["ra-mstd"]))
    bins = set()
    for i, crop in enumerate(crops[:24]):
        torch.manual_seed(i)
        augmented, drawn = ours(crop, i), ours.transform.magnitude
        bins.add(drawn)
        torch.manual_seed(i)
        torch.randn(())  # the bin's draw
        assert torch.equal(
            augmented, on_pil(v2.RandAugment(2, drawn, num_magnitude_bins=31, interpolation=BILINEAR), crop)
        )
    assert len(bins) > 5


def timm_magnitudes(magnitude: float, std: float, count: int) -> np.ndarray:
    """The magnitudes timm's own RandAugment op draws (timm.data.auto_augment.AugmentOp: its gauss and
    its clipping to [0, 10]), recorded where the op turns them into arguments; seeded, so fixed."""
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp("Rotate", prob=1.0, magnitude=magnitude, hparams={"magnitude_std": std})
    drawn = []
    op.level_fn = lambda level, hparams: drawn.append(level) or ()
    op.aug_fn = lambda image, *args, **kwargs: image
    state = random.getstate()
    random.seed(0)
    try:
        for _ in range(count):
            op(None)
    finally:
        random.setstate(state)
    return np.array(drawn)


def drawn_bins_torch(mean: int, std: float, count: int) -> np.ndarray:
    ra = torch_policy(DataConfig(auto_augment="ra", ra_magnitude=mean, ra_magnitude_std=std)).transform
    pixel = torch.zeros(3, 1, 1, dtype=torch.uint8)
    bins = []
    for seed in range(count):
        torch.manual_seed(seed)
        ra(pixel)
        bins.append(ra.magnitude)  # the bin this image's ops ran at
    return np.array(bins)


def drawn_bins_dali(mean: int, std: float, count: int) -> np.ndarray:
    from nvidia.dali import pipeline_def

    from imagenet_ddp.data.augment import dali_magnitude_bin

    pipe = pipeline_def(lambda: dali_magnitude_bin(mean, std))(
        batch_size=500, num_threads=1, device_id=None, seed=7
    )
    pipe.build()
    return np.concatenate([[int(np.array(b)) for b in pipe.run()[0]] for _ in range(count // 500)])


@pytest.mark.parametrize("backend", ["torch", DALI])
@pytest.mark.parametrize("timm_m, timm_mstd", [(6, 0.5), (9, 1.0)])  # timm_resnet50_a3's; clipping at 10
def test_ra_magnitude_bins_are_timms_magnitudes_to_the_nearest_bin(backend, timm_m, timm_mstd):
    """timm's rand-mM-mstdS draws a magnitude on [0, 10] per op; ours draws bin ra_magnitude = 3M with
    std 3S on torchvision's 31 bins (0-30: 3 bins per timm unit, as the recipes set them). Our bins
    must be distributed as timm's own draws put into the nearest bin (a two-sample chi-square test,
    p > 0.001, over 4000 draws each; fixed seeds), and their mean must be timm's (x3), which only
    rounding to the nearest bin gives (truncating shifts it by half a bin)."""
    from scipy import stats

    scale = (NUM_BINS - 1) / 10
    bins = (drawn_bins_torch if backend == "torch" else drawn_bins_dali)(
        round(timm_m * scale), timm_mstd * scale, 4000
    )
    reference = timm_magnitudes(timm_m, timm_mstd, 4000) * scale
    assert bins.min() >= 0 and bins.max() <= NUM_BINS - 1
    edges = [-np.inf, *(np.arange(NUM_BINS - 1) + 0.5), np.inf]
    table = np.stack([np.bincount(bins, minlength=NUM_BINS), np.histogram(reference, edges)[0]])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3, table
    assert abs(bins.mean() - reference.mean()) < 0.15  # 2.5 to 4 standard errors of the difference


def dali_augmented(crops: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """`crops` through the DALI policy of `cfg`, in a CPU pipeline as the loader builds it."""
    from nvidia.dali import fn, pipeline_def

    from imagenet_ddp.data.augment import dali_policy

    batch = [crop.permute(1, 2, 0).contiguous().numpy() for crop in crops]

    @pipeline_def(enable_conditionals=True)
    def augment():
        return dali_policy(fn.external_source(source=lambda: batch, layout="HWC"), SIDE, settings(cfg))

    pipe = augment(batch_size=len(batch), num_threads=2, device_id=None, seed=11)
    pipe.build()
    out = pipe.run()[0]
    return torch.stack([torch.from_numpy(np.array(out[i])).permute(2, 0, 1) for i in range(len(batch))])


def per_image_statistics(augmented: torch.Tensor, crops: torch.Tensor) -> dict[str, torch.Tensor]:
    x = augmented.double()
    changed = (augmented.int() - crops.int()).abs() > 2  # more than a blend's rounding
    stats = {f"mean{c}": x[:, c].mean((1, 2)) for c in range(3)}
    stats |= {f"std{c}": x[:, c].std((1, 2)) for c in range(3)}
    return stats | {"changed": changed.double().mean((1, 2, 3))}


@pytest.mark.slow
@needs_dali
@pytest.mark.parametrize("policy", list(POLICIES))
def test_dali_and_torch_policies_agree_in_distribution(crops, policy):
    """Both backends augment the same 256 crops, 4 times each; their per-image statistics (channel
    means and stds, the fraction of pixels changed) must have the same expectation. Each backend's
    average is random (which ops each image drew): the tolerance is 4 standard errors of the mean
    paired difference (over 1024 images; ~2-3% of a mean's range), plus what the libraries' known
    per-pixel differences may add: 1.5 levels for a mean or a std (Equalize's PIL and OpenCV
    tables, blend rounding), 2% for the fraction changed."""
    cfg = DataConfig(**POLICIES[policy])
    ours = torch_policy(cfg)
    crops = crops.repeat(4, 1, 1, 1)  # 4 draws of the policy per crop: half the tolerance of one
    by_torch = torch.stack([ours(crop, seed) for seed, crop in enumerate(crops)])
    by_dali = dali_augmented(crops, cfg)
    t, d = per_image_statistics(by_torch, crops), per_image_statistics(by_dali, crops)
    n = len(crops)
    for name in t:
        error = (t[name] - d[name]).std() / math.sqrt(n)  # paired: the same crop on both sides
        slack = 0.02 if name == "changed" else 1.5
        assert abs(t[name].mean() - d[name].mean()) <= 4 * error + slack, (
            name,
            t[name].mean(),
            d[name].mean(),
        )
    for stats in (t, d):  # visibly: on average over a third of the pixels move by more than 2 levels
        assert stats["changed"].mean() > 0.33


# Mean absolute difference (levels) allowed between DALI's op and torchvision's at the same magnitude:
# blends round on DALI and truncate on torchvision (a level at most: 1.0, the default), PIL's and DALI's bilinear warps
# differ at the edges (a few pixels by a lot), Equalize's lookup tables by a level or two.
OP_TOLERANCE = {"ShearX": 2.0, "ShearY": 2.0, "Rotate": 2.5, "Equalize": 4.0}


def torchvision_op(
    transform: v2.Transform, name: str, images: torch.Tensor, magnitude: float
) -> torch.Tensor:
    """torchvision's own op `name` of `transform` at `magnitude`, on PIL images (as its policies run)."""
    out = [
        on_pil(
            lambda pil: transform._apply_image_or_video_transform(
                pil, name, magnitude, BILINEAR, transform._fill
            ),
            image,
        )
        for image in images
    ]
    return torch.stack(out)


def dali_ops_at(images: torch.Tensor, policy: str, cases: list[tuple[str, int, int]], num_bins: int) -> list:
    """The policy's DALI augmentation `name` at magnitude bin `bin_`, negated when `sign` is 1, for
    each (name, bin_, sign) of `cases`, on `images`: one CPU pipeline with an output per case."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import signed_bin

    from imagenet_ddp.data.augment import _dali_kwargs

    suite, batch = dali_suite(policy, SIDE), [image.permute(1, 2, 0).contiguous().numpy() for image in images]

    @pipeline_def
    def ops():
        source = fn.external_source(source=lambda: batch, layout="HWC")
        outs = []
        for name, bin_, sign in cases:
            level = signed_bin(bin_, random_sign=fn.random.uniform(values=[sign], dtype=types.INT32))
            outs.append(
                suite[name](source, magnitude_bin=level, num_magnitude_bins=num_bins, **_dali_kwargs())
            )
        return tuple(outs)

    pipe = ops(batch_size=len(batch), num_threads=1, device_id=None, seed=3)
    pipe.build()
    return [
        torch.stack([torch.from_numpy(np.array(out[i])).permute(2, 0, 1) for i in range(len(batch))])
        for out in pipe.run()
    ]


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().double().mean().item()


@needs_dali
@pytest.mark.parametrize("policy", ["ta_wide", "ra", "imagenet"])
def test_each_dali_op_is_torchvisions_op_at_the_same_magnitude(crops, policy):
    """Every op of the policy's DALI suite, at two fixed bins, against torchvision's own op of that
    name at the magnitude torchvision's table gives the bin (its _AUGMENTATION_SPACE). A signed op is
    run with both of DALI's signs: each must be torchvision's op at one sign (and the two at opposite
    signs, by far: a shear or rotation that never turns one way fails), as both draw the sign 50/50.
    An unsigned op must be torchvision's at the magnitude itself."""
    transform = torchvision_transform(policy)
    space, num_bins = type(transform)._AUGMENTATION_SPACE, 10 if policy == "imagenet" else NUM_BINS
    names = [name for name in dali_suite(policy, SIDE) if name in space]
    assert sorted(names) == sorted(space)  # the whole of torchvision's suite, nothing left out
    images = crops[:8]
    cases = [(n, b, sign) for n in names for b in (num_bins // 3, num_bins - 1) for sign in (0, 1)]
    for (name, bin_, sign), by_dali in zip(cases, dali_ops_at(images, policy, cases, num_bins), strict=True):
        magnitudes, signed = space[name][0](num_bins, SIDE, SIDE), space[name][1]
        magnitude = float(magnitudes[bin_]) if magnitudes is not None and magnitudes.ndim > 0 else 0.0
        tolerance = OP_TOLERANCE.get(name, 1.0)
        if not signed:
            difference = mad(by_dali, torchvision_op(transform, name, images, magnitude))
            assert difference <= tolerance, (name, bin_, difference)
            continue
        same, opposite = (
            mad(by_dali, torchvision_op(transform, name, images, m)) for m in (magnitude, -magnitude)
        )
        matched = min(same, opposite)
        assert matched <= tolerance and max(same, opposite) >= 2 * matched, (
            name,
            bin_,
            sign,
            same,
            opposite,
        )
        if sign == 0:
            first = same < opposite  # DALI's sign 0 is torchvision's + for most ops, its - for shears
        else:
            assert (same < opposite) != first, f"{name}: both DALI signs turn the same way"


def nearest_op(outputs: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outputs [n, probe, 3, H, W], candidates [probe, k, 3, H, W]: per output, the index of the
    closest candidate of its probe, the distance to it (mean |difference|) and to the next closest."""
    outputs = outputs.short()
    distances = torch.stack(
        [
            (outputs - candidates[:, k].short()).abs().float().mean((2, 3, 4))
            for k in range(candidates.shape[1])
        ],
        -1,
    )
    two = distances.topk(2, -1, largest=False)
    return two.indices[..., 0].flatten(), two.values[..., 0].flatten(), two.values[..., 1].flatten()


@needs_dali
def test_dali_randaugment_chooses_its_ops_and_signs_as_torchvision_does(crops):
    """RandAugment with one op at bin 27 through the whole DALI policy, 1024 times (fixed seed: the
    test is deterministic): each output is identified as torchvision's op and sign it is closest to,
    and the ops must be uniform over torchvision's 14 (chi-square, p > 0.001) and signs 50/50 (a
    binomial bound), as torchvision draws them (torch.randint over the suite, rand <= 0.5)."""
    from scipy import stats

    level = 27
    cfg = DataConfig(auto_augment="ra", ra_num_ops=1, ra_magnitude=level)
    transform = v2.RandAugment(
        num_ops=1, magnitude=level, num_magnitude_bins=NUM_BINS, interpolation=BILINEAR
    )
    space = type(transform)._AUGMENTATION_SPACE
    probes = (crops[:8] * 0.75 + 32).round().byte()  # in [32, 223]: AutoContrast is visibly not Identity
    labels, candidates = [], []
    for name, (magnitudes, signed) in space.items():
        table = magnitudes(NUM_BINS, SIDE, SIDE)
        magnitude = float(table[level]) if table is not None and table.ndim > 0 else 0.0
        for sign in (1, -1) if signed and magnitude else (1,):
            labels.append((name, sign))
            candidates.append(torchvision_op(transform, name, probes, sign * magnitude))
    candidates = torch.stack(candidates, 1)  # [probe, candidate, 3, H, W]
    repeats = 128
    outputs = dali_augmented(probes.repeat(repeats, 1, 1, 1), cfg)
    chosen, distance, runner_up = nearest_op(outputs.view(repeats, *probes.shape), candidates)
    assert torch.all(runner_up > 2 * distance + 0.2)  # each output is one op and sign, unmistakably
    drawn = [labels[i] for i in chosen.tolist()]
    ops = np.array([sum(1 for name, _ in drawn if name == op) for op in space])
    assert stats.chisquare(ops).pvalue > 1e-3, dict(zip(space, ops.tolist(), strict=True))
    signs = [sign for name, sign in drawn if (name, -sign) in labels]
    negative = sum(1 for sign in signs if sign < 0)
    assert stats.binomtest(negative, len(signs)).pvalue > 1e-3, (negative, len(signs))


def train_pass(cfg, epoch: int, start: int = 0, state: dict | None = None, stop: int | None = None):
    """(batches from `start`, loader state after `stop` batches if asked) of rank 1 of 2."""
    with build_loader(cfg, "train", rank=1, world_size=2, seed=5) as loader:
        loader.set_epoch(epoch)
        if state is not None:
            loader.load_state_dict(state)
        batches = loader.iter_from(start) if start else iter(loader)
        out = []
        for x, y in batches:
            out.append((x.clone(), y.clone()))
            if len(out) == stop:
                buffer = io.BytesIO()
                torch.save(loader.state_dict(), buffer)  # as a checkpoint carries it
                buffer.seek(0)
                return out, torch.load(buffer, weights_only=True), loader.restored
        return out, None, loader.restored


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", DALI])
@pytest.mark.parametrize("policy", ["ta_wide", "ra-mstd", "imagenet"])
def test_train_passes_with_a_policy_are_deterministic_and_resume_exactly(shards, backend, policy):
    cfg = DataConfig(
        root=str(shards),
        backend=backend,
        image_size=32,
        batch_size=16,
        workers=2,
        shuffle_buffer=16,
        **POLICIES[policy],
    )
    full = train_pass(cfg, 1)[0]
    assert len(full) == 8
    # Three loaders: the uninterrupted pass, one stopped after 3 batches, one resumed from its state.
    before, state, _ = train_pass(cfg, 1, stop=3)
    rest, _, restored = train_pass(cfg, 1, start=3, state=state)
    assert restored == (backend == "dali")  # DALI restores its checkpoint; torch replays without decoding
    for a, b in zip(full, before + rest, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_dali
def test_the_policy_is_in_the_dali_pipeline_and_its_checkpoint_key(shards):
    cfg = DataConfig(
        root=str(shards), backend="dali", image_size=32, batch_size=16, workers=1, **POLICIES["ra"]
    )
    with build_loader(cfg, "train") as loader:
        args, key = loader._pipeline_args(0)
        assert args["augment"] == ("ra", 2, 9, 0.0) and not loader.crop_only  # DALI resizes, flips, augments
    with build_loader(DataConfig(**{**vars(cfg), "ra_magnitude": 10}), "train") as loader:
        assert loader._pipeline_args(0)[1] != key  # a checkpoint of another policy is not restored
    with build_loader(DataConfig(**{**vars(cfg), "auto_augment": "none"}), "train") as loader:
        assert loader.crop_only and loader._pipeline_args(0)[0]["augment"] == ("none",)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"auto_augment": "randaugment"}, "data.auto_augment must be one of none, ta_wide, ra, imagenet"),
        ({"ra_num_ops": 0}, "data.ra_num_ops must be at least 1"),
        ({"ra_magnitude": 31}, "data.ra_magnitude is a bin in [0, 30]"),
        ({"ra_magnitude_std": -0.5}, "data.ra_magnitude_std must be 0 (off) or more"),
    ],
)
def test_bad_policy_settings_are_one_line_config_errors(change, message):
    with pytest.raises(UserError) as e:
        DataConfig(**change)
    assert message in str(e.value) and "\n" not in str(e.value)
