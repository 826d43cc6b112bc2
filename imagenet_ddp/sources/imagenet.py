"""ILSVRC2012 in the three forms people hold it, detected from what is under `src`.

1. archives:  ILSVRC2012_img_train.tar (a tar of 1000 per-class tars), ILSVRC2012_img_val.tar (flat),
              ILSVRC2012_devkit_t12.tar.gz (val labels as ILSVRC2012_IDs, mapped to wnids by meta.mat).
              Read in place through member offsets: nothing is extracted.
2. kaggle:    ILSVRC/Data/CLS-LOC/{train/<wnid>/*.JPEG, val/*.JPEG}, LOC_val_solution.csv,
              LOC_synset_mapping.txt.
3. extracted: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from pathlib import Path

from imagenet_ddp.errors import UserError
from imagenet_ddp.sources.base import Listing, SourceFile, sample_key
from imagenet_ddp.sources.readers import tar_members

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
_WNID = re.compile(r"^n\d{8}$")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")


def list_imagenet(src: Path) -> Listing:
    if (src / TRAIN_TAR).is_file() or (src / VAL_TAR).is_file():
        return _list_archives(src)
    kaggle = _find_kaggle_root(src)
    if kaggle is not None:
        return _list_kaggle(kaggle)
    if (src / "train").is_dir() or (src / "val").is_dir():
        return _list_extracted(src)
    raise UserError(
        f"no ImageNet layout found in {src}: expected {TRAIN_TAR}/{VAL_TAR} (+ {DEVKIT}), "
        "the Kaggle ILSVRC/Data/CLS-LOC tree, or train/<wnid>/ and val/<wnid>/ folders"
    )


def _standard_names(classes: list[str], fallback: dict[str, str]) -> dict[str, str]:
    from imagenet_ddp.labels import imagenet_names

    standard = imagenet_names("en")
    return {w: standard.get(w) or fallback.get(w) or w for w in classes}


# -- archives -------------------------------------------------------------------------------------------


def _read_devkit(path: Path) -> tuple[list[str], dict[str, str], list[int], dict[int, str]]:
    """Leaf classes (sorted wnids), their words, val ground truth IDs, and ILSVRC2012_ID -> wnid."""
    import scipy.io

    meta = truth = None
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                if m.name.endswith("data/meta.mat"):
                    meta = tar.extractfile(m).read()
                elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    truth = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable devkit archive ({e})") from None
    if meta is None or truth is None:
        raise UserError(f"{path} lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt")
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    # meta.mat lists every synset of the hierarchy; the classes are the leaves (num_children == 0).
    by_id, words = {}, {}
    for s in synsets:
        if int(s["num_children"]) == 0:
            by_id[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
            words[str(s["WNID"])] = str(s["words"])
    ids = [int(line) for line in truth.decode().split()]
    return sorted(by_id.values()), words, ids, by_id


def _list_archives(src: Path) -> Listing:
    devkit = src / DEVKIT
    splits, missing, notes = {}, {}, []
    classes = words = None
    if devkit.is_file():
        classes, words, val_ids, id_to_wnid = _read_devkit(devkit)
    if (src / TRAIN_TAR).is_file():
        train_tar = src / TRAIN_TAR
        files, inner_wnids = [], []
        with open(train_tar, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for inner, start, length in list(tar_members(f, 0, size, str(train_tar))):
                wnid = Path(inner).name.split(".")[0]
                if not _WNID.match(wnid):
                    raise UserError(f"{train_tar}: member {inner} is not a <wnid>.tar class archive")
                inner_wnids.append(wnid)
                what = f"{train_tar}/{inner}"
                for name, offset, n in tar_members(f, start, length, what):
                    path = str(train_tar / inner / name)
                    files.append(
                        SourceFile(sample_key(name), wnid, path, n, ("range", str(train_tar), offset, n))
                    )
        if classes is None:
            classes = sorted(set(inner_wnids))
        unknown = sorted(set(inner_wnids) - set(classes))
        if unknown:
            raise UserError(f"{train_tar} has class {unknown[0]} that the devkit's meta.mat does not list")
        splits["train"] = files
    if (src / VAL_TAR).is_file():
        val_tar = src / VAL_TAR
        if not devkit.is_file():
            raise UserError(f"{val_tar} needs {DEVKIT} beside it: the validation labels are in the devkit")
        files, missing["val"] = [], []
        with open(val_tar, "rb") as f:
            for name, offset, n in tar_members(f, 0, os.fstat(f.fileno()).st_size, str(val_tar)):
                number = _VAL_NUMBER.search(name)
                path = str(val_tar / name)
                if number is None or not 1 <= int(number.group(1)) <= len(val_ids):
                    missing["val"].append((path, "no ground-truth label in the devkit for this file"))
                    continue
                wnid = id_to_wnid[val_ids[int(number.group(1)) - 1]]
                files.append(SourceFile(sample_key(name), wnid, path, n, ("range", str(val_tar), offset, n)))
        splits["val"] = files
    return Listing(
        "imagenet",
        "archives",
        str(src),
        classes,
        _standard_names(classes, words or {}),
        splits,
        missing,
        notes,
    )


# -- kaggle -----------------------------------------------------------------------------------------------


def _find_kaggle_root(src: Path) -> Path | None:
    for root in (src, src.parent):
        if (root / "ILSVRC" / "Data" / "CLS-LOC").is_dir():
            return root
    return None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _list_kaggle(root: Path) -> Listing:
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    mapping = root / "LOC_synset_mapping.txt"
    if not mapping.is_file():
        raise UserError(f"Kaggle layout in {root} lacks LOC_synset_mapping.txt (the class list)")
    names = {}
    for line in mapping.read_text().splitlines():
        if line.strip():
            wnid, _, words = line.strip().partition(" ")
            names[wnid] = words
    classes = sorted(names)
    splits, missing, notes = {}, {}, []
    if (data / "train").is_dir():
        splits["train"] = _class_folders(data / "train", set(classes), "LOC_synset_mapping.txt")
    if (data / "val").is_dir():
        solution = root / "LOC_val_solution.csv"
        if not solution.is_file():
            raise UserError(f"Kaggle layout in {root} lacks LOC_val_solution.csv (the validation labels)")
        labels = {}
        with open(solution, newline="") as f:
            for number, row in enumerate(csv.DictReader(f), 2):
                # PredictionString holds "wnid x0 y0 x1 y1" per box; every box of an image has its class.
                try:
                    labels[row["ImageId"]] = row["PredictionString"].split()[0]
                except (KeyError, AttributeError, IndexError):
                    raise UserError(
                        f"{solution} line {number}: expected ImageId,PredictionString with a wnid first, "
                        f"got {','.join(str(v) for v in row.values() if v is not None)[:80]!r}"
                    ) from None
        files, missing["val"] = [], []
        for p in _images(data / "val"):
            wnid = labels.get(p.stem)
            if wnid is None:
                missing["val"].append((str(p), "no label in LOC_val_solution.csv"))
            else:
                files.append(SourceFile(sample_key(p.name), wnid, str(p), p.stat().st_size, ("file", str(p))))
        splits["val"] = files
    if (data / "test").is_dir():
        notes.append(f"{data / 'test'} is unlabeled: not packed")
    return Listing(
        "imagenet", "kaggle", str(root), classes, _standard_names(classes, names), splits, missing, notes
    )


# -- extracted folders ------------------------------------------------------------------------------------


def _class_folders(folder: Path, classes: set[str] | None, what: str) -> list[SourceFile]:
    files = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if classes is not None and d.name not in classes:
            raise UserError(f"{d} is not a class listed in {what}")
        for p in _images(d):
            files.append(SourceFile(sample_key(p.name), d.name, str(p), p.stat().st_size, ("file", str(p))))
    return files


def _list_extracted(src: Path) -> Listing:
    splits = {}
    for split in ("train", "val"):
        if (src / split).is_dir():
            splits[split] = _class_folders(src / split, None, "")
    classes = sorted({f.wnid for files in splits.values() for f in files})
    bad = [w for w in classes if not _WNID.match(w)]
    if bad:
        raise UserError(
            f"{src}: folder {bad[0]!r} is not a wnid; use `make_shards.py folder` for other datasets"
        )
    if "train" in splits:
        extra = sorted({f.wnid for f in splits.get("val", [])} - {f.wnid for f in splits["train"]})
        if extra:
            raise UserError(f"{src / 'val' / extra[0]} is a class with no training folder")
    return Listing("imagenet", "extracted", str(src), classes, _standard_names(classes, {}), splits)
