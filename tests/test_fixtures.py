"""The fixtures have the real on-disk structure, and each file is what its record says it is.

python -m pytest tests/test_fixtures.py -q
"""

import csv
import hashlib
import io
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.imagenet as tv_imagenet
from PIL import Image

from imagenet_ddp.synth import jpeg_bytes, synth_image, write_image_set
from tests.fixtures import (
    REJECTED_KINDS,
    TRAIN_BAD_KINDS,
    VAL_BAD_KINDS,
    make_folder,
    make_imagenet_archives,
    make_imagenet_extracted,
    make_imagenet_kaggle,
    make_tiny_imagenet,
)
from tests.make_demo_data import CLASSES, DEMO_DIR, make_demo_data

GENERATORS = {
    "archives": make_imagenet_archives,
    "kaggle": make_imagenet_kaggle,
    "extracted": make_imagenet_extracted,
    "tiny": make_tiny_imagenet,
    "tiny_zip": lambda root, **kw: make_tiny_imagenet(root, as_zip=True, **kw),
    "folder": make_folder,
}


def tar_list(*args: str, stdin: bytes | None = None) -> list[str]:
    out = subprocess.run(["tar", *args], input=stdin, capture_output=True, check=True)
    return out.stdout.decode().splitlines()


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("layout", GENERATORS)
def test_every_file_is_what_its_record_says(tmp_path, layout):
    fx = GENERATORS[layout](tmp_path)
    assert len({r["relpath"] for r in fx.records}) == len(fx.records)
    for record in fx.records:
        data, kind = fx.read_bytes(record), record["kind"]
        assert record["wnid"] in fx.wnids or (record["split"] == "test" and record["wnid"] is None)
        if kind in REJECTED_KINDS:
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            continue
        img = Image.open(io.BytesIO(data))
        img.load()
        expected = {
            "ok": ("JPEG", "RGB"),
            "progressive": ("JPEG", "RGB"),
            "cmyk": ("JPEG", "CMYK"),
            "gray": ("JPEG", "L"),
            "png_named_jpeg": ("PNG", "RGB"),
            "png": ("PNG", "RGB"),
        }[kind]
        assert (img.format, img.mode) == expected, record
        assert bool(img.info.get("progressive")) == (kind == "progressive"), record
        assert record["relpath"].endswith(".png") == (kind == "png"), record


@pytest.mark.parametrize("layout", GENERATORS)
def test_bad_files_are_spread_over_classes(tmp_path, layout):
    fx = GENERATORS[layout](tmp_path)
    bad_train = [r for r in fx.split("train") if r["kind"] not in ("ok", "png")]
    assert sorted(r["kind"] for r in bad_train) == sorted(TRAIN_BAD_KINDS)
    assert len({r["wnid"] for r in bad_train}) > 1
    assert sorted(r["kind"] for r in fx.split("val") if r["kind"] not in ("ok", "png")) == sorted(
        VAL_BAD_KINDS
    )
    assert fx.expected("val") and fx.rejected("val")
    clean = GENERATORS[layout](tmp_path / "clean", bad=False)
    assert {r["kind"] for r in clean.records} <= {"ok", "png"}


@pytest.mark.parametrize("layout", GENERATORS)
def test_generators_are_deterministic(tmp_path, layout):
    a, b = GENERATORS[layout](tmp_path / "a", seed=3), GENERATORS[layout](tmp_path / "b", seed=3)
    assert tree_digest(a.root) == tree_digest(b.root)
    assert a.records == b.records
    c = GENERATORS[layout](tmp_path / "c", seed=4)
    assert tree_digest(a.root) != tree_digest(c.root)


def test_devkit_is_read_by_torchvisions_parser(tmp_path, monkeypatch):
    fx = make_imagenet_archives(tmp_path)
    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *args: None)  # md5 of the real file
    tv_imagenet.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = tv_imagenet.load_meta_file(str(tmp_path))
    assert sorted(wnid_to_classes) == fx.wnids  # the non-leaf synsets are not classes
    assert val_wnids == [r["wnid"] for r in fx.split("val")]
    assert all(wnid_to_classes[w] == tuple(fx.names[w].split(", ")) for w in fx.wnids)


def test_devkit_ids_are_not_the_sorted_order(tmp_path):
    fx = make_imagenet_archives(tmp_path, num_classes=5)
    members = tar_list("tzf", str(tmp_path / "ILSVRC2012_devkit_t12.tar.gz"))
    assert "ILSVRC2012_devkit_t12/data/meta.mat" in members
    assert "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt" in members
    subprocess.run(["tar", "xzf", "ILSVRC2012_devkit_t12.tar.gz"], cwd=tmp_path, check=True)
    synsets = scipy.io.loadmat(tmp_path / "ILSVRC2012_devkit_t12/data/meta.mat", squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if s["num_children"] == 0]
    assert [int(s["ILSVRC2012_ID"]) for s in leaves] == [1, 2, 3, 4, 5]
    by_id = [str(s["WNID"]) for s in leaves]
    assert sorted(by_id) == fx.wnids and by_id != fx.wnids
    parents = [s for s in synsets if s["num_children"] > 0]
    assert parents and all(s["ILSVRC2012_ID"] > 5 for s in parents)
    assert any(np.ndim(s["children"]) == 0 for s in parents)  # one child: squeezed to a bare integer


def test_archives_are_listed_by_gnu_tar(tmp_path):
    fx = make_imagenet_archives(tmp_path)
    train_tar = str(tmp_path / "ILSVRC2012_img_train.tar")
    assert sorted(tar_list("tf", train_tar)) == [f"{w}.tar" for w in fx.wnids]
    for wnid in fx.wnids:
        inner = subprocess.run(
            ["tar", "xOf", train_tar, f"{wnid}.tar"], capture_output=True, check=True
        ).stdout
        expected = [r["relpath"].split("/")[-1] for r in fx.split("train") if r["wnid"] == wnid]
        assert sorted(tar_list("tf", "-", stdin=inner)) == sorted(expected)
        assert all(name.startswith(f"{wnid}_") and name.endswith(".JPEG") for name in expected)
    val_names = tar_list("tf", str(tmp_path / "ILSVRC2012_img_val.tar"))
    assert val_names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(fx.split("val")) + 1)]


def test_kaggle_layout(tmp_path):
    fx = make_imagenet_kaggle(tmp_path)
    with open(tmp_path / "LOC_val_solution.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    labels = {image_id: prediction.split()[0] for image_id, prediction in rows[1:]}
    assert [image_id for image_id, _ in rows[1:]] != sorted(labels)
    assert any(len(prediction.split()) > 5 for _, prediction in rows[1:])
    for record in fx.split("val"):
        assert record["relpath"].startswith("ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_")
        assert labels[Path(record["relpath"]).stem] == record["wnid"]
    mapping = (tmp_path / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in mapping] == fx.wnids
    assert all(line.split(" ", 1)[1] == fx.names[line[:9]] for line in mapping)
    assert (tmp_path / "LOC_train_solution.csv").read_text().startswith("ImageId,PredictionString\n")
    assert (tmp_path / "LOC_sample_submission.csv").exists()
    assert fx.split("test") and all(r["wnid"] is None for r in fx.split("test"))
    assert all(r["relpath"].startswith(f"ILSVRC/Data/CLS-LOC/train/{r['wnid']}/") for r in fx.split("train"))


def test_extracted_layout(tmp_path):
    fx = make_imagenet_extracted(tmp_path)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == fx.wnids
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == fx.wnids
    for record in fx.split("val"):
        assert record["relpath"].startswith(f"val/{record['wnid']}/ILSVRC2012_val_")


@pytest.mark.parametrize("as_zip", [False, True])
def test_tiny_imagenet_layout(tmp_path, as_zip):
    fx = make_tiny_imagenet(tmp_path, as_zip=as_zip, num_classes=5)
    if as_zip:
        assert [p.name for p in tmp_path.iterdir()] == ["tiny-imagenet-200.zip"]
        names = zipfile.ZipFile(fx.src).namelist()
        assert all(n.startswith("tiny-imagenet-200/") for n in names)
        assert {"tiny-imagenet-200/", "tiny-imagenet-200/val/", "tiny-imagenet-200/train/"} <= set(names)
        read = zipfile.ZipFile(fx.src).read
        text = lambda name: read(f"tiny-imagenet-200/{name}").decode()  # noqa: E731
    else:
        assert fx.src == tmp_path / "tiny-imagenet-200"
        text = lambda name: (fx.src / name).read_text()  # noqa: E731
    wnids = text("wnids.txt").split()
    assert sorted(wnids) == fx.wnids and wnids != fx.wnids
    words = [line.split("\t") for line in text("words.txt").splitlines()]
    assert len(words) >= 10 * len(fx.wnids) and [w for w, _ in words] == sorted(w for w, _ in words)
    assert {w: n for w, n in words if w in fx.wnids} == fx.names
    annotations = [line.split("\t") for line in text("val/val_annotations.txt").splitlines()]
    assert [a[0] for a in annotations] == [f"val_{i}.JPEG" for i in range(len(annotations))]
    labels = [a[1] for a in annotations]
    assert labels != sorted(labels)  # not grouped by class
    assert {Path(r["relpath"]).name: r["wnid"] for r in fx.split("val")} == {a[0]: a[1] for a in annotations}
    for record in fx.split("train"):
        assert record["relpath"].endswith(f"train/{record['wnid']}/images/{Path(record['relpath']).name}")
    for wnid in fx.wnids:
        assert len(text(f"train/{wnid}/{wnid}_boxes.txt").splitlines()) == 6
    assert fx.split("test") and all("/test/images/test_" in r["relpath"] for r in fx.split("test"))
    sizes = {Image.open(io.BytesIO(fx.read_bytes(r))).size for r in fx.expected("train")}
    assert sizes == {(64, 64)}


def test_folder_layout(tmp_path):
    fx = make_folder(tmp_path)
    assert "red panda" in fx.wnids and fx.wnids == sorted(fx.wnids)
    names = Counter(Path(r["relpath"]).name for r in fx.split("train"))
    assert names["img.001.jpg"] >= 2
    assert {Path(r["relpath"]).suffix for r in fx.records} == {".jpg", ".jpeg", ".png", ".JPEG"}
    for record in fx.records:
        assert record["relpath"].startswith(f"{record['split']}/{record['wnid']}/")


def test_synthetic_photos_weigh_like_real_ones():
    rng = np.random.default_rng(0)
    sizes = [len(jpeg_bytes(synth_image(rng, 500, 375))) for _ in range(5)]
    assert all(60_000 <= s <= 150_000 for s in sizes), sizes
    a, b = (
        synth_image(np.random.default_rng(1), 64, 48, 3, 10),
        synth_image(np.random.default_rng(1), 64, 48, 3, 10),
    )
    assert a.size == (64, 48) and a.mode == "RGB" and a.tobytes() == b.tobytes()


def test_class_signal_is_learnable():
    """Nearest centroid on the hue of saturated pixels beats chance by far: a small CNN does better."""
    rng, num_classes = np.random.default_rng(0), 8

    def saturated_hues(img):
        hsv = np.asarray(img.convert("HSV"), np.float32)
        weight = hsv[..., 1] * (hsv[..., 1] > 150)  # the class shape is saturated, the background mostly not
        return np.histogram(hsv[..., 0], bins=32, range=(0, 256), weights=weight)[0] / max(weight.sum(), 1)

    data = [
        [saturated_hues(synth_image(rng, 64, 64, c, num_classes)) for _ in range(20)]
        for c in range(num_classes)
    ]
    centroids = np.stack([np.mean(d[:10], axis=0) for d in data])
    correct = sum(
        int(np.argmin(np.abs(centroids - x).sum(1)) == c) for c, d in enumerate(data) for x in d[10:]
    )
    assert correct / (10 * num_classes) > 4 / num_classes


def test_write_image_set(tmp_path):
    paths = write_image_set(tmp_path, 3, size=(120, 90), seed=1)
    assert [p.name for p in paths] == sorted(p.name for p in tmp_path.iterdir())
    assert all(Image.open(p).size == (120, 90) for p in paths)


def test_demo_dataset_is_reproduced_by_its_script(tmp_path):
    fx = make_demo_data(tmp_path / "demo")
    assert tree_digest(fx.src) == tree_digest(DEMO_DIR)
    assert (DEMO_DIR / "wnids.txt").read_text().split() == list(CLASSES)
    assert Counter(r["split"] for r in fx.records) == {"train": 1000, "val": 200, "test": 20}
    assert Counter(r["kind"] for r in fx.records) == {"ok": 1217, "gray": 3}
    assert sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file()) < 3_000_000
