"""What every layout reader returns: `SourceFile`s gathered in a `Listing`, keyed by `sample_key`.

Imports nothing of the package, so the layout readers (imagenet.py, tiny.py, folder.py) and
`imagenet_ddp.sources`, which picks one of them, can both import it without a cycle.

    python make_shards.py imagenet --src /data/imagenet --out shards/imagenet
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Listing", "SourceFile", "sample_key"]


@dataclass(frozen=True, slots=True)
class SourceFile:
    key: str  # sample key in the shards: unique within the split, no dots or slashes
    wnid: str  # class id: a WordNet id for (Tiny) ImageNet, the folder name for generic folders
    path: str  # where a person finds the file: a path, or archive/inner-archive/member
    size: int  # bytes in the source
    loc: tuple  # how read_bytes finds the bytes (see readers.py)


@dataclass
class Listing:
    dataset: str
    layout: str
    src: str
    classes: list[str]  # sorted class ids; position = class index, the same for every split
    names: dict[str, str]  # class id -> English name
    splits: dict[str, list[SourceFile]]
    # Files named by the layout's annotations that cannot be packed (missing, unlabeled): never dropped
    # silently, they go to the split's rejected.jsonl with this reason.
    missing: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was seen but deliberately not packed
    # Per split, fields its manifest carries beside the standard ones (ImageNet-V2's variant,
    # ImageNet-C's corruption and severity, the label space of a class subset).
    info: dict[str, dict] = field(default_factory=dict)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(name: str) -> str:
    """Key for a file name: its stem, with everything but letters, digits, '_' and '-' replaced.

    webdataset and DALI split a member name at the first dot, so keys must not contain one."""
    stem = Path(name).name
    stem = stem[: stem.rfind(".")] if "." in stem else stem
    return _UNSAFE.sub("_", stem)[:80] or "img"
