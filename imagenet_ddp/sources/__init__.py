"""Readers of each on-disk dataset layout.

`list_source(dataset, src)` detects the layout under `src` and returns a `Listing`: the classes, their
English names and, per split, the `SourceFile`s to pack. Listing reads only names and headers (tar/zip
member tables, annotation files), never image data, so it is fast even for the 150 GB ImageNet archives.
`read_bytes(file.loc)` then fetches one image's bytes by offset, in any worker process.

    python make_shards.py imagenet --src /data/imagenet --out shards/imagenet
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from imagenet_ddp.errors import UserError
from imagenet_ddp.sources.base import Listing, SourceFile, sample_key
from imagenet_ddp.sources.readers import read_bytes

EVAL_SETS = ("imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch", "imagenet-c")

__all__ = ["DATASETS", "Listing", "SourceFile", "list_source", "read_bytes", "sample_key"]

DATASETS = ("imagenet", "tiny-imagenet", "folder") + EVAL_SETS


def _unique_keys(files: list[SourceFile]) -> list[SourceFile]:
    """Make keys unique within a split (generic folders may hold `a/x.jpg` and `b/x.jpg`)."""
    counts = Counter(f.key for f in files)
    if all(n == 1 for n in counts.values()):
        return files
    taken = set(counts)
    seen: Counter = Counter()
    out = []
    for f in sorted(files, key=lambda f: f.path):
        if counts[f.key] > 1:
            seen[f.key] += 1
            key = f"{f.key}-{seen[f.key]}"
            while key in taken:
                seen[f.key] += 1
                key = f"{f.key}-{seen[f.key]}"
            taken.add(key)
            f = replace(f, key=key)
        out.append(f)
    return out


def list_source(dataset: str, src: str | Path, splits: tuple[str, ...] | None = None) -> Listing:
    src = Path(src)
    if not src.exists():
        raise UserError(f"source not found: {src}")
    if dataset == "imagenet":
        from imagenet_ddp.sources.imagenet import list_imagenet as lister
    elif dataset == "tiny-imagenet":
        from imagenet_ddp.sources.tiny import list_tiny_imagenet as lister
    elif dataset == "folder":
        from imagenet_ddp.sources.folder import list_folder as lister
    elif dataset in EVAL_SETS:
        from imagenet_ddp.sources import evalsets

        lister = getattr(evalsets, f"list_{dataset.replace('-', '_')}")
    else:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    try:
        listing = lister(src)
    except OSError as e:  # a folder or annotation file that cannot be read: its images would be lost
        raise UserError(
            f"cannot read {e.filename or src}: {e.strerror or e}; its images would be lost: fix its "
            "permissions (or remove it from the source)"
        ) from None
    if splits is not None:
        unknown = [s for s in splits if s not in listing.splits]
        if unknown:
            raise UserError(
                f"split {unknown[0]!r} not found in {src} ({listing.layout} layout has: "
                f"{', '.join(listing.splits) or 'none'})"
            )
        listing.splits = {s: listing.splits[s] for s in splits}
    if not any(listing.splits.values()):
        raise UserError(f"no images found in {src} ({listing.layout} layout)")
    for split, files in listing.splits.items():
        listing.splits[split] = sorted(_unique_keys(files), key=lambda f: f.key)
    return listing
