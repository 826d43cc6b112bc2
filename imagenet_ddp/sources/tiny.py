"""Tiny ImageNet (tiny-imagenet-200/ or tiny-imagenet-200.zip, read in place).

wnids.txt defines the 200 classes; words.txt names ~82k wnids, most of them not classes. Train images
are under train/<wnid>/images/. The val folder is flat: its labels are ONLY in val/val_annotations.txt
(reading it any other way gives chance accuracy, the 7% of this project's predecessor). test/ is
unlabeled and not packed.
"""

from __future__ import annotations

import zipfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

from imagenet_ddp.errors import UserError
from imagenet_ddp.sources.base import Listing, SourceFile, sample_key

ROOT = "tiny-imagenet-200"


class _Tree:
    """The same questions asked of a folder or of a zip file holding the folder."""

    def __init__(self, src: Path):
        self.src = src
        self.zip = None
        if src.is_file():
            try:
                self.zip = zipfile.ZipFile(src)
            except zipfile.BadZipFile:
                raise UserError(f"{src} is not a readable zip file") from None
            names = [i for i in self.zip.infolist() if not i.is_dir()]
            prefix = _prefix(i.filename for i in names)
            self.files = {i.filename[len(prefix) :]: i for i in names if i.filename.startswith(prefix)}
            self.prefix = prefix
            self.dirs = defaultdict(list)
            for name, info in self.files.items():
                self.dirs[str(PurePosixPath(name).parent)].append((name, info.file_size))
        else:
            root = src / ROOT if (src / ROOT / "wnids.txt").is_file() else src
            self.root = root
            self.files = None

    def text(self, rel: str) -> str | None:
        if self.zip is not None:
            info = self.files.get(rel)
            return None if info is None else self.zip.read(info).decode()
        p = self.root / rel
        return p.read_text() if p.is_file() else None

    def listdir(self, rel: str) -> list[tuple[str, int]]:
        """(relative path, size) of the files directly in folder `rel`, sorted."""
        if self.zip is not None:
            return sorted(self.dirs.get(rel, []))
        folder = self.root / rel
        if not folder.is_dir():
            return []
        return [(f"{rel}/{p.name}", p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()]

    def source(self, rel: str, size: int, wnid: str) -> SourceFile:
        name = PurePosixPath(rel).name
        if self.zip is not None:
            member = self.prefix + rel
            return SourceFile(
                sample_key(name), wnid, f"{self.src}/{member}", size, ("zip", str(self.src), member)
            )
        path = str(self.root / rel)
        return SourceFile(sample_key(name), wnid, path, size, ("file", path))


def _prefix(names) -> str:
    for name in names:
        if name.endswith("wnids.txt"):
            return name[: -len("wnids.txt")]
    return ""


def list_tiny_imagenet(src: Path) -> Listing:
    tree = _Tree(src)
    wnids_text = tree.text("wnids.txt")
    if wnids_text is None:
        raise UserError(f"no Tiny ImageNet in {src}: expected {ROOT}/wnids.txt (or {ROOT}.zip)")
    classes = sorted(set(wnids_text.split()))
    names = {}
    for line in (tree.text("words.txt") or "").splitlines():
        wnid, _, words = line.partition("\t")
        if wnid in classes:
            names[wnid] = words.strip()
    splits, missing, notes = {}, {}, []
    train = []
    for wnid in classes:
        train += [tree.source(rel, n, wnid) for rel, n in tree.listdir(f"train/{wnid}/images")]
    if train:
        splits["train"] = train
    annotations = tree.text("val/val_annotations.txt")
    val_files = tree.listdir("val/images")
    if val_files and annotations is None:
        raise UserError(f"{src}: val/images has no val/val_annotations.txt, the only source of val labels")
    if annotations is not None:
        labels = {}
        for line in annotations.splitlines():
            if line.strip():
                name, wnid = line.split("\t")[:2]
                if wnid not in classes:
                    raise UserError(f"val_annotations.txt labels {name} with {wnid}, not in wnids.txt")
                labels[name] = wnid
        val, missing["val"] = [], []
        for rel, n in val_files:
            wnid = labels.pop(PurePosixPath(rel).name, None)
            if wnid is None:
                missing["val"].append((tree.path(rel), "no label in val_annotations.txt"))
            else:
                val.append(tree.source(rel, n, wnid))
        missing["val"] += [
            (f"val/images/{name}", "listed in val_annotations.txt but missing") for name in labels
        ]
        splits["val"] = val
    test = tree.listdir("test/images")
    if test:
        notes.append(f"test/images ({len(test)} files) is unlabeled: not packed")
    layout = "zip" if tree.zip is not None else "folder"
    return Listing(
        "tiny-imagenet",
        layout,
        str(src),
        classes,
        {w: names.get(w, w) for w in classes},
        splits,
        missing,
        notes,
    )
