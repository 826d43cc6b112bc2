"""A split of tar shards as make_shards.py wrote it: manifest, shard files, DALI index files.

Everything a loader must know before it reads a byte of image data, and every check that must
happen before DALI opens a file (DALI segfaults or gives anonymous errors on bad files):

    split = open_split("shards/imagenet", "train")   # one-line UserError on any problem
    split.check_files()                                # sizes against the manifest
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagenet_ddp.errors import UserError
from imagenet_ddp.shards import file_sha256

SPLITS_HINT = "make them with: python make_shards.py {imagenet,tiny-imagenet,folder} --src ... --out ROOT"


@dataclass(frozen=True)
class Shard:
    path: Path  # the .tar
    index_path: Path  # its DALI index (.idx)
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SampleIndex:
    """Where each sample's jpg and cls bytes lie in one shard (parsed from its .idx)."""

    keys: list[str]
    jpg: np.ndarray  # [n, 2] int64: offset, size
    cls: np.ndarray  # [n, 2] int64: offset, size


@dataclass(frozen=True)
class ShardSplit:
    dir: Path
    split: str
    classes: list[str]  # wnids; position = class index
    class_names: list[str]
    num_samples: int
    shards: list[Shard]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_files(self) -> None:
        """Every shard and index present, and every shard exactly as large as the manifest says.

        A truncated tar read through an index made before truncation is what crashes DALI, so this
        runs before any reader opens a file. sha256 is not checked here (it reads the whole split);
        `find_corrupt` does that after a read fails.
        """
        for shard in self.shards:
            for path in (shard.path, shard.index_path):
                if not path.is_file():
                    raise UserError(f"missing shard file {path} (listed in {self.dir / 'manifest.json'})")
            size = shard.path.stat().st_size
            if size != shard.bytes:
                raise UserError(
                    f"shard {shard.path} is {size} bytes, the manifest says {shard.bytes}: truncated or "
                    f"replaced; re-run make_shards.py (check with: python make_shards.py verify {self.dir})"
                )

    def find_corrupt(self, shards: list[Shard]) -> Shard | None:
        """The first of `shards` whose size or sha256 differs from the manifest (after a read failed)."""
        for shard in shards:
            try:
                if shard.path.stat().st_size != shard.bytes or file_sha256(shard.path) != shard.sha256:
                    return shard
            except OSError:
                return shard
        return None


def open_split(root: str | Path, split: str) -> ShardSplit:
    """Read ROOT/split/manifest.json and check it against the other splits' manifests."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"shards directory {root} does not exist; {SPLITS_HINT}")
    manifest_path = root / split / "manifest.json"
    if not manifest_path.is_file():
        found = sorted(p.parent.name for p in root.glob("*/manifest.json"))
        raise UserError(
            f"no {split!r} split in {root} (no {manifest_path}; splits found: {', '.join(found) or 'none'})"
        )
    manifest = _read_json(manifest_path)
    try:
        shards = [
            Shard(
                manifest_path.parent / s["file"],
                manifest_path.parent / s.get("index", Path(s["file"]).with_suffix(".idx").name),
                int(s["num_samples"]),
                int(s["bytes"]),
                str(s.get("sha256", "")),
            )
            for s in manifest["shards"]
        ]
        classes = list(manifest["classes"])
        num_samples = int(manifest["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{manifest_path} is not a shard manifest (missing or bad field {e})") from None
    if num_samples == 0 or not shards:
        raise UserError(f"split {split!r} in {root} is empty ({manifest_path} lists no samples)")
    if sum(s.num_samples for s in shards) != num_samples:
        raise UserError(f"{manifest_path}: num_samples {num_samples} is not the sum over its shards")
    _check_same_classes(root, manifest_path, classes)
    names = list(manifest.get("class_names") or classes)
    return ShardSplit(manifest_path.parent, split, classes, names, num_samples, shards)


def read_index(shard: Shard) -> SampleIndex:
    """Parse a DALI webdataset index (v1.2: `ext offset size name` per component)."""
    try:
        lines = shard.index_path.read_text().splitlines()
        version, count = lines[0].split()
        if version != "v1.2" or int(count) != shard.num_samples or len(lines) - 1 < shard.num_samples:
            raise ValueError(f"header {lines[0]!r}, expected 'v1.2 {shard.num_samples}'")
        keys, jpg, cls = [], [], []
        for line in lines[1 : 1 + shard.num_samples]:
            fields = line.split()
            parts = {fields[i]: fields[i : i + 4] for i in range(0, len(fields), 4)}
            keys.append(parts["jpg"][3].split(".", 1)[0])
            jpg.append((int(parts["jpg"][1]), int(parts["jpg"][2])))
            cls.append((int(parts["cls"][1]), int(parts["cls"][2])))
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise UserError(f"bad index file {shard.index_path}: {e}") from None
    jpg_arr, cls_arr = np.array(jpg, np.int64), np.array(cls, np.int64)
    end = max(int((jpg_arr.sum(1)).max()), int((cls_arr.sum(1)).max()))
    if end > shard.bytes:
        raise UserError(f"index {shard.index_path} points past the end of {shard.path}")
    return SampleIndex(keys, jpg_arr, cls_arr)


def _check_same_classes(root: Path, manifest_path: Path, classes: list[str]) -> None:
    # Labels are positions in `classes`: a val split packed with another class list would be
    # scored against the wrong labels without any error, so every split under ROOT must agree.
    for other in sorted(root.glob("*/manifest.json")):
        if other == manifest_path:
            continue
        other_classes = list(_read_json(other).get("classes") or [])
        if other_classes != classes:
            i = next(
                (i for i, (a, b) in enumerate(zip(classes, other_classes, strict=False)) if a != b), None
            )
            where = f"class {i}: {classes[i]} vs {other_classes[i]}" if i is not None else "count"
            raise UserError(
                f"classes differ between {manifest_path} and {other} ({len(classes)} vs "
                f"{len(other_classes)} classes, first difference at {where}): pack every split with the same classes"
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
