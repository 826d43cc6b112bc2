"""A generic image-classification tree: train/<class>/* and val/<class>/* (ImageFolder's layout).

Classes are the sorted folder names of train/ (of val/ when there is no train/). Every file is a
candidate: what is not a decodable image is rejected with its reason, never skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagenet_ddp.errors import UserError
from imagenet_ddp.sources.base import Listing, SourceFile, sample_key


def _files(folder: Path, unreadable: list[tuple[str, str]]) -> list[SourceFile]:
    """The files below each class folder; a sub-folder or file that cannot be listed goes to
    `unreadable` (path, reason); a class folder that cannot be listed at all is an OSError."""
    out = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        os.listdir(d)  # the class folder itself: unreadable, the whole class would be lost

        def note(e: OSError) -> None:
            unreadable.append((e.filename, f"cannot list this folder: {e.strerror}"))

        for root, dirs, names in os.walk(d, onerror=note):
            dirs.sort()
            for name in sorted(names):
                p = Path(root) / name
                try:
                    size = p.stat().st_size
                except OSError as e:
                    unreadable.append((str(p), f"cannot read it: {e.strerror}"))
                    continue
                if p.is_file():
                    out.append(SourceFile(sample_key(p.name), d.name, str(p), size, ("file", str(p))))
    return out


def list_folder(src: Path) -> Listing:
    missing: dict[str, list[tuple[str, str]]] = {}
    splits = {s: _files(src / s, missing.setdefault(s, [])) for s in ("train", "val") if (src / s).is_dir()}
    if not splits:
        raise UserError(f"no train/ or val/ folder in {src}: expected train/<class>/* and val/<class>/*")
    first = "train" if "train" in splits else "val"
    classes = sorted(p.name for p in (src / first).iterdir() if p.is_dir())
    if "train" in splits and "val" in splits:
        extra = sorted({p.name for p in (src / "val").iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise UserError(f"{src / 'val' / extra[0]} is a class with no training folder")
    missing = {s: sorted(found) for s, found in missing.items() if found}
    return Listing("folder", "folder", str(src), classes, {c: c for c in classes}, splits, missing)
