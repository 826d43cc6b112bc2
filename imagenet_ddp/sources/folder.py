"""A generic image-classification tree: train/<class>/* and val/<class>/* (ImageFolder's layout).

Classes are the sorted folder names of train/ (of val/ when there is no train/). Every file is a
candidate: what is not a decodable image is rejected with its reason, never skipped silently.
"""

from __future__ import annotations

from pathlib import Path

from imagenet_ddp.errors import UserError
from imagenet_ddp.sources import Listing, SourceFile, sample_key


def _files(folder: Path) -> list[SourceFile]:
    out = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out.append(SourceFile(sample_key(p.name), d.name, str(p), p.stat().st_size, ("file", str(p))))
    return out


def list_folder(src: Path) -> Listing:
    splits = {s: _files(src / s) for s in ("train", "val") if (src / s).is_dir()}
    if not splits:
        raise UserError(f"no train/ or val/ folder in {src}: expected train/<class>/* and val/<class>/*")
    first = "train" if "train" in splits else "val"
    classes = sorted(p.name for p in (src / first).iterdir() if p.is_dir())
    if "train" in splits and "val" in splits:
        extra = sorted({p.name for p in (src / "val").iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise UserError(f"{src / 'val' / extra[0]} is a class with no training folder")
    return Listing("folder", "folder", str(src), classes, {c: c for c in classes}, splits)
