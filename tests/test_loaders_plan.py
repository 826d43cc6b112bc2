"""Who reads what in an epoch (imagenet_ddp/data/plan.py), over many shapes of split and job.

Pure functions, so these check every (shard sizes, world size, readers) case exhaustively and
fast; tests/test_loaders.py checks the same properties end to end through real loaders.
"""

from collections import Counter

import pytest

from imagenet_ddp.data import plan
from imagenet_ddp.data.base import count_steps
from imagenet_ddp.errors import UserError

SPLITS = [[48, 48, 48, 48, 48, 20], [130], [5, 1, 7], [3], [1000, 1, 999, 500]]
JOBS = [(1, 1), (2, 1), (3, 2), (4, 3), (8, 4)]  # (world_size, readers per rank)


def samples(pieces):
    return [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("world_size, readers", JOBS)
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_train_epoch_is_a_duplicate_free_set_of_full_batches(sizes, world_size, readers, batch_size):
    steps = plan.train_steps(sum(sizes), world_size, batch_size)
    if steps == 0:  # fewer samples than one global batch: the loaders refuse the split, and nothing is read
        assert sum(sizes) < world_size * batch_size
        with pytest.raises(UserError, match="not one full batch"):
            count_steps("train", sum(sizes), world_size, batch_size, train=True)
        for rank in range(world_size):
            for reader in range(readers):
                assert plan.train_pieces(sizes, 5, 0, rank, world_size, batch_size, reader, readers) == []
        return
    assert count_steps("train", sum(sizes), world_size, batch_size, train=True) == steps
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            for reader in range(readers):
                pieces = plan.train_pieces(sizes, 5, epoch, rank, world_size, batch_size, reader, readers)
                mine = samples(pieces)
                assert len(mine) == len(plan.reader_steps(steps, reader, readers)) * batch_size
                seen += mine
        assert len(seen) == steps * batch_size * world_size
        assert max(Counter(seen).values()) == 1
        assert all(0 <= i < sizes[s] for s, i in seen)


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("world_size, readers", JOBS)
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_eval_covers_every_sample_exactly_once_with_equal_steps(sizes, world_size, readers, batch_size):
    total, steps = sum(sizes), plan.eval_steps(sum(sizes), world_size, batch_size)
    seen = []
    for rank in range(world_size):
        batches = {}
        for reader in range(readers):
            mine = plan.eval_batches(sizes, rank, world_size, batch_size, reader, readers)
            batches.update(zip(plan.reader_steps(steps, reader, readers), mine, strict=True))
        assert sorted(batches) == list(range(steps))  # every rank: the same step count
        for step, pieces in batches.items():
            real = samples(pieces)
            assert len(real) == plan.eval_valid_count(total, rank, world_size, batch_size, step)
            seen += real
    assert sorted(seen) == [(s, i) for s, n in enumerate(sizes) for i in range(n)]


def test_epochs_differ_and_repeat_exactly():
    sizes = [48, 48, 48, 48, 48, 20]
    first = samples(plan.train_pieces(sizes, seed=1, epoch=3, rank=1, world_size=2, batch_size=8))
    assert first == samples(plan.train_pieces(sizes, seed=1, epoch=3, rank=1, world_size=2, batch_size=8))
    assert first != samples(plan.train_pieces(sizes, seed=1, epoch=4, rank=1, world_size=2, batch_size=8))
    assert first != samples(plan.train_pieces(sizes, seed=2, epoch=3, rank=1, world_size=2, batch_size=8))


def test_a_single_shard_still_moves_rank_boundaries_between_epochs():
    starts = {plan.train_pieces([1000], 0, e, 1, 4, 10)[0].start for e in range(10)}
    assert len(starts) == 10


def test_rank_ranges_are_dalis_sharding_rule():
    # DALI's readers give shard_id r of n the samples [N*r//n, N*(r+1)//n) (checked against DALI
    # itself by the exact-once test in test_loaders.py); the plan must use the same rule.
    assert [plan.rank_range(15, r, 2) for r in range(2)] == [(0, 7), (7, 15)]
    assert [plan.rank_range(15, r, 4) for r in range(4)] == [(0, 3), (3, 7), (7, 11), (11, 15)]


@pytest.mark.parametrize("sizes", SPLITS + [[300, 300, 7]])
@pytest.mark.parametrize("world_size, readers", JOBS[1:])
def test_repeated_passes_are_full_batches_each_sample_on_up_to_k_ranks(sizes, world_size, readers):
    # data.repeated_aug: DeiT's epoch length (N // 256 * 256 samples over the ranks) in full batches,
    # readers splitting their rank's pass; tests/test_repeated_aug.py checks the counts against
    # torchvision's RASampler.
    total = sum(sizes)
    for batch_size, repeats in [(1, 2), (4, 3), (16, 2)]:
        if repeats > world_size:
            with pytest.raises(UserError, match="data.repeated_aug"):
                count_steps("train", total, world_size, batch_size, train=True, repeats=repeats)
            continue
        steps = plan.train_steps(total, world_size, batch_size, repeats)
        assert steps == total // 256 * 256 // world_size // batch_size
        if steps == 0:
            with pytest.raises(UserError, match="rounded down to"):
                count_steps("train", total, world_size, batch_size, train=True, repeats=repeats)
        seen = Counter()
        for rank in range(world_size):
            mine = []
            for reader in range(readers):
                pieces = plan.train_pieces(
                    sizes, 5, 1, rank, world_size, batch_size, reader, readers, repeats
                )
                assert len(samples(pieces)) == len(plan.reader_steps(steps, reader, readers)) * batch_size
                mine += samples(pieces)
            assert len(set(mine)) == len(mine) == steps * batch_size  # never a sample twice on one rank
            seen.update(mine)
        assert not seen or set(seen.values()) <= {repeats - 1, repeats}
