"""Node-local staging: verified copies of the shards a node's ranks read, on the node's own disk.

    sbatch slurm/train.sbatch configs/nvidia_resnet50.yaml 'data.stage_dir=$SLURM_TMPDIR/shards'

With `data.stage_dir` set, run.py has one process per node call `stage_node` before the loaders
exist (the node's other processes wait), and `build_loader` reads every shard with a verified
staged copy from there (`use_staged`), any other from `data.root`.

What is staged: the union, over the passes left in the run (train from the resumed epoch to the
last, and validation), of the shards this node's ranks read (plan.py), in the order they are first
needed. Not per pass: files are shuffled every epoch, so a node's set changes every pass and over a
run it reads most files anyway (with S shards, k read per node and pass, E passes: a share
1 - (1 - k/S)^E of them; ImageNet's 1024 shards on 64 nodes x 8 ranks: k ~ 17, 77% after 90
epochs). Staging per pass would read the shared filesystem as often as not staging at all, in the
critical path of every epoch; staging the union reads each file once per node and job, as whole
files in sequence, and nothing during training. The price is the wait before the first step and
the local disk it takes (the console reports both; a full disk falls back to the shared copy).

Layout: <stage_dir>/<split fingerprint>/<split>/<shard>.tar, its .idx and <shard>.tar.staged, the
record of the verified copy: its sha256 (the manifest's, computed from the copy), size, inode and
mtime in nanoseconds. A later run on the node reuses a copy whose record matches the manifest and
whose size, inode and mtime are still those recorded: any write to the copy changes its mtime, so
140 GB are not hashed again. Copies are written to a temporary name and renamed, so a copy that is
there is whole; two jobs staging the same folder at once each write their own and the last rename wins.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from imagenet_ddp.data import plan
from imagenet_ddp.data.shardset import Shard, ShardSplit, open_split
from imagenet_ddp.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Report:
    """What `stage_node` did: shards and bytes copied or reused, and what did not fit."""

    where: Path
    copied: int = 0
    copied_bytes: int = 0
    reused: int = 0
    reused_bytes: int = 0
    left: int = 0  # shards read from the shared copy: the local disk was full
    seconds: float = 0.0
    warning: str = ""

    def line(self, node: str) -> str:
        rate = f"{self.copied_bytes / 1e9 / self.seconds:.3g} GB/s" if self.seconds > 0 and self.copied else "-"
        return (
            f"staged on {node}: {_size(self.copied_bytes)} copied ({self.copied} shards) and "
            f"{_size(self.reused_bytes)} reused ({self.reused}) in {self.seconds:.1f} s ({rate}) to {self.where}"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def stage_root(stage_dir: str) -> Path:
    """data.stage_dir with environment variables and ~ expanded on this node; an unset variable is an error."""
    expanded = os.path.expanduser(os.path.expandvars(stage_dir))
    if "$" in expanded:
        raise UserError(
            f"data.stage_dir {stage_dir!r}: {expanded.split('$', 1)[1].split('/')[0].strip('{}')} is not "
            "set on this node; set it, or give data.stage_dir a folder"
        )
    return Path(expanded)


def split_dir(root: Path, split: ShardSplit) -> Path:
    """Where `split`'s copies go: a folder named after its content (classes, shard names and sha256)."""
    content = [split.classes, [(s.path.name, s.bytes, s.sha256) for s in split.shards]]
    fingerprint = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
    return root / fingerprint / split.split


def _record_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".staged")


def is_verified(copy: Path, shard: Shard) -> bool:
    """`copy` is the one recorded after hashing it, unchanged since (stat only), and the manifest's."""
    try:
        record = json.loads(_record_path(copy).read_text())
        st = copy.stat()
        index = (copy.parent / shard.index_path.name).stat()
    except (OSError, ValueError):
        return False
    now = {"sha256": shard.sha256, "bytes": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
    return (
        bool(shard.sha256)
        and st.st_size == shard.bytes
        and all(record.get(k) == v for k, v in now.items())
        and record.get("index_bytes") == index.st_size
    )


def use_staged(split: ShardSplit, stage_dir: str) -> ShardSplit:
    """`split` with every shard that has a verified copy under `stage_dir` read from there."""
    where = split_dir(stage_root(stage_dir), split)
    shards = [
        dataclasses.replace(s, path=where / s.path.name, index_path=where / s.index_path.name)
        if is_verified(where / s.path.name, s)
        else s
        for s in split.shards
    ]
    return dataclasses.replace(split, shards=shards)


def needed_shards(cfg, sizes: list[int], ranks: list[int], world_size: int, seed: int, epochs: range, train: bool) -> list[int]:
    """The shards (manifest positions) `ranks` read in `epochs`, in the order first needed.

    A rank's whole sample range of each pass, as the DALI backend reads it (the torch backend reads
    a prefix of it: full batches only), or with repeated augmentation its pass's windows. Eval
    passes read the split in manifest order, every time."""
    total, seen = sum(sizes), {}
    for epoch in epochs if train else range(1):
        order, offset = plan.epoch_layout(len(sizes), total, seed, epoch) if train else (list(range(len(sizes))), 0)
        for rank in ranks:
            if train and cfg.repeated_aug > 1:
                pieces = plan.train_pieces(sizes, seed, epoch, rank, world_size, cfg.batch_size, repeats=cfg.repeated_aug)
            else:
                lo, hi = plan.rank_range(total, rank, world_size)
                pieces = plan.stream_pieces(sizes, order, offset, lo, hi - lo)
            for piece in pieces:
                seen.setdefault(piece.shard, None)
    return list(seen)


def _copy_verified(shard: Shard, dest: Path) -> None:
    """Copy `shard` (tar and index) to `dest` through temporary names; its sha256 must be the manifest's."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp_index = dest.with_name(f".{shard.index_path.name}.{os.getpid()}.tmp")
    try:
        # The kernel copies (sendfile: no pass through Python), then the copy itself is hashed, read
        # back from the page cache: 2x faster than hashing while writing from Python, and it checks
        # the bytes that will be read.
        shutil.copyfile(shard.path, tmp)
        with open(tmp, "rb") as copy:
            digest = hashlib.file_digest(copy, "sha256")
            os.fsync(copy.fileno())
        if digest.hexdigest() != shard.sha256 or tmp.stat().st_size != shard.bytes:
            raise UserError(
                f"shard {shard.path} differs from its manifest (sha256 or size) while staging it: the shared "
                f"copy is damaged; check with: python make_shards.py verify {shard.path.parent}"
            )
        shutil.copyfile(shard.index_path, tmp_index)
        os.replace(tmp_index, dest.parent / shard.index_path.name)
        os.replace(tmp, dest)
    finally:
        for path in (tmp, tmp_index):
            path.unlink(missing_ok=True)
    st = dest.stat()
    record = {
        "sha256": shard.sha256,
        "bytes": st.st_size,
        "ino": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
        "index_bytes": (dest.parent / shard.index_path.name).stat().st_size,
    }
    record_tmp = _record_path(tmp)
    try:
        record_tmp.write_text(json.dumps(record))
        os.replace(record_tmp, _record_path(dest))
    finally:
        record_tmp.unlink(missing_ok=True)


def stage_node(cfg, ranks: list[int], world_size: int, seed: int, epochs: range) -> Report:
    """Copy the train and val shards `ranks` read in `epochs` under cfg.stage_dir, verified; reuse good copies.

    A full disk (free space checked first, or ENOSPC/EDQUOT while writing) stops the copying: the
    shards not copied are read from the shared copy, and Report.warning says so in one line."""
    root = stage_root(cfg.stage_dir)
    report, t0 = Report(root), time.monotonic()
    todo: list[tuple[Shard, Path]] = []
    for split_name, train in (("train", True), ("val", False)):
        split = open_split(cfg.root, split_name)
        where = split_dir(root, split)
        sizes = [s.num_samples for s in split.shards]
        for i in needed_shards(cfg, sizes, ranks, world_size, seed, epochs, train):
            shard = split.shards[i]
            if is_verified(where / shard.path.name, shard):
                report.reused, report.reused_bytes = report.reused + 1, report.reused_bytes + shard.bytes
            else:
                todo.append((shard, where / shard.path.name))
    for n, (shard, dest) in enumerate(todo):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(dest.parent).free
            if free < shard.bytes:
                raise OSError(errno.ENOSPC, f"{free} bytes free, {shard.bytes} needed")
            _copy_verified(shard, dest)
        except OSError as e:
            if e.errno not in FULL:
                raise UserError(f"cannot stage {shard.path} to {dest}: {e}") from None
            report.left = len(todo) - n
            left = _size(sum(s.bytes for s, _ in todo[n:]))
            report.warning = (
                f"warning: data.stage_dir {root} is full ({e.strerror or e}): {report.left} of {len(todo)} "
                f"shards to stage ({left}) are read from the shared copy in {cfg.root}"
            )
            break
        report.copied, report.copied_bytes = report.copied + 1, report.copied_bytes + shard.bytes
    report.seconds = time.monotonic() - t0
    return report
