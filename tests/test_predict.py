"""predict.py: the images people have, the files that are not images, checkpoints that do not fit,
the output formats, agreement with the loaders' eval path, and a round trip through train_ddp.py.

python -m pytest tests/test_predict.py -q
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from imagenet_ddp import checkpoint as ck
from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD, PAD_LABEL
from imagenet_ddp.inference import Classifier, ImageError, load_image
from imagenet_ddp.labels import imagenet_names, tiny_imagenet_names
from imagenet_ddp.models import architecture, build_model
from imagenet_ddp.synth import jpeg_bytes, synth_image

WNIDS = sorted(tiny_imagenet_names("en"))[:10]  # n01443537 goldfish first
CROP, RESIZE = 32, 37


def make_checkpoint(path: Path, classes=WNIDS, crop=CROP, resize=RESIZE, seed=0, **extra) -> Path:
    """An untrained ResNet-18 saved the way train_ddp.py saves: through checkpoint.save_atomic."""
    torch.manual_seed(seed)
    arch = architecture("resnet18", len(classes))
    names = imagenet_names("en")
    ckpt = {
        "format": ck.FORMAT,
        "architecture": arch,
        "model": build_model(**arch).state_dict(),
        "ema": None,
        "classes": list(classes),
        "class_names": [names.get(c, c) for c in classes],
        "preprocess": {
            "resize": resize,
            "crop": crop,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
        },
        **extra,
    }
    ck.save_atomic(ckpt, path)
    return path


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def photo(width=120, height=90, seed=0) -> Image.Image:
    return synth_image(np.random.default_rng(seed), width, height)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def bomb_png(width=30000, height=30000) -> bytes:
    """A valid small PNG whose header claims width x height pixels."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; display rotated 90 degrees clockwise
    return encoded(photo(120, 80), "JPEG", quality=90, exif=exif.tobytes())


def good_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgba = photo().convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    files = {
        "photo.jpg": jpeg_bytes(photo()),
        "alpha.png": encoded(rgba, "PNG"),
        "gray.jpg": encoded(photo().convert("L"), "JPEG"),
        "cmyk.jpg": encoded(photo().convert("CMYK"), "JPEG"),
        "photo.webp": encoded(photo(), "WEBP"),
        "exif-rotated.jpg": exif_rotated_jpeg(),
        "palette.gif": encoded(photo().convert("P"), "GIF"),
        "16bit.png": encoded(
            Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20), "PNG"
        ),
        "tiny.png": encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "banner.png": encoded(Image.new("RGB", (20000, 3), (10, 90, 200)), "PNG"),
        "huge.jpg": encoded(photo(6000, 4000), "JPEG", quality=80),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, out.splitlines())}


def test_every_kind_of_image_people_have_gets_a_top_k(ckpt_path, tmp_path, capsys):
    files = good_images(tmp_path / "in")
    code, out, err = run(
        capsys, "--checkpoint", ckpt_path, *files.values(), "--format", "jsonl", "--topk", "3"
    )
    assert code == 0, err
    got = records(out)
    assert list(got) == [str(p) for p in files.values()]  # input order
    for path, r in got.items():
        assert "error" not in r, path
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert {t["wnid"] for t in r["top"]} <= set(WNIDS)


def test_exif_orientation_and_alpha_are_applied_as_people_see_the_image():
    data = exif_rotated_jpeg()
    plain = Image.open(io.BytesIO(data)).convert("RGB")
    upright = load_image(data)
    assert plain.size == (120, 80) and upright.size == (80, 120)
    assert np.array_equal(np.asarray(upright), np.asarray(plain.transpose(Image.Transpose.ROTATE_270)))
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(encoded(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)  # as make_shards


def test_bad_files_get_an_error_line_each_and_the_others_are_classified(ckpt_path, tmp_path, capsys):
    good = jpeg_bytes(photo())
    files = {
        "ok.jpg": good,
        "notes.jpg": b"shopping list: milk, eggs\n" * 20,
        "truncated.jpg": good[: len(good) // 2],
        "empty.png": b"",
        "bomb.png": bomb_png(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    argv = [tmp_path / name for name in files] + [tmp_path / "missing.jpg", tmp_path / "nothing-*.jpg"]
    code, out, err = run(capsys, "--checkpoint", ckpt_path, *argv, "--format", "jsonl")
    assert code == 1
    got = records(out)
    errors = {Path(p).name: r.get("error") for p, r in got.items()}
    assert errors["ok.jpg"] is None and len(got[str(tmp_path / "ok.jpg")]["top"]) == 5
    assert errors["notes.jpg"] == "not an image (unrecognized format)"
    assert "truncated" in errors["truncated.jpg"]
    assert errors["empty.png"] == "empty file"
    assert "decompression bomb" in errors["bomb.png"]
    assert errors["missing.jpg"] == "no such file"
    assert errors["nothing-*.jpg"] == "no file matches this pattern"
    assert err.strip() == "predict.py: 6 of 7 files could not be classified"
    # The table shows the same errors in place, for people.
    code, out, _ = run(capsys, "--checkpoint", ckpt_path, tmp_path / "empty.png", tmp_path / "ok.jpg")
    assert code == 1 and out.startswith(
        f"{tmp_path / 'empty.png'}\n  error: empty file\n{tmp_path / 'ok.jpg'}\n"
    )


def test_directories_globs_and_stdin_name_the_images(ckpt_path, tmp_path, capsys, monkeypatch):
    for rel in ("a/1.jpg", "a/deeper/2.JPEG", "a/.hidden.jpg", "b/3.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        photo(40, 30).save(tmp_path / rel, "PNG" if rel.endswith(".png") else "JPEG")
    (tmp_path / "a/readme.txt").write_text("a directory gives its images only")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{tmp_path / 'b'}\n\n{tmp_path / 'a/1.jpg'}\n"))
    argv = [tmp_path / "a", f"{tmp_path}/**/3.png", "-", "--format", "jsonl"]
    code, out, err = run(capsys, "--checkpoint", ckpt_path, *argv)
    assert code == 0, err
    listed = [str(Path(json.loads(line)["path"]).relative_to(tmp_path)) for line in out.splitlines()]
    assert listed == ["a/1.jpg", "a/deeper/2.JPEG", "b/3.png", "b/3.png", "a/1.jpg"]


def test_the_three_formats_carry_index_wnid_both_names_and_probability(ckpt_path, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes(photo()))
    args = ["--checkpoint", ckpt_path, image, "--lang", "es", "--topk", "10"]
    _, jsonl, _ = run(capsys, *args, "--format", "jsonl")
    _, table, _ = run(capsys, *args)
    _, text, _ = run(capsys, *args, "--format", "csv")
    [record] = records(jsonl).values()
    assert record["lang"] == "es"
    goldfish = next(t for t in record["top"] if t["wnid"] == "n01443537")
    assert goldfish["class_index"] == 0 and goldfish["name_en"] == "goldfish"
    assert goldfish["name"] == imagenet_names("es")["n01443537"] != "goldfish"
    assert f"{goldfish['name']} (goldfish)  [n01443537, class 0]" in table
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "path",
        "rank",
        "class_index",
        "wnid",
        "name_en",
        "name_es",
        "probability",
        "error",
    ]
    assert [r["wnid"] for r in rows] == [t["wnid"] for t in record["top"]]
    assert [float(r["probability"]) for r in rows] == pytest.approx(
        [t["probability"] for t in record["top"]], rel=1e-5
    )


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_and_language_problems_are_one_line_errors(ckpt_path, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes(photo()))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    make_checkpoint(tmp_path / "wrong-classes.pt", classes=WNIDS[:4])
    bad = ck.load(tmp_path / "wrong-classes.pt")
    bad["classes"] = WNIDS  # 10 names for a 4-way model
    ck.save_atomic(bad, tmp_path / "mismatch.pt")
    bad["architecture"] = {**bad["architecture"], "num_classes": 10}  # now the weights do not fit
    ck.save_atomic(bad, tmp_path / "weights.pt")
    with open(tmp_path / "code.pt", "wb") as f:
        pickle.dump({"format": ck.FORMAT, "x": ImageError("runs code when unpickled")}, f)
    cases = {
        "missing.pt": "checkpoint not found",
        "notes.pt": "cannot read checkpoint",
        "foreign.pt": "is not an imagenet-ddp checkpoint",
        "mismatch.pt": "10 classes but a 4-way model",
        "weights.pt": "does not fit its architecture",
        "code.pt": "cannot read checkpoint",  # weights_only=True refuses it
    }
    for name, message in cases.items():
        code, out, err = run(capsys, "--checkpoint", tmp_path / name, image)
        assert (code, out) == (2, ""), name
        assert err.startswith("predict.py: error: ") and message in err and err.count("\n") == 1, err
    code, _, err = run(capsys, "--checkpoint", ckpt_path, image, "--lang", "xx")
    assert (
        code == 2
        and err == "predict.py: error: no class names for language 'xx'; available: de, en, es, fr, it, pt\n"
    )


def shard_samples(split_dir: Path) -> list[tuple[bytes, int]]:
    """(jpg bytes, class index) of every sample, in manifest and tar order (the eval loaders' order)."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(split_dir / shard["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        keys = dict.fromkeys(name.rsplit(".", 1)[0] for name in members)
        samples += [(members[f"{k}.jpg"], int(members[f"{k}.cls"])) for k in keys]
    return samples


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from tests.test_train import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.needs("nvidia.dali"))])
def test_preprocessing_gives_the_model_what_the_loaders_eval_path_gives_it(tiny_shards, tmp_path, backend):
    from imagenet_ddp.data import DataConfig, build_loader

    cfg = DataConfig(root=str(tiny_shards), backend=backend, eval_size=40, batch_size=8, workers=1)
    clf = Classifier.from_checkpoint(make_checkpoint(tmp_path / "c.pt", crop=40, resize=46), device="cpu")
    with build_loader(cfg, "val", train=False) as loader:
        batches = [(x.clone(), y.clone()) for x, y in loader]
    theirs = torch.cat([x for x, _ in batches])[torch.cat([y for _, y in batches]) != PAD_LABEL]
    samples = shard_samples(tiny_shards / "val")
    ours = clf.model_input([clf.preprocess(load_image(jpg)) for jpg, _ in samples])
    assert ours.shape == theirs.shape == (len(samples), 3, 40, 40)
    if backend == "torch":
        assert torch.equal(ours, theirs)  # same decoder output, same resize and crop: bit for bit
    else:  # DALI resizes with its own kernels: the loaders' own tolerance (tests/test_loaders.py)
        levels = (ours - theirs).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        assert float(levels.max()) <= 2.01 and float(levels.mean()) < 0.5


def test_a_trained_checkpoint_predicts_and_evaluates_as_training_validated(tiny_shards, tmp_path, capsys):
    import train_ddp
    from tests.test_train import read_metrics, small_run

    run_dir = tmp_path / "run"
    assert train_ddp.main(small_run(tiny_shards, run_dir, "train.epochs=1")) == 0
    [metrics] = read_metrics(run_dir)
    capsys.readouterr()
    best = run_dir / "best.pt"
    code, out, err = run(capsys, "--checkpoint", best, "--evaluate", tiny_shards / "val", "--format", "jsonl")
    assert code == 0, err
    got = json.loads(out)
    assert got["images"] == metrics["val_count"] == 32
    assert (got["top1"], got["top5"]) == (metrics["val_top1"], metrics["val_top5"])
    assert got["loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)  # other batches: other sums
    assert json.loads((run_dir / "best.eval.json").read_text())["splits"] == [got]  # next to the checkpoint
    # The same images as files: predict.py's top-1 is the evaluated class, image by image.
    samples = shard_samples(tiny_shards / "val")
    for i, (jpg, _) in enumerate(samples):
        (tmp_path / f"{i:03d}.jpg").write_bytes(jpg)
    argv = [tmp_path, "--format", "jsonl", "--batch-size", "7", "--lang", "es"]
    code, out, err = run(capsys, "--checkpoint", best, *argv)
    assert code == 0, err
    top1 = [r["top"][0]["class_index"] for r in records(out).values()]
    classes = sorted(["dog", "cat", "red panda", "crème brûlée"])  # a folder dataset: no wnids
    assert all(
        t["name"] == t["name_en"] == classes[t["class_index"]]
        for r in records(out).values()
        for t in r["top"]
    )
    correct = sum(p == label for p, (_, label) in zip(top1, samples, strict=True))
    assert correct == round(metrics["val_top1"] * 32)
    # Shards of none of the model's classes (matched by wnid): nothing to score, refused.
    other = make_checkpoint(tmp_path / "other.pt")
    code, _, err = run(capsys, "--checkpoint", other, "--evaluate", tiny_shards / "val")
    assert code == 2 and "none of its 4 classes (cat, crème brûlée, dog ...) is one of the model's 10" in err
