"""Which samples each rank (and each reader of a rank) visits in an epoch.

Pure functions of (seed, epoch, rank, world_size, sizes): a run is reproducible, a resumed run
sees the same epochs, and every rank computes the same step count without talking to the others.

Ranks split the split's samples, not its files: rank r owns samples [N*r//W, N*(r+1)//W) of the
epoch's sample stream (DALI's own rule for `shard_id`/`num_shards`), so any number of shard files
serves any number of ranks, and validation covers every sample exactly once.

Repeated augmentation (data.repeated_aug = k > 1; DeiT's RASampler, torchvision's `--ra-reps`): each
sample of the epoch is read by k different ranks, each with its own random crop and policy (the
draws are seeded per rank), and the epoch keeps about its usual length. DeiT and torchvision repeat
each index of a random permutation k times, deal the list to ranks by stride (so the copies of one
sample land on k neighbouring ranks) and cut each rank to floor(N // 256 * 256 / W) samples: an epoch
then covers about N / k distinct samples, k times each, and every rank reads samples from the whole
split (with one file per sample, every rank opens nearly every shard). Here the same counts come from
contiguous windows: the epoch covers the first C = ceil(W x L / k) samples of its stream (L = the
pass of a rank: DeiT's length rounded down to full batches) and rank r reads the L samples from
position r x C // W on (wrapping around C). A sample is then read by the k (k - 1 for fewer than k
of them) consecutive ranks whose windows hold it, never twice by one rank, and a rank opens the
shards of L consecutive samples, as many as without repeats. Any world size >= k works the same
way. Differences from DeiT: the epoch's covered samples are a run of the shuffled shard stream, not
a random subset; a rank's copy of a sample comes at its own step (DeiT's copies mostly share one
step), ordered by the rank's shuffle buffer; validation is never repeated.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard number `shard` (its position in the manifest)."""

    shard: int
    start: int
    stop: int


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (DALI takes signed 32-bit seeds)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def train_steps(num_samples: int, world_size: int, batch_size: int, repeats: int = 1) -> int:
    if repeats > 1:
        # DeiT's and torchvision's RASampler: floor(N // 256 * 256 / W) samples per rank, in full
        # batches (DeiT's loader drops the last partial one).
        return num_samples // 256 * 256 // world_size // batch_size
    # Every rank owns at least N // W samples, so every rank can fill this many full batches.
    return num_samples // (world_size * batch_size)


def pass_spans(
    num_samples: int, rank: int, world_size: int, batch_size: int, repeats: int = 1
) -> list[tuple[int, int]]:
    """(start, count) runs of the epoch's stream that `rank` reads, in order: train_steps x batch_size
    samples. Without repeats, the start of the rank's range; with k repeats, a window of the first
    C = ceil(W x L / k) samples, wrapped around C (see the module docstring)."""
    length = train_steps(num_samples, world_size, batch_size, repeats) * batch_size
    if length == 0:
        return []
    if repeats == 1:
        return [(rank_range(num_samples, rank, world_size)[0], length)]
    covered = -(-world_size * length // repeats)  # >= length, as repeats <= world_size
    start = rank * covered // world_size
    first = min(length, covered - start)
    return [(start, first), (0, length - first)] if first < length else [(start, length)]


def eval_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    # The largest rank owns ceil(N / W) samples; smaller ranks pad their last batch.
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def eval_valid_count(num_samples: int, rank: int, world_size: int, batch_size: int, step: int) -> int:
    """How many samples of `step`'s batch on `rank` are real (the rest is padding)."""
    lo, hi = rank_range(num_samples, rank, world_size)
    return max(0, min(batch_size, hi - lo - step * batch_size))


def epoch_layout(num_shards: int, num_samples: int, seed: int, epoch: int) -> tuple[list[int], int]:
    """The epoch's shard order and the rotation of the sample stream, the same on every rank.

    Shuffling whole files keeps reads sequential; the rotation moves rank boundaries by a random
    number of samples each epoch, so a rank does not see the same subset every epoch even when
    the split is a single file.
    """
    rng = random.Random(derive_seed(seed, epoch))
    order = list(range(num_shards))
    rng.shuffle(order)
    return order, rng.randrange(num_samples)


def stream_pieces(sizes: list[int], order: list[int], offset: int, start: int, count: int) -> list[Piece]:
    """Samples [start, start + count) of the stream `shards in order, rotated left by offset`."""
    total = sum(sizes)
    starts = [0]
    for i in order:
        starts.append(starts[-1] + sizes[i])
    pieces, pos = [], (offset + start) % total
    while count > 0:
        k = bisect.bisect_right(starts, pos) - 1
        within = pos - starts[k]
        take = min(count, sizes[order[k]] - within)
        pieces.append(Piece(order[k], within, within + take))
        count -= take
        pos = (pos + take) % total
    return pieces


def reader_steps(steps: int, reader: int, num_readers: int) -> range:
    # Round-robin, as torch's DataLoader collects batches from its workers: reader w makes
    # batches w, w + R, w + 2R, ... so the batch sequence does not depend on worker timing.
    return range(reader, steps, num_readers)


def train_pieces(
    sizes: list[int],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    reader: int = 0,
    num_readers: int = 1,
    repeats: int = 1,
) -> list[Piece]:
    """A reader's contiguous share of its rank's pass (pass_spans): exactly batch_size x its step count."""
    total = sum(sizes)
    steps = train_steps(total, world_size, batch_size, repeats)
    order, offset = epoch_layout(len(sizes), total, seed, epoch)
    skip = sum(len(reader_steps(steps, r, num_readers)) for r in range(reader)) * batch_size
    count = len(reader_steps(steps, reader, num_readers)) * batch_size
    pieces = []
    for start, length in pass_spans(total, rank, world_size, batch_size, repeats):
        take = max(0, min(count, length - skip))
        if take:
            pieces += stream_pieces(sizes, order, offset, start + skip, take)
        skip, count = max(0, skip - length), count - take
    return pieces


def eval_batches(
    sizes: list[int], rank: int, world_size: int, batch_size: int, reader: int = 0, num_readers: int = 1
) -> list[list[Piece]]:
    """The real samples of each of a reader's eval batches, in manifest order (may be short or empty)."""
    total = sum(sizes)
    lo, hi = rank_range(total, rank, world_size)
    batches = []
    for step in reader_steps(eval_steps(total, world_size, batch_size), reader, num_readers):
        first = min(hi, lo + step * batch_size)
        stop = min(hi, first + batch_size)
        batches.append(stream_pieces(sizes, list(range(len(sizes))), 0, first, stop - first))
    return batches
