"""Repeated augmentation (data.repeated_aug = k, plan.pass_spans): what each rank reads and sees.

The reference is torchvision's RASampler (references/classification/sampler.py, DeiT's samplers.py),
its index math written out below: it sets the epoch length and the multiset of repetitions a plan
must match. The real loaders (torch, DALI on the CPU) are then checked over tiny shards.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from imagenet_ddp.data import PAD_LABEL, DataConfig, build_loader, plan
from imagenet_ddp.data.base import count_steps
from imagenet_ddp.data.shardset import open_split, read_index
from imagenet_ddp.errors import UserError
from tests.fixtures import make_imagenet_extracted
from tests.test_loaders import make_shards


def ra_sampler(num_samples: int, world_size: int, repeats: int, seed: int = 0) -> list[list[int]]:
    """torchvision's RASampler: each rank's indices for one epoch (its __iter__, for every rank)."""
    g = torch.Generator()
    g.manual_seed(seed)
    indices = torch.randperm(num_samples, generator=g).repeat_interleave(repeats).tolist()
    per_rank = int(math.ceil(num_samples * float(repeats) / world_size))
    total = per_rank * world_size
    indices += indices[: total - len(indices)]
    selected = int(math.floor(num_samples // 256 * 256 / world_size))
    return [indices[rank:total:world_size][:selected] for rank in range(world_size)]


def plan_reads(sizes, world_size, batch_size, repeats, epoch=0, readers=1) -> list[list[tuple[int, int]]]:
    """The (shard, sample) pairs each rank reads in `epoch`, its readers' shares in order."""
    return [
        [
            (p.shard, i)
            for reader in range(readers)
            for p in plan.train_pieces(
                sizes, 5, epoch, rank, world_size, batch_size, reader, readers, repeats
            )
            for i in range(p.start, p.stop)
        ]
        for rank in range(world_size)
    ]


def copies(reads: list[list]) -> dict:
    """sample -> the ranks that read it; fails when a rank reads a sample twice in one epoch."""
    ranks = defaultdict(list)
    for rank, mine in enumerate(reads):
        for sample in mine:
            ranks[sample].append(rank)
    twice = [s for s, r in ranks.items() if len(set(r)) < len(r)]
    assert not twice, f"copies of {twice[:3]} on the same rank"
    return ranks


def files(pieces: list[plan.Piece]) -> set[int]:
    return {p.shard for p in pieces}


CASES = [  # (shard sizes, world size, batch size, repeats)
    ([300] * 10, 8, 4, 3),
    ([1000, 1, 999, 500], 5, 8, 2),  # 5 ranks, k=2: not divisible
    ([700], 3, 16, 3),  # k = world size: every rank reads the whole covered run
    ([48] * 40 + [20], 7, 10, 3),
    ([260], 2, 8, 2),
    ([300] * 10, 8, 4, 1),  # off: each sample at most once, as without the setting
]


@pytest.mark.parametrize("sizes, world_size, batch_size, repeats", CASES)
def test_each_sample_is_read_k_times_on_k_ranks_as_torchvisions_sampler_counts(
    sizes, world_size, batch_size, repeats
):
    total = sum(sizes)
    ref = ra_sampler(total, world_size, repeats)
    steps = count_steps("train", total, world_size, batch_size, train=True, repeats=repeats)
    if repeats > 1:  # DeiT's epoch length, in full batches (its loader drops the last partial one)
        assert steps == len(ref[0]) // batch_size
    for epoch in (0, 1):
        reads = plan_reads(sizes, world_size, batch_size, repeats, epoch, readers=2)
        assert [len(r) for r in reads] == [steps * batch_size] * world_size  # equal steps
        mine = Counter({s: len(r) for s, r in copies(reads).items()})
        assert sum(mine.values()) == world_size * steps * batch_size
        if repeats == 1:  # off: each sample at most once (torchvision's sampler is not used then)
            assert set(mine.values()) == {1}
            continue
        # The reference, cut to the same full batches: its multiset of repetitions.
        theirs = Counter({s: len(r) for s, r in copies([r[: steps * batch_size] for r in ref]).items()})
        assert sum(theirs.values()) == sum(mine.values())
        assert len(mine) == len(theirs)  # as many distinct samples: ceil(W x L / k)
        assert max(mine.values()) == max(theirs.values()) == repeats
        assert set(mine.values()) <= {repeats - 1, repeats}
        assert sum(1 for c in mine.values() if c < repeats) < repeats  # like DeiT's cut: < k samples short


def test_copies_of_a_sample_go_to_neighbouring_ranks():
    sizes, world_size, batch_size, k = [48] * 40 + [20], 7, 10, 3
    for ranks in copies(plan_reads(sizes, world_size, batch_size, k)).values():
        runs = [{(first + i) % world_size for i in range(len(ranks))} for first in range(world_size)]
        assert set(ranks) in runs


def test_the_check_catches_copies_on_one_rank():
    # Negative control: a plan that gives each rank its own range k times (every copy on one rank).
    sizes, world_size, batch_size, k = [300] * 10, 8, 4, 3
    own = plan_reads(sizes, world_size, batch_size, 1)
    with pytest.raises(AssertionError, match="on the same rank"):
        copies([r[: len(r) // k] * k for r in own])


@pytest.mark.parametrize("sizes, world_size, batch_size, repeats", CASES[:4])
def test_a_rank_opens_as_few_shards_as_without_repeats(sizes, world_size, batch_size, repeats):
    # A rank's pass is at most 2 runs of the epoch's stream (the second where its window wraps), so
    # it opens at most one shard more than a run of the same length: not the whole split.
    total = sum(sizes)
    length = plan.train_steps(total, world_size, batch_size, repeats) * batch_size
    for epoch in (0, 1):
        order, _ = plan.epoch_layout(len(sizes), total, 5, epoch)
        run = max(len(files(plan.stream_pieces(sizes, order, 0, s, length))) for s in range(total))
        for rank in range(world_size):
            spans = plan.pass_spans(total, rank, world_size, batch_size, repeats)
            assert len(spans) <= 2 and sum(n for _, n in spans) == length
            pieces = plan.train_pieces(sizes, 5, epoch, rank, world_size, batch_size, repeats=repeats)
            assert len(files(pieces)) <= run + 1


def test_at_imagenet_scale_a_rank_opens_a_few_shards_and_torchvisions_split_opens_most():
    # 1,281,167 samples in 1,024 shards, 512 ranks, k=3, 64 per batch (docs/training.md quotes this).
    total, shard_count, world_size, batch_size = 1_281_167, 1024, 512, 64
    per = -(-total // shard_count)
    sizes = [per] * (total // per) + [total % per]
    opened = {
        k: [
            len(files(plan.train_pieces(sizes, 0, 0, r, world_size, batch_size, repeats=k)))
            for r in range(world_size)
        ]
        for k in (1, 3)
    }
    assert statistics.mean(opened[3]) <= statistics.mean(opened[1]) + 0.1
    # The k - 1 ranks whose window wraps around the covered run read 2 runs: up to 2 shards more.
    assert max(opened[3]) <= max(opened[1]) + 2 and sum(n > max(opened[1]) for n in opened[3]) <= 2
    # torchvision's RASampler over the same files (its samples dealt by stride): most shards per rank.
    starts = torch.tensor([0] + sizes).cumsum(0)
    rank0 = torch.tensor(ra_sampler(total, world_size, 3)[0])
    assert len(set((torch.searchsorted(starts, rank0, right=True) - 1).tolist())) > 800


def test_a_pass_is_a_pure_function_so_a_resumed_reader_reads_the_rest():
    # A resumed run recomputes its pieces: the same ones; a reader's share starts after the others'.
    sizes, world_size, batch_size, k = [48] * 40 + [20], 7, 10, 3
    whole = plan_reads(sizes, world_size, batch_size, k, epoch=2)
    assert whole == plan_reads(sizes, world_size, batch_size, k, epoch=2)
    assert whole == plan_reads(sizes, world_size, batch_size, k, epoch=2, readers=3)
    assert whole != plan_reads(sizes, world_size, batch_size, k, epoch=3)


def test_bad_repeats_are_one_line_errors():
    with pytest.raises(UserError, match=r"data.repeated_aug must be at least 1"):
        DataConfig(repeated_aug=0)
    with pytest.raises(UserError, match=r"data.repeated_aug \(3\) must be in \[1, world_size=2\]"):
        count_steps("train", 1000, 2, 8, train=True, repeats=3)
    with pytest.raises(UserError, match=r"200 samples \(rounded down to 0 with repeated augmentation\)"):
        count_steps("train", 200, 2, 8, train=True, repeats=2)
    assert count_steps("val", 200, 2, 8, train=False, repeats=2) == plan.eval_steps(200, 2, 8)


# Real loaders: 264 classes of one train image each (a label names a sample: DeiT's formula needs
# >= 256 samples), shards of 60, 2 ranks, k=2.
CLASSES, BATCH, WORLD, K = 264, 8, 2, 2
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.needs("nvidia.dali"))]  # DALI on the CPU


@pytest.fixture(scope="module")
def unique(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ra-source")
    make_imagenet_extracted(
        src, num_classes=CLASSES, per_class=1, val_per_class=1, bad=False, side_range=(24, 40)
    )
    return make_shards(src, tmp_path_factory.mktemp("ra-shards"), shard_size=60)


def config(root: Path, backend: str, workers: int) -> DataConfig:
    return DataConfig(
        root=str(root),
        backend=backend,
        image_size=16,
        eval_size=16,
        batch_size=BATCH,
        workers=workers,
        shuffle_buffer=32,
        repeated_aug=K,
    )


def planned_labels(root: Path, rank: int, epoch: int) -> list[int]:
    """The labels of the samples the plan gives `rank`, read from the tars through their indexes."""
    split = open_split(root, "train")
    sizes = [s.num_samples for s in split.shards]
    labels = []
    for p in plan.train_pieces(sizes, 0, epoch, rank, WORLD, BATCH, repeats=K):
        shard = split.shards[p.shard]
        where = read_index(shard).cls
        with open(shard.path, "rb") as f:
            for offset, size in where[p.start : p.stop]:
                f.seek(offset)
                labels.append(int(f.read(size)))
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_see_the_planned_samples_each_once_with_their_own_augmentations(unique, backend):
    cfg = config(unique, backend, workers=2)
    seen = []
    for rank in range(WORLD):
        with build_loader(cfg, "train", rank=rank, world_size=WORLD) as loader:
            loader.set_epoch(1)
            batches = [(x.clone(), y.clone()) for x, y in loader]
            assert len(loader) == (CLASSES // 256 * 256 // WORLD) // BATCH == 16
        labels = torch.cat([y for _, y in batches]).tolist()
        assert sorted(labels) == sorted(planned_labels(unique, rank, 1))
        assert len(set(labels)) == len(labels)  # each sample once on a rank
        seen.append(dict(zip(labels, torch.cat([x for x, _ in batches]), strict=True)))
    # Here every sample of the covered run is on both ranks: k = world size.
    assert set(seen[0]) == set(seen[1]) and len(seen[0]) == 128
    same = sum(torch.equal(seen[0][y], seen[1][y]) for y in seen[0])
    assert same <= 1  # the two copies of a sample are augmented differently (per-rank seeds)
    # Validation is never repeated: every val sample exactly once over the ranks.
    val = []
    for rank in range(WORLD):
        with build_loader(cfg, "val", rank=rank, world_size=WORLD) as loader:
            val += [y for _, labels in loader for y in labels.tolist() if y != PAD_LABEL]
    assert sorted(val) == list(range(CLASSES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_pass_resumed_mid_epoch_continues_where_it_stopped(unique, backend):
    cfg = config(unique, backend, workers=1)
    where = dict(rank=1, world_size=WORLD, seed=3)
    with build_loader(cfg, "train", **where) as loader:
        loader.set_epoch(1)
        whole = [(x.clone(), y.clone()) for x, y in loader]
    with build_loader(cfg, "train", **where) as loader:  # interrupted after 5 batches
        loader.set_epoch(1)
        batches = iter(loader)
        for _ in range(5):
            next(batches)
        state = loader.state_dict()
    with build_loader(cfg, "train", **where) as loader:  # resumed: DALI from its state, torch by replay
        loader.set_epoch(1)
        loader.load_state_dict(state)
        rest = [(x.clone(), y.clone()) for x, y in loader.iter_from(5)]
        assert loader.restored == (backend == "dali")
    assert len(rest) == len(whole) - 5
    assert all(
        torch.equal(y, y2) and torch.equal(x, x2) for (x, y), (x2, y2) in zip(whole[5:], rest, strict=True)
    )


@pytest.mark.slow
def test_two_ranks_train_an_epoch_with_repeats_under_torchrun(unique, tmp_path):
    # Equal steps on both ranks (unequal counts hang DDP), DeiT's epoch length in the step count.
    from tests.test_train import small_run
    from tests.test_train_ddp import environment, metrics, run, torchrun

    out = tmp_path / "run"
    done = run(
        torchrun(*small_run(unique, out, "data.repeated_aug=2", "train.epochs=1")), environment(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in metrics(out)] == [CLASSES // 256 * 256 // (WORLD * BATCH)]
