"""Small synthetic datasets in the exact on-disk layouts people hold ImageNet and Tiny ImageNet in.

    from tests.fixtures import make_imagenet_archives   # run pytest as `python -m pytest` from the root
    fx = make_imagenet_archives(tmp_path)        # then: python make_shards.py imagenet --src {fx.src}
    for record in fx.expected("val"): ...        # each must arrive exactly once, labelled record["wnid"]

Each generator writes one layout under `root` and returns a `Fixture`: the path to pass as
`--src`, the classes, their English names where the layout has them, and one record per
source image, `dict(split, wnid, kind, relpath)`. `relpath` names the file as a person
would, from `root`, through archives: `ILSVRC2012_img_train.tar/n01440764.tar/n01440764_10026.JPEG`.
`kind` says what the bytes are: VALID_KINDS must arrive (converted where needed),
REJECTED_KINDS must be listed as rejected. Test images have split "test" and wnid None.

What the real datasets do that readers get wrong is reproduced on purpose: the devkit's
ILSVRC2012_IDs are not the sorted-wnid order and meta.mat lists non-leaf synsets (one with
a single child, which loadmat squeezes to a scalar); val images are numbered across
classes; two classes share the English name "crane" as in ImageNet; Tiny ImageNet's
wnids.txt is unsorted, its words.txt lists ten times more wnids than classes and its val
labels live only in val_annotations.txt.

Everything is deterministic in `seed`, byte for byte (fixed tar/zip/gzip timestamps).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io

from imagenet_ddp.synth import jpeg_bytes, synth_image

VALID_KINDS = ("ok", "cmyk", "png_named_jpeg", "gray", "progressive", "png")
REJECTED_KINDS = ("truncated", "garbage", "empty")
# With bad=True: one of each problem in train, spread over the classes, and a few in val.
TRAIN_BAD_KINDS = ("cmyk", "png_named_jpeg", "gray", "progressive", "truncated", "garbage", "empty")
VAL_BAD_KINDS = ("cmyk", "gray", "truncated", "garbage")

_MTIME = 1338163200  # 2012-05-28, about when ILSVRC2012 was released
_ZIP_TIME = (2015, 2, 9, 12, 0, 0)
_ADJECTIVES = ("spotted", "grey", "crested", "lesser", "giant", "striped", "marsh", "night", "red", "common")
_NOUNS = ("fox", "heron", "beetle", "viper", "toad", "moth", "skink", "finch", "crab", "shark", "owl")
_SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height")
_SYNSET_FIELDS += ("num_train_images",)
FOLDER_CLASSES = ("dog", "cat", "red panda", "crème brûlée", "axolotl", "bee-eater", "zebra", "snow leopard")


@dataclass
class Fixture:
    root: Path  # where the generator wrote; record relpaths start here
    src: Path  # what a user passes as --src
    records: list[dict]
    wnids: list[str]  # the classes, sorted: position = class index
    names: dict[str, str] = field(default_factory=dict)  # wnid -> English names, where the layout has them

    def split(self, split: str) -> list[dict]:
        return [r for r in self.records if r["split"] == split]

    def expected(self, split: str) -> list[dict]:
        """Records of `split` whose image is valid and must arrive."""
        return [r for r in self.split(split) if r["kind"] in VALID_KINDS]

    def rejected(self, split: str) -> list[dict]:
        """Records of `split` whose file cannot be decoded and must be rejected."""
        return [r for r in self.split(split) if r["kind"] in REJECTED_KINDS]

    def read_bytes(self, record: dict) -> bytes:
        """The bytes of a record's file, read through the tars and zips its relpath names."""
        parts = record["relpath"].split("/")
        path, i = self.root, 0
        while not path.is_file():
            path, i = path / parts[i], i + 1
        data = path.read_bytes()
        container = parts[i - 1]
        while i < len(parts):
            if container.endswith(".zip"):
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    return zf.read("/".join(parts[i:]))
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                data = tar.extractfile(parts[i]).read()
            container, i = parts[i], i + 1
        return data


# ---------------------------------------------------------------------------- ILSVRC2012 layouts


def make_imagenet_archives(
    root, *, num_classes=4, per_class=6, val_per_class=3, bad=True, seed=0, side_range=(40, 96)
) -> Fixture:
    """The three files of the original download: train tar of per-class tars, flat val tar, devkit."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    plan = _ilsvrc_plan(rng, num_classes, per_class, val_per_class, bad)
    records, class_tars = [], []
    for wnid in _reordered(rng, plan.by_id):  # outer member order: neither the ID nor the sorted order
        images = [(name, kind) for w, name, kind in plan.train if w == wnid]
        inner = [(name, plan.image(rng, wnid, kind, side_range)) for name, kind in images]
        class_tars.append((f"{wnid}.tar", _tar_bytes(inner)))
        records += [
            _record("train", wnid, kind, f"ILSVRC2012_img_train.tar/{wnid}.tar/{name}")
            for name, kind in images
        ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(class_tars))
    val_members = [(name, plan.image(rng, wnid, kind, side_range)) for name, wnid, kind in plan.val]
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val_members))
    records += [_record("val", wnid, kind, f"ILSVRC2012_img_val.tar/{name}") for name, wnid, kind in plan.val]
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(_devkit_bytes(rng, plan, per_class))
    return Fixture(root, root, records, sorted(plan.by_id), dict(plan.names))


def make_imagenet_kaggle(
    root, *, num_classes=4, per_class=6, val_per_class=3, bad=True, seed=0, side_range=(40, 96), test_images=3
) -> Fixture:
    """Kaggle's imagenet-object-localization-challenge: ILSVRC/Data/CLS-LOC/{train,val,test} + LOC_*.csv."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    plan = _ilsvrc_plan(rng, num_classes, per_class, val_per_class, bad)
    data, annotations = "ILSVRC/Data/CLS-LOC", "ILSVRC/Annotations/CLS-LOC"
    records, train_rows = [], []
    for wnid, name, kind in plan.train:
        image = plan.image(rng, wnid, kind, side_range)
        relpath = f"{data}/train/{wnid}/{name}"
        _put(root, relpath, image)
        records.append(_record("train", wnid, kind, relpath))
        if rng.random() < 0.5:  # as in the real data, only some train images have boxes
            stem, boxes = name.removesuffix(".JPEG"), _boxes(rng, wnid, 1)
            train_rows.append(f"{stem},{_prediction_string(boxes)}")
            _put(root, f"{annotations}/train/{wnid}/{stem}.xml", _voc_xml("train", stem, boxes))
    val_rows = []
    for name, wnid, kind in plan.val:
        stem, boxes = name.removesuffix(".JPEG"), _boxes(rng, wnid, int(rng.integers(1, 4)))
        relpath = f"{data}/val/{name}"
        _put(root, relpath, plan.image(rng, wnid, kind, side_range))
        records.append(_record("val", wnid, kind, relpath))
        val_rows.append(f"{stem},{_prediction_string(boxes)}")
        _put(root, f"{annotations}/val/{stem}.xml", _voc_xml("val", stem, boxes))
    test_stems = [f"ILSVRC2012_test_{i:08d}" for i in range(1, test_images + 1)]
    for stem in test_stems:
        _put(root, f"{data}/test/{stem}.JPEG", plan.image(rng, None, "ok", side_range))
        records.append(_record("test", None, "ok", f"{data}/test/{stem}.JPEG"))
    header = "ImageId,PredictionString"
    _put(
        root, "LOC_val_solution.csv", _lines([header] + [val_rows[i] for i in rng.permutation(len(val_rows))])
    )
    _put(
        root,
        "LOC_train_solution.csv",
        _lines([header] + [train_rows[i] for i in rng.permutation(len(train_rows))]),
    )
    guess = _prediction_string(_boxes(rng, plan.by_id[0], 1))
    _put(root, "LOC_sample_submission.csv", _lines([header] + [f"{stem},{guess}" for stem in test_stems]))
    _put(root, "LOC_synset_mapping.txt", _lines(f"{w} {plan.names[w]}" for w in sorted(plan.by_id)))
    sets = "ILSVRC/ImageSets/CLS-LOC"
    _put(
        root,
        f"{sets}/train_cls.txt",
        _lines(f"{w}/{n[:-5]} {i}" for i, (w, n, _) in enumerate(plan.train, 1)),
    )
    _put(root, f"{sets}/val.txt", _lines(f"{n[:-5]} {i}" for i, (n, _, _) in enumerate(plan.val, 1)))
    _put(root, f"{sets}/test.txt", _lines(f"{stem} {i}" for i, stem in enumerate(test_stems, 1)))
    return Fixture(root, root, records, sorted(plan.by_id), dict(plan.names))


def make_imagenet_extracted(
    root, *, num_classes=4, per_class=6, val_per_class=3, bad=True, seed=0, side_range=(40, 96)
) -> Fixture:
    """Extracted folders `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG` (val sorted by the usual valprep.sh)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    plan = _ilsvrc_plan(rng, num_classes, per_class, val_per_class, bad)
    records = []
    for split, items in (("train", plan.train), ("val", [(w, n, k) for n, w, k in plan.val])):
        for wnid, name, kind in items:
            relpath = f"{split}/{wnid}/{name}"
            _put(root, relpath, plan.image(rng, wnid, kind, side_range))
            records.append(_record(split, wnid, kind, relpath))
    return Fixture(root, root, records, sorted(plan.by_id))


@dataclass
class _IlsvrcPlan:
    by_id: list[str]  # class wnids in ILSVRC2012_ID order (ID = position + 1): not sorted
    names: dict[str, str]
    train: list[tuple[str, str, str]]  # (wnid, file name, kind), class by class
    val: list[tuple[str, str, str]]  # (file name, wnid, kind) in file-number order, classes interleaved

    def image(self, rng, wnid, kind, side_range) -> bytes:
        classes = sorted(self.by_id)
        return _image_bytes(
            rng, kind, None if wnid is None else classes.index(wnid), len(classes), side_range
        )


def _ilsvrc_plan(rng, num_classes, per_class, val_per_class, bad) -> _IlsvrcPlan:
    train_bad, val_bad = _bad_kinds(bad)
    by_id = _random_wnids(rng, num_classes)
    train = []
    for wnid, kinds in zip(by_id, _spread(rng, num_classes, per_class, train_bad), strict=True):
        numbers = sorted(rng.choice(np.arange(1, 15000), per_class, replace=False))
        train += [(wnid, f"{wnid}_{n}.JPEG", kind) for n, kind in zip(numbers, kinds, strict=True)]
    val = [
        (w, k)
        for w, kinds in zip(by_id, _spread(rng, num_classes, val_per_class, val_bad), strict=True)
        for k in kinds
    ]
    val = [val[i] for i in rng.permutation(len(val))]
    val = [(f"ILSVRC2012_val_{i:08d}.JPEG", w, k) for i, (w, k) in enumerate(val, 1)]
    return _IlsvrcPlan(by_id, _english_names(rng, by_id), train, val)


def _devkit_bytes(rng, plan: _IlsvrcPlan, per_class: int) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz: meta.mat, the val ground truth as IDs, and the files around them."""
    ids = {wnid: i for i, wnid in enumerate(plan.by_id, 1)}
    top = "ILSVRC2012_devkit_t12"
    blacklist = sorted(rng.choice(np.arange(1, len(plan.val) + 1), max(1, len(plan.val) // 5), replace=False))
    members = [
        (f"{top}/", None),
        (f"{top}/COPYING", b"Synthetic test fixture in the layout of the ILSVRC2012 devkit.\n"),
        (f"{top}/readme.txt", b"See data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt.\n"),
        (f"{top}/data/", None),
        (f"{top}/data/meta.mat", _meta_mat_bytes(rng, plan, per_class)),
        (
            f"{top}/data/ILSVRC2012_validation_ground_truth.txt",
            _lines(ids[w] for _, w, _ in plan.val).encode(),
        ),
        # Blacklisted for the localization task only: classification keeps these images.
        (f"{top}/data/ILSVRC2012_validation_blacklist.txt", _lines(blacklist).encode()),
        (f"{top}/evaluation/", None),
        (f"{top}/evaluation/demo_eval.m", b"% evaluation demo\n"),
    ]
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(_tar_bytes(members))
    return buf.getvalue()


def _meta_mat_bytes(rng, plan: _IlsvrcPlan, per_class: int) -> bytes:
    """meta.mat as in the real devkit: leaves get IDs 1..N, then non-leaf synsets that are not classes.

    The hierarchy: entity -> {physical entity -> organism -> first half, artifact -> the rest}.
    "physical entity" has one child, which loadmat(squeeze_me=True) turns into a bare integer.
    """
    n = len(plan.by_id)
    root_id, physical_id, organism_id, artifact_id = range(n + 1, n + 5)
    half = max(1, n // 2)
    parents = [
        (root_id, "entity", [physical_id, artifact_id], 3, n),
        (physical_id, "physical entity", [organism_id], 2, half),
        (organism_id, "organism, being", list(range(1, half + 1)), 1, half),
        (artifact_id, "artifact, artefact", list(range(half + 1, n + 1)), 1, n - half),
    ]
    parent_wnids = _random_wnids(rng, len(parents), avoid=set(plan.by_id))
    synsets = np.empty((n + len(parents), 1), dtype=[(f, object) for f in _SYNSET_FIELDS])
    no_children = np.zeros((1, 0), np.uint8)
    for i, wnid in enumerate(plan.by_id):
        gloss = f"a synthetic class for tests ({plan.names[wnid]})"
        synsets[i, 0] = (i + 1, wnid, plan.names[wnid], gloss, 0, no_children, 0, per_class)
    for i, (sid, words, children, height, leaves) in enumerate(parents, n):
        gloss = f"a synthetic {words.split(',')[0]}"
        kids = np.array([children], np.uint16)
        synsets[i, 0] = (
            sid,
            parent_wnids[i - n],
            words,
            gloss,
            len(children),
            kids,
            height,
            leaves * per_class,
        )
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    # savemat stamps the current time in its 116-byte text header: a fixed one keeps the bytes a
    # function of the seed (two generations straddling a second differed).
    data = bytearray(buf.getvalue())
    header = b"MATLAB 5.0 MAT-file Platform: posix, Created on: Mon Jan  1 00:00:00 2024"
    data[:116] = header.ljust(116, b"\0")
    return bytes(data)


def _boxes(rng, wnid: str, count: int) -> list[tuple[str, int, int, int, int]]:
    """Bounding boxes in the coordinates of a 500x375 photo (the fixtures never check them)."""
    out = []
    for _ in range(count):
        x0, y0 = int(rng.integers(0, 250)), int(rng.integers(0, 180))
        out.append((wnid, x0, y0, x0 + int(rng.integers(40, 250)), y0 + int(rng.integers(40, 190))))
    return out


def _prediction_string(boxes) -> str:
    """Kaggle's `<wnid> x0 y0 x1 y1 ` per box, with its trailing space."""
    return "".join(f"{w} {x0} {y0} {x1} {y1} " for w, x0, y0, x1, y1 in boxes)


def _voc_xml(folder: str, stem: str, boxes) -> str:
    objects = "".join(
        f"\t<object>\n\t\t<name>{w}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
        f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for w, x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{stem}</filename>\n\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>500</width>\n\t\t<height>375</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n{objects}</annotation>\n"
    )


# ---------------------------------------------------------------------------- Tiny ImageNet


def make_tiny_imagenet(
    root,
    *,
    as_zip=False,
    num_classes=4,
    per_class=6,
    val_per_class=3,
    bad=True,
    seed=0,
    side_range=(64, 64),
    test_images=3,
    classes: dict[str, str] | None = None,
    other_words: dict[str, str] | None = None,
    dirname="tiny-imagenet-200",
    quality=90,
) -> Fixture:
    """`tiny-imagenet-200/` (or, with `as_zip`, only `tiny-imagenet-200.zip` holding that tree).

    `classes` ({wnid: English names}, in wnids.txt order) and `other_words` (the non-class
    entries of words.txt) default to random ones; tests/make_demo_data.py passes real ones.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train_bad, val_bad = _bad_kinds(bad)
    if classes is None:
        wnids = _random_wnids(rng, num_classes)
        classes = _english_names(rng, wnids)
    wnids = list(classes)
    if other_words is None:
        others = _random_wnids(rng, 9 * len(wnids), avoid=set(wnids))
        other_words = _english_names(rng, others)
    sorted_wnids = sorted(wnids)

    def image(wnid, kind):
        index = None if wnid is None else sorted_wnids.index(wnid)
        return _image_bytes(rng, kind, index, len(wnids), side_range, quality)

    words = {**other_words, **classes}
    files: dict[str, bytes | str] = {
        "words.txt": _lines(f"{w}\t{words[w]}" for w in sorted(words)),
        "wnids.txt": _lines(wnids),
    }
    records = []
    for wnid, kinds in zip(wnids, _spread(rng, len(wnids), per_class, train_bad), strict=True):
        boxes = []
        for i, kind in enumerate(kinds):
            relpath = f"train/{wnid}/images/{wnid}_{i}.JPEG"
            files[relpath] = image(wnid, kind)
            records.append(_record("train", wnid, kind, relpath))
            boxes.append(_tsv(f"{wnid}_{i}.JPEG", *_tiny_box(rng)))
        files[f"train/{wnid}/{wnid}_boxes.txt"] = _lines(boxes)
    val = [
        (w, k)
        for w, kinds in zip(wnids, _spread(rng, len(wnids), val_per_class, val_bad), strict=True)
        for k in kinds
    ]
    annotations = []
    for i, j in enumerate(rng.permutation(len(val))):  # file numbers run across classes
        (wnid, kind), relpath = val[j], f"val/images/val_{i}.JPEG"
        files[relpath] = image(wnid, kind)
        records.append(_record("val", wnid, kind, relpath))
        annotations.append(_tsv(f"val_{i}.JPEG", wnid, *_tiny_box(rng)))
    files["val/val_annotations.txt"] = _lines(annotations)
    for i in range(test_images):
        files[f"test/images/test_{i}.JPEG"] = image(None, "ok")
        records.append(_record("test", None, "ok", f"test/images/test_{i}.JPEG"))

    prefix = f"{dirname}/" if dirname else ""
    if as_zip:
        if not dirname:
            raise ValueError("as_zip needs a dirname: the zip holds the tree under that prefix")
        src = root / f"{dirname}.zip"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(_zip_bytes({prefix + k: v for k, v in files.items()}))
        prefix = f"{src.name}/{prefix}"
    else:
        src = root / dirname if dirname else root
        for relpath, data in files.items():
            _put(src, relpath, data)
    for r in records:
        r["relpath"] = prefix + r["relpath"]
    return Fixture(root, src, records, sorted_wnids, dict(classes))


def _tiny_box(rng) -> tuple[int, int, int, int]:
    x0, y0 = (int(v) for v in rng.integers(0, 32, 2))
    return x0, y0, x0 + int(rng.integers(16, 32)), y0 + int(rng.integers(16, 32))


# ---------------------------------------------------------------------------- generic folders


def make_folder(
    root, *, num_classes=4, per_class=6, val_per_class=3, bad=True, seed=0, side_range=(40, 96)
) -> Fixture:
    """`train/<class name>/*` and `val/<class name>/*` as a user would collect them.

    Class names have spaces and accents; extensions are mixed (.jpg .jpeg .png .JPEG, real
    PNGs in .png files); every class has an `img.001.jpg`, so file names repeat across classes.
    """
    if num_classes > len(FOLDER_CLASSES):
        raise ValueError(f"make_folder has names for at most {len(FOLDER_CLASSES)} classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = list(FOLDER_CLASSES[:num_classes])
    classes = sorted(names)
    train_bad, val_bad = _bad_kinds(bad)
    records = []
    for split, count, bad_kinds in (("train", per_class, train_bad), ("val", val_per_class, val_bad)):
        for name, kinds in zip(names, _spread(rng, num_classes, count, bad_kinds), strict=True):
            numbers = rng.choice(np.arange(2, 10000), count, replace=False)  # unique names in a folder
            for i, (kind, number) in enumerate(zip(kinds, numbers, strict=True)):
                file_name = _folder_file_name(i, int(number), kind)
                kind = "png" if file_name.endswith(".png") else kind
                relpath = f"{split}/{name}/{file_name}"
                _put(root, relpath, _image_bytes(rng, kind, classes.index(name), num_classes, side_range))
                records.append(_record(split, name, kind, relpath))
    return Fixture(root, root, records, classes, {c: c for c in classes})


def _folder_file_name(i: int, number: int, kind: str) -> str:
    patterns = (f"IMG_{number:04d}.JPEG", f"photo {number}.jpeg", f"{number:05d}.png", f"DSC{number:05d}.jpg")
    if i == 0:
        return "img.001.jpg"
    name = patterns[i % len(patterns)]
    return f"{name[:-4]}.jpg" if kind != "ok" and name.endswith(".png") else name


# ---------------------------------------------------------------------------- shared pieces


def _bad_kinds(bad) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """bad=True -> the standard problems; False -> none; or an explicit (train kinds, val kinds)."""
    if bad is True:
        return TRAIN_BAD_KINDS, VAL_BAD_KINDS
    if bad is False:
        return (), ()
    train, val = bad
    return tuple(train), tuple(val)


def _spread(rng, num_classes: int, count: int, bad_kinds) -> list[list[str]]:
    """Kinds of `count` images for each class: "ok" except `bad_kinds`, dealt to classes in turn."""
    kinds = [["ok"] * count for _ in range(num_classes)]
    for i, kind in enumerate(bad_kinds):
        slots = kinds[i % num_classes]
        free = [j for j, k in enumerate(slots) if k == "ok"]
        if not free:
            raise ValueError(f"not enough images per class ({count}) for the bad kinds {bad_kinds}")
        slots[free[int(rng.integers(len(free)))]] = kind
    return kinds


def _image_bytes(rng, kind: str, class_index, num_classes: int, side_range, quality: int = 90) -> bytes:
    if kind == "empty":
        return b""
    if kind == "garbage":
        data = bytearray(rng.integers(0, 256, int(rng.integers(200, 2000)), dtype=np.uint8).tobytes())
        data[0] = 0x00  # never by chance the magic number of an image format
        return bytes(data)
    width, height = (int(v) for v in rng.integers(side_range[0], side_range[1] + 1, 2))
    img = synth_image(rng, width, height, class_index, num_classes if class_index is not None else None)
    if kind in ("png", "png_named_jpeg"):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    if kind == "cmyk":
        return jpeg_bytes(img.convert("CMYK"), quality)
    if kind == "gray":
        return jpeg_bytes(img.convert("L"), quality)
    data = jpeg_bytes(img, quality, progressive=kind == "progressive")
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind not in ("ok", "progressive"):
        raise ValueError(f"unknown kind {kind!r}")
    return data


def _reordered(rng, items: list[str]) -> list[str]:
    """`items` shuffled into an order that is neither theirs nor sorted either way (given 3+ items)."""
    avoid = (items, sorted(items), sorted(items, reverse=True))
    for _ in range(100):
        order = [items[i] for i in rng.permutation(len(items))]
        if len(items) < 3 or order not in avoid:
            return order
    raise AssertionError("unreachable: 3+ items have at least 3 other orders")


def _random_wnids(rng, n: int, avoid=frozenset()) -> list[str]:
    """`n` distinct wnids like n01440764, in an order that is not sorted (given 2+; 3+: nor reversed)."""
    wnids: list[str] = []
    while len(wnids) < n:
        wnid = f"n{int(rng.integers(1_000_000, 15_000_000)):08d}"
        if wnid not in avoid and wnid not in wnids:
            wnids.append(wnid)
    if n == 2:
        return sorted(wnids, reverse=True)
    if n > 2 and wnids in (sorted(wnids), sorted(wnids, reverse=True)):
        return _reordered(rng, wnids)
    return wnids


def _english_names(rng, wnids: list[str]) -> dict[str, str]:
    """Names like the devkit's "kit fox, Vulpes macrotis"; the first two classes are both "crane",
    as n02012849 (the bird) and n03126707 (the machine) are in ImageNet."""
    names = {}
    for i, wnid in enumerate(wnids):
        if i < 2:
            names[wnid] = "crane"
            continue
        adjective, noun = str(rng.choice(_ADJECTIVES)), str(rng.choice(_NOUNS))
        names[wnid] = f"{adjective} {noun}, {noun.capitalize()}us {adjective}ensis"
    return names


def _lines(items) -> str:
    return "".join(f"{item}\n" for item in items)


def _tsv(*fields) -> str:
    return "\t".join(map(str, fields))


def _record(split: str, wnid: str | None, kind: str, relpath: str) -> dict:
    return {"split": split, "wnid": wnid, "kind": kind, "relpath": relpath}


def _put(root: Path, relpath: str, data: bytes | str) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _tar_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
    """A GNU-format tar of (name, bytes) members; bytes None is a directory. Fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime, info.uname, info.gname = _MTIME, "imagenet", "imagenet"
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_bytes(files: dict[str, bytes | str]) -> bytes:
    """A zip with a directory entry before the contents of each folder, as `zip -r` writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        written = set()
        for name, data in files.items():
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth]) + "/"
                if folder not in written:
                    info = zipfile.ZipInfo(folder, _ZIP_TIME)
                    info.external_attr = (0o40755 << 16) | 0x10
                    zf.writestr(info, b"")
                    written.add(folder)
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.external_attr, info.compress_type = 0o644 << 16, zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()
