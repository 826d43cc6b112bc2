"""What every backend's loader has in common: the contract's bookkeeping, not its data."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from imagenet_ddp.data.plan import eval_steps, train_steps
from imagenet_ddp.errors import UserError


class Loader:
    """Batches of one split for one rank; see `imagenet_ddp.data` for the contract.

    Attributes: split, train, batch_size, steps (= len), num_samples (the whole split, all ranks),
    classes (wnids), class_names, num_classes, epoch.
    """

    def __init__(
        self,
        *,
        split: str,
        train: bool,
        batch_size: int,
        steps: int,
        num_samples: int,
        classes: list[str],
        class_names: list[str],
    ):
        self.split, self.train, self.batch_size, self.steps = split, train, batch_size, steps
        self.num_samples, self.classes, self.class_names = num_samples, classes, class_names
        self.epoch = 0
        self.restored = False  # whether the last iter_from starts from a loaded state, not a replay
        self._running: Iterator | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One pass at a time: starting a new one ends the previous (its workers, its pipeline).
        self.end_pass()
        self.restored = False
        self._running = self._batches()
        return self._running

    def iter_from(self, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The current epoch's batches from number `batch` on (a run resumed mid-epoch).

        Without a state from load_state_dict for this point, the pass replays the batches before
        `batch`: the same data as the interrupted run, at the cost of reading them again."""
        batches = iter(self)
        for _ in range(batch):
            next(batches)
        return batches

    def state_dict(self) -> dict:
        """This rank's position in the running pass, for iter_from after a restart ({} if none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """A state_dict saved by the same rank of an identically configured run."""

    def close(self) -> None:
        """End the current pass, if any, and release everything the loader holds, at once."""
        self.end_pass()

    def end_pass(self) -> None:
        """End the current pass, if any, releasing its worker processes or DALI pipeline at once."""
        running, self._running = self._running, None
        if running is not None:
            running.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def count_steps(
    split: str, num_samples: int, world_size: int, batch_size: int, train: bool, repeats: int = 1
) -> int:
    """Steps per epoch on every rank; a one-line error when training would get no full batch.

    `repeats`: data.repeated_aug, for train passes only (validation is never repeated)."""
    if not train:
        return eval_steps(num_samples, world_size, batch_size)
    if not 1 <= repeats <= world_size:
        raise UserError(
            f"data.repeated_aug ({repeats}) must be in [1, world_size={world_size}]: "
            "each sample's copies go to that many different ranks"
        )
    steps = train_steps(num_samples, world_size, batch_size, repeats)
    if steps == 0:
        rounded = f" (rounded down to {num_samples // 256 * 256} with repeated augmentation)" if repeats > 1 else ""
        raise UserError(
            f"split {split!r} has {num_samples} samples{rounded}: not one full batch of {batch_size} "
            f"for each of {world_size} ranks; lower data.batch_size"
        )
    return steps


def shard_loader_fields(shards, *, world_size: int, batch_size: int, train: bool, repeats: int = 1) -> dict:
    """Loader.__init__ arguments for a loader over a shard split (the dali and torch backends)."""
    return {
        "split": shards.split,
        "train": train,
        "batch_size": batch_size,
        "steps": count_steps(shards.split, shards.num_samples, world_size, batch_size, train, repeats),
        "num_samples": shards.num_samples,
        "classes": shards.classes,
        "class_names": shards.class_names,
    }
