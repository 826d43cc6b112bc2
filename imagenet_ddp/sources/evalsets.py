"""ImageNet's evaluation sets, read in place from their folders or published archives.

    python make_shards.py imagenet-v2     --src imagenetv2-matched-frequency.tar.gz --out shards/imagenet-v2
    python make_shards.py imagenet-r      --src imagenet-r.tar           --out shards/imagenet-r
    python make_shards.py imagenet-a      --src imagenet-a.tar           --out shards/imagenet-a
    python make_shards.py imagenet-sketch --src ImageNet-Sketch.zip      --out shards/imagenet-sketch
    python make_shards.py imagenet-c      --src /data/imagenet-c         --out shards/imagenet-c

Each layout's own definition of its labels:
- ImageNet-V2: `imagenetv2-<variant>-format-val/<i>/<hash>.jpeg`, where the folder name `i` is the
  class INDEX in sorted-wnid order (never the position of the folder names sorted as strings:
  "10" < "2"). One split per variant (matched-frequency, threshold-0.7, top-images); classes = the
  1000 ImageNet-1k wnids.
- ImageNet-R, -A, -Sketch: `<root>/<wnid>/*`; classes = the wnids present, sorted (R and A: 200 of the
  1000; A's README.txt is not packed). One split, "val".
- ImageNet-C: `<corruption>/<severity>/<wnid>/*`: one split per corruption and severity,
  "<corruption>-<severity>", its manifest carrying both.
The manifest of each split records its `label_space` and, for a subset, the ImageNet-1k class index
of each of its classes (`imagenet_indices`). `--src` is a folder, one archive (.tar read by member
offsets, .tar.gz in one forward pass per shard, .zip), or a folder of archives; nothing is extracted.
"""

from __future__ import annotations

import difflib
import os
import re
import tarfile
import zipfile
from functools import cache
from pathlib import Path, PurePosixPath

from imagenet_ddp.errors import UserError
from imagenet_ddp.sources.base import Listing, SourceFile, sample_key
from imagenet_ddp.sources.readers import tar_members

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
V2_VARIANTS = {
    "matched-frequency": "matched-frequency",
    "threshold0.7": "threshold-0.7",
    "top-images": "top-images",
}
_V2_NAME = re.compile(r"imagenetv2-(matched-frequency|threshold0\.7|top-images)")
# ImageNet-C (Hendrycks & Dietterich 2019): the 15 benchmark corruptions in their 4 groups, + 4 extra.
CORRUPTIONS = {
    "gaussian_noise": "noise",
    "shot_noise": "noise",
    "impulse_noise": "noise",
    "defocus_blur": "blur",
    "glass_blur": "blur",
    "motion_blur": "blur",
    "zoom_blur": "blur",
    "snow": "weather",
    "frost": "weather",
    "fog": "weather",
    "brightness": "weather",
    "contrast": "digital",
    "elastic_transform": "digital",
    "pixelate": "digital",
    "jpeg_compression": "digital",
    "speckle_noise": "extra",
    "gaussian_blur": "extra",
    "spatter": "extra",
    "saturate": "extra",
}


class _Entry:
    """One file of the source: its path parts below --src (through archives), size, location."""

    __slots__ = ("parts", "size", "loc", "path")

    def __init__(self, parts: tuple[str, ...], size: int, loc: tuple, path: str):
        self.parts, self.size, self.loc, self.path = parts, size, loc, path


def _archive_entries(path: Path, prefix: tuple[str, ...]) -> list[_Entry]:
    name = path.name.lower()
    what = str(path)
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                return [
                    _Entry(
                        (*prefix, *PurePosixPath(i.filename).parts),
                        i.file_size,
                        ("zip", what, i.filename),
                        f"{what}/{i.filename}",
                    )
                    for i in zf.infolist()
                    if not i.is_dir()
                ]
        if name.endswith(".tar"):
            with open(path, "rb") as f:
                members = list(tar_members(f, 0, os.fstat(f.fileno()).st_size, what))
            return [
                _Entry((*prefix, *PurePosixPath(m).parts), n, ("range", what, off, n), f"{what}/{m}")
                for m, off, n in members
            ]
        with tarfile.open(path, "r:gz") as tar:  # one pass over the compressed stream: names and offsets
            return [
                _Entry(
                    (*prefix, *PurePosixPath(m.name).parts),
                    m.size,
                    ("gz", what, m.offset_data, m.size),
                    f"{what}/{m.name}",
                )
                for m in tar
                if m.isfile()
            ]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.filename:
            raise
        raise UserError(f"{path} is not a readable {name.rsplit('.', 1)[-1]} archive ({e})") from None


def _entries(src: Path) -> tuple[list[_Entry], str]:
    """Every file under `src` (a folder, an archive, or a folder of archives) and the layout's name."""
    if src.is_file():
        if not src.name.lower().endswith(ARCHIVES):
            raise UserError(
                f"{src} is a file but not an archive ({', '.join(ARCHIVES)}): give a folder or archive"
            )
        return _archive_entries(src, (_stem(src.name),)), "archive"
    top = sorted(os.listdir(src))
    archives = [n for n in top if n.lower().endswith(ARCHIVES) and (src / n).is_file()]
    folders = [n for n in top if (src / n).is_dir()]
    if archives and folders:
        raise UserError(
            f"{src} holds both archives ({archives[0]}) and folders ({folders[0]}): the same images twice? "
            "give one of them as --src"
        )
    if archives:
        return [e for n in archives for e in _archive_entries(src / n, (_stem(n),))], "archives"
    out = []

    def fail(e: OSError) -> None:
        raise e

    for root, dirs, names in os.walk(src, onerror=fail):
        dirs.sort()
        rel = Path(root).relative_to(src).parts
        for n in sorted(names):
            p = Path(root) / n
            if p.is_file():
                out.append(_Entry((src.name, *rel, n), p.stat().st_size, ("file", str(p)), str(p)))
    return out, "folder"


def _stem(name: str) -> str:
    for suffix in ARCHIVES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in sorted order: position = class index (V2's folders, ReaL's indices)."""
    from imagenet_ddp.labels import imagenet_names

    return tuple(sorted(imagenet_names("en")))


def _check_wnid(folder: str, where: str, known: set[str]) -> None:
    if folder not in known:
        close = difflib.get_close_matches(folder, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{where}: folder {folder!r} is not an ImageNet-1k wnid{hint}")


def label_fields(classes: list[str]) -> dict:
    """Manifest fields saying which of ImageNet-1k's classes a split covers: {"label_space":
    "imagenet-1k"}, {"label_space": "imagenet-1k-subset", "imagenet_indices": [...]}, or {} when
    some class is not an ImageNet-1k wnid."""
    wnids = imagenet_wnids()
    if classes == list(wnids):
        return {"label_space": "imagenet-1k"}
    position = {w: i for i, w in enumerate(wnids)}
    if not classes or any(w not in position for w in classes):
        return {}
    return {"label_space": "imagenet-1k-subset", "imagenet_indices": [position[w] for w in classes]}


def _names(classes: list[str]) -> dict[str, str]:
    from imagenet_ddp.labels import imagenet_names

    names = imagenet_names("en")
    return {w: names[w] for w in classes}


def _file(e: _Entry, wnid: str) -> SourceFile:
    return SourceFile(sample_key(e.parts[-1]), wnid, e.path, e.size, e.loc)


def _not_packed(e: _Entry, notes: list[str], missing: list[tuple[str, str]], why: str) -> None:
    """A file outside the layout's class folders: an image there is rejected (never dropped
    silently), anything else (README.txt) is noted."""
    if _is_image(e.parts[-1]):
        missing.append((e.path, why))
    else:
        notes.append(f"{e.path}: not an image of a class folder, not packed")


def list_imagenet_v2(src: Path) -> Listing:
    entries, layout = _entries(src)
    wnids = list(imagenet_wnids())
    splits: dict[str, list[SourceFile]] = {}
    missing: dict[str, list[tuple[str, str]]] = {}
    notes: list[str] = []
    info = {}
    for e in entries:
        found = [m.group(1) for part in e.parts[:-1] for m in [_V2_NAME.search(part)] if m]
        if not found and not _is_image(e.parts[-1]):
            notes.append(f"{e.path}: not an image of a class folder, not packed")
            continue
        if not found:
            raise UserError(
                f"{e.path}: cannot tell which ImageNet-V2 variant this is: keep the published names "
                "(imagenetv2-matched-frequency-format-val/, imagenetv2-threshold0.7..., imagenetv2-top-images...)"
            )
        split = V2_VARIANTS[found[-1]]
        info[split] = {"variant": split, **label_fields(wnids)}
        files = splits.setdefault(split, [])
        folder = e.parts[-2] if len(e.parts) > 1 else ""
        if _V2_NAME.search(folder):  # a file beside the class folders
            _not_packed(e, notes, missing.setdefault(split, []), "not in a class folder")
            continue
        if not (folder.isdigit() and int(folder) < len(wnids)):
            raise UserError(f"{e.path}: ImageNet-V2 class folders are 0..999 (class index), not {folder!r}")
        # The folder is the class index in sorted-wnid order, by its value: never by string order.
        files.append(_file(e, wnids[int(folder)]))
    return Listing("imagenet-v2", layout, str(src), wnids, _names(wnids), splits, missing, notes, info)


def _list_wnid_folders(dataset: str, src: Path) -> Listing:
    entries, layout = _entries(src)
    known = set(imagenet_wnids())
    files, missing, notes = [], [], []
    for e in entries:
        folder = e.parts[-2] if len(e.parts) > 1 else ""
        if folder in known:
            files.append(_file(e, folder))
        elif re.fullmatch(r"n\d+", folder):  # a wnid-like folder that is not a class: a typo or another set
            _check_wnid(folder, e.path, known)
        else:
            _not_packed(e, notes, missing, "not in a wnid class folder")
    classes = sorted({f.wnid for f in files})
    info = {"val": label_fields(classes)} if classes else {}
    return Listing(
        dataset, layout, str(src), classes, _names(classes), {"val": files}, {"val": missing}, notes, info
    )


def list_imagenet_r(src: Path) -> Listing:
    return _list_wnid_folders("imagenet-r", src)


def list_imagenet_a(src: Path) -> Listing:
    return _list_wnid_folders("imagenet-a", src)


def list_imagenet_sketch(src: Path) -> Listing:
    return _list_wnid_folders("imagenet-sketch", src)


def list_imagenet_c(src: Path) -> Listing:
    entries, layout = _entries(src)
    known = set(imagenet_wnids())
    splits: dict[str, list[SourceFile]] = {}
    notes: list[str] = []
    for e in entries:
        if len(e.parts) < 4 or e.parts[-3] not in "12345" or len(e.parts[-3]) != 1:
            if _is_image(e.parts[-1]):
                raise UserError(f"{e.path}: expected <corruption>/<severity 1-5>/<wnid>/<image> (ImageNet-C)")
            notes.append(f"{e.path}: not an image of a class folder, not packed")
            continue
        corruption, severity, wnid = e.parts[-4:-1]
        if corruption not in CORRUPTIONS:
            close = difflib.get_close_matches(corruption, CORRUPTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{e.path}: {corruption!r} is not an ImageNet-C corruption{hint}")
        _check_wnid(wnid, e.path, known)
        splits.setdefault(f"{corruption}-{severity}", []).append(_file(e, wnid))
    # Every split gets the classes of all of them: one label space for the whole set.
    classes = sorted({f.wnid for files in splits.values() for f in files})
    info = {
        split: {
            "corruption": split.rsplit("-", 1)[0],
            "severity": int(split.rsplit("-", 1)[1]),
            "corruption_group": CORRUPTIONS[split.rsplit("-", 1)[0]],
            **label_fields(classes),
        }
        for split in splits
    }
    splits = dict(sorted(splits.items()))
    return Listing("imagenet-c", layout, str(src), classes, _names(classes), splits, {}, notes, info)
