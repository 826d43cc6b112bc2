"""make_shards.py on the evaluation sets' real layouts (ImageNet-V2, -R, -A, -Sketch, -C) and ReaL labels:
packed, verified, read back by webdataset and GNU tar, each label checked against the layout's own
definition (V2: folder = class index in sorted-wnid order; the others: wnid folders)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_shards
from imagenet_ddp.evalsets import imagenet_wnids, label_space, read_real_labels
from imagenet_ddp.synth import jpeg_bytes, synth_image
from imagenet_ddp.verify import verify_splits
from tests.shard_reader import manifest, read_webdataset

WNIDS = imagenet_wnids()


def _jpeg(rng, kind: str = "ok") -> bytes:
    img = synth_image(rng, int(rng.integers(16, 33)), int(rng.integers(16, 33)))
    if kind == "png":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    if kind == "gray":
        return jpeg_bytes(img.convert("L"))
    if kind == "garbage":
        return b"\0not an image" * 20
    return jpeg_bytes(img)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _tar(path: Path, files: dict[str, bytes], mode: str = "w") -> None:
    """A GNU tar (as `tar czf` writes the published archives), with directory entries."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for folder in sorted({str(Path(rel).parent) for rel in files}):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def pack(dataset, src, out, *extra) -> None:
    argv = [dataset, "--src", str(src), "--out", str(out), "--workers", "1", "--shard-size", "7", *extra]
    assert make_shards.main([str(a) for a in argv]) == 0


def verify(*split_dirs, against_source=True) -> None:
    argv = ["verify", *map(str, split_dirs), "--workers", "1"]
    assert make_shards.main(argv + (["--against-source"] if against_source else [])) == 0


def gnu_tar_members(split_dir: Path) -> list[str]:
    names = []
    for s in manifest(split_dir)["shards"]:
        out = subprocess.run(
            ["tar", "tf", str(split_dir / s["file"])], capture_output=True, text=True, check=True
        )
        names += out.stdout.split()
    return names


# ------------------------------------------------------------------------------------------ ReaL labels


@pytest.fixture(scope="module")
def real_val(tmp_path_factory):
    """An extracted ImageNet val split (real wnids, ILSVRC2012_val_ names) and a real.json over it,
    with empty lists and multi-label entries; one label names a class the pack lacks."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    classes = [WNIDS[i] for i in (0, 1, 5, 17, 999)]
    truth, files = {}, {}
    for n in range(1, 21):
        wnid = classes[n % len(classes)]
        truth[n] = wnid
        files[f"imagenet/val/{wnid}/ILSVRC2012_val_{n:08d}.JPEG"] = _jpeg(rng)
    _write(root, files)
    real = []
    for n in range(1, 23):  # real.json covers more images than this pack holds
        own = WNIDS.index(truth[n]) if n in truth else 3
        real.append([] if n % 4 == 0 else sorted({own, 42}) if n % 3 == 0 else [own])
    (root / "real.json").write_text(json.dumps(real))
    out = root / "shards"
    pack("imagenet", root / "imagenet", out, "--real-labels", root / "real.json")
    return root, out / "val", truth, real


def test_real_labels_follow_the_canonical_order_and_verify(real_val):
    root, val, truth, real = real_val
    m = manifest(val)
    labels = read_real_labels(val)
    samples = read_webdataset(val)  # the order evaluation streams: shards in manifest order
    assert len(labels) == len(samples) == 20
    for sample, mine in zip(samples, labels, strict=True):
        n = int(sample["key"].rsplit("_", 1)[1])
        # ReaL's indices are ImageNet-1k's; the split's classes are 5 of them: mapped by wnid, 42 dropped
        assert [m["classes"][c] for c in mine] == [WNIDS[c] for c in real[n - 1] if WNIDS[c] in m["classes"]]
    assert sum(1 for lab in labels if lab) == m["real_labels"]["num_labelled"] == 15
    assert label_space(m) == ("imagenet-1k-subset", [0, 1, 5, 17, 999])
    verify(val)


def test_real_labels_tampered_or_shuffled_fail_verify(real_val, tmp_path):
    _, val, _, _ = real_val
    copy = tmp_path / "val"
    shutil.copytree(val, copy)
    side = json.loads((copy / "real-labels.json").read_text())
    side["labels"] = side["labels"][1:] + side["labels"][:1]  # off by one: the classic misalignment
    side["keys"] = side["keys"][1:] + side["keys"][:1]
    (copy / "real-labels.json").write_text(json.dumps(side))
    assert make_shards.main(["verify", str(copy), "--workers", "1"]) == 1, "sha256 differs"
    m = manifest(copy)
    m["real_labels"]["sha256"] = make_shards_sha(copy / "real-labels.json")
    (copy / "manifest.json").write_text(json.dumps(m))
    assert make_shards.main(["verify", str(copy), "--workers", "1"]) == 1, "keys out of shard order"


def make_shards_sha(path: Path) -> str:
    from imagenet_ddp.shards import file_sha256

    return file_sha256(path)


def test_real_labels_as_a_separate_step_and_bad_real_json(real_val, tmp_path, capsys):
    root, val, _, _ = real_val
    copy = tmp_path / "val"
    shutil.copytree(val, copy)
    (copy / "real-labels.json").unlink()
    m = manifest(copy)
    del m["real_labels"]
    (copy / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    assert read_real_labels(copy) is None
    assert make_shards.main(["real-labels", "--real", str(root / "real.json"), str(copy)]) == 0
    assert (copy / "real-labels.json").read_bytes() == (val / "real-labels.json").read_bytes()
    assert read_real_labels(copy) == read_real_labels(val)
    bad = tmp_path / "bad.json"
    bad.write_text("[[1], [2000]]")
    capsys.readouterr()
    assert make_shards.main(["real-labels", "--real", str(bad), str(copy)]) == 2
    assert "entry 1 (ILSVRC2012_val_00000002)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ layouts

V2_CLASSES = list(range(12)) + [100, 999]  # folders 0..11: string order ("10" < "2") differs


def check_split(split_dir: Path, truth: dict[str, str]) -> list[dict]:
    """Every sample arrives once with the layout's label; GNU tar lists the shards; verify passes.
    `truth`: source path -> wnid, by the layout's own definition."""
    m = manifest(split_dir)
    samples = read_webdataset(split_dir)
    assert sorted(s["meta"]["source"] for s in samples) == sorted(truth)
    for s in samples:
        assert m["classes"][s["cls"]] == s["meta"]["wnid"] == truth[s["meta"]["source"]]
    assert len(gnu_tar_members(split_dir)) == 3 * len(samples)
    verify(split_dir)
    return samples


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """ImageNet-V2 as published: matched-frequency as its .tar.gz, top-images extracted."""
    root = tmp_path_factory.mktemp("v2")
    rng = np.random.default_rng(1)
    images = {}
    for i in V2_CLASSES:
        for _ in range(2):
            images[f"{i}/{rng.bytes(8).hex()}.jpeg"] = _jpeg(rng)
    _tar(
        root / "imagenetv2-matched-frequency.tar.gz",
        {f"imagenetv2-matched-frequency-format-val/{k}": v for k, v in images.items()},
        "w:gz",
    )
    _write(root / "imagenetv2-top-images-format-val", images)
    out = root / "shards"
    pack("imagenet-v2", root / "imagenetv2-matched-frequency.tar.gz", out)
    pack("imagenet-v2", root / "imagenetv2-top-images-format-val", out)
    return root, out, images


def _v2_truth(prefix: str, images: dict) -> dict[str, str]:
    return {f"{prefix}/{rel}": WNIDS[int(rel.split("/")[0])] for rel in images}


def test_v2_folder_is_the_class_index_in_sorted_wnid_order(v2):
    root, out, images = v2
    archive = root / "imagenetv2-matched-frequency.tar.gz"
    mf = out / "matched-frequency"
    check_split(mf, _v2_truth(f"{archive}/imagenetv2-matched-frequency-format-val", images))
    top = out / "top-images"
    check_split(top, _v2_truth(str(root / "imagenetv2-top-images-format-val"), images))
    for split_dir, variant in ((mf, "matched-frequency"), (top, "top-images")):
        m = manifest(split_dir)
        assert (m["variant"], m["label_space"], m["classes"]) == (variant, "imagenet-1k", list(WNIDS))
        assert label_space(m).imagenet_indices == list(range(1000))
    assert len(manifest(mf)["shards"]) == 4  # .tar.gz members read across several shards


def test_v2_string_sorted_folders_give_other_labels(v2, tmp_path):
    """The negative control: the generic folder packer (ImageFolder's rule, folder names sorted as
    strings) labels the same V2 tree differently."""
    root, out, images = v2
    _write(tmp_path / "tree" / "val", images)
    pack("folder", tmp_path / "tree", tmp_path / "shards")
    generic = {Path(s["meta"]["source"]).name: s["cls"] for s in read_webdataset(tmp_path / "shards" / "val")}
    ours = {
        Path(s["meta"]["source"]).name: WNIDS.index(s["meta"]["wnid"])
        for s in read_webdataset(out / "top-images")
    }
    assert generic.keys() == ours.keys()
    wrong = [name for name in ours if generic[name] != ours[name]]
    assert len(wrong) > len(ours) // 2, "string order must disagree for most folders here"


@pytest.fixture(scope="module")
def robustness(tmp_path_factory):
    """ImageNet-R extracted, ImageNet-A as its .tar (with README.txt), ImageNet-Sketch as its .zip
    with a PNG named .JPEG, a grayscale JPEG and a file that is no image."""
    root = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(2)
    subset = [WNIDS[i] for i in (1, 4, 6, 300, 998)]
    r = {f"imagenet-r/{w}/art_{j}.jpg": _jpeg(rng) for w in subset for j in range(2)}
    _write(root, r)
    a = {f"imagenet-a/{w}/{j:04d}.jpg": _jpeg(rng) for w in subset[:3] for j in range(3)}
    _tar(root / "imagenet-a.tar", {**a, "imagenet-a/README.txt": b"ImageNet-A: 200 classes\n"})
    kinds = ["png", "gray", "garbage", "ok", "ok", "ok"]
    sketch = {
        f"sketch/{w}/sketch_{j}.JPEG": _jpeg(rng, kinds[(i + j) % 6])
        for i, w in enumerate(subset)
        for j in range(2)
    }
    with zipfile.ZipFile(root / "ImageNet-Sketch.zip", "w") as zf:
        for name, data in sketch.items():
            zf.writestr(name, data)
    out = root / "shards"
    pack("imagenet-r", root / "imagenet-r", out / "imagenet-r")
    pack("imagenet-a", root / "imagenet-a.tar", out / "imagenet-a")
    pack("imagenet-sketch", root / "ImageNet-Sketch.zip", out / "imagenet-sketch")
    return root, out, subset, r, a, sketch


def test_r_and_a_record_their_class_subset(robustness):
    root, out, subset, r, a, _ = robustness
    check_split(out / "imagenet-r" / "val", {str(root / k): k.split("/")[1] for k in r})
    archive = root / "imagenet-a.tar"
    check_split(out / "imagenet-a" / "val", {f"{archive}/{k}": k.split("/")[1] for k in a})
    m = manifest(out / "imagenet-r" / "val")
    assert m["classes"] == sorted(subset) and m["label_space"] == "imagenet-1k-subset"
    assert m["imagenet_indices"] == [1, 4, 6, 300, 998] == label_space(m).imagenet_indices
    assert manifest(out / "imagenet-a" / "val")["imagenet_indices"] == [1, 4, 6]
    assert (out / "imagenet-a" / "val" / "rejected.jsonl").read_text() == ""  # README.txt: noted only
    verify(out / "imagenet-r" / "val", out / "imagenet-a" / "val", against_source=False)  # sets differ: fine


def test_sketch_converts_non_rgb_and_reports_the_rest(robustness):
    root, out, _, _, _, sketch = robustness
    archive = root / "ImageNet-Sketch.zip"
    valid = {f"{archive}/{k}": k.split("/")[1] for k, v in sketch.items() if not v.startswith(b"\0")}
    samples = check_split(out / "imagenet-sketch" / "val", valid)
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB")
    # PNG data named .JPEG and grayscale JPEGs, told apart by PIL from the source bytes
    odd = {
        f"{archive}/{k}"
        for k, v in sketch.items()
        if v[:1] != b"\0" and (v.startswith(b"\x89PNG") or Image.open(io.BytesIO(v)).mode != "RGB")
    }
    assert {s["meta"]["source"] for s in samples if "converted" in s["meta"]} == odd and len(odd) == 3
    rejected = [
        json.loads(line)
        for line in (out / "imagenet-sketch" / "val" / "rejected.jsonl").read_text().splitlines()
    ]
    assert sorted(r["source"] for r in rejected) == sorted(
        f"{archive}/{k}" for k, v in sketch.items() if v.startswith(b"\0")
    )


@pytest.mark.parametrize("as_tars", [False, True], ids=["folders", "group-tars"])
def test_imagenet_c_one_split_per_corruption_and_severity(as_tars, tmp_path):
    """Extracted folders, or a folder of the published per-group archives (noise.tar, weather.tar)."""
    rng = np.random.default_rng(3)
    classes = [WNIDS[i] for i in (2, 3, 500)]
    tree = {}
    for corruption in ("gaussian_noise", "fog"):
        for severity in (1, 5):
            for w in classes:
                tree[f"{corruption}/{severity}/{w}/ILSVRC2012_val_{len(tree) + 1:08d}.JPEG"] = _jpeg(rng)
    src = tmp_path / "imagenet-c"
    where = {}
    if as_tars:
        src.mkdir()
        for group, corruption in (("noise", "gaussian_noise"), ("weather", "fog")):
            mine = {k: v for k, v in tree.items() if k.startswith(f"{corruption}/")}
            _tar(src / f"{group}.tar", mine)
            where |= {k: f"{src / group}.tar/{k}" for k in mine}
    else:
        _write(src, tree)
        where = {k: str(src / k) for k in tree}
    out = tmp_path / "shards"
    pack("imagenet-c", src, out)
    splits = sorted(p.name for p in out.iterdir())
    assert splits == ["fog-1", "fog-5", "gaussian_noise-1", "gaussian_noise-5"]
    for split in splits:
        corruption, severity = split.rsplit("-", 1)
        check_split(
            out / split,
            {where[k]: k.split("/")[2] for k in tree if k.startswith(f"{corruption}/{severity}/")},
        )
        m = manifest(out / split)
        group = {"fog": "weather"}.get(corruption, "noise")
        assert (m["corruption"], m["severity"], m["corruption_group"]) == (corruption, int(severity), group)
        assert m["classes"] == classes and m["imagenet_indices"] == [2, 3, 500]
    # Splits of one source must share their class list (verify compares them; other sets may differ)
    m = manifest(out / "fog-5")
    m["classes"] = m["classes"][::-1]
    (out / "fog-5" / "manifest.json").write_text(json.dumps(m))
    problems = verify_splits([str(out / "fog-1"), str(out / "fog-5")])
    assert any("class lists differ" in p for p in problems), problems


@pytest.mark.parametrize(
    "dataset, files, message",
    [
        ("imagenet-v2", {"imagenetv2-top-images-format-val/1000/a.jpeg": b"x"}, "class folders are 0..999"),
        ("imagenet-v2", {"my-v2/3/a.jpeg": b"x"}, "which ImageNet-V2 variant"),
        ("imagenet-r", {"imagenet-r/n01440765/a.jpg": b"x"}, "did you mean n01440764"),
        ("imagenet-c", {"gausian_noise/1/n01440764/a.JPEG": b"x"}, "did you mean gaussian_noise"),
    ],
)
def test_a_wrong_layout_is_one_line_naming_it(dataset, files, message, tmp_path, capsys):
    _write(tmp_path / "src", files)
    src = tmp_path / "src" / next(iter(files)).split("/")[0]
    assert make_shards.main([dataset, "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_v2_layout_copy_of_val_gets_the_labels_of_val(real_val, tmp_path):
    """The same images in ImageNet-V2's layout (folder = class index) and in ImageNet's (wnid folder)
    get the same wnid; a source holding both an archive and a tree is refused (the images twice)."""
    root, val, _, _ = real_val
    copy = {}
    for path in (root / "imagenet" / "val").rglob("*.JPEG"):
        copy[f"imagenetv2-threshold0.7-format-val/{WNIDS.index(path.parent.name)}/{path.name}"] = (
            path.read_bytes()
        )
    _write(tmp_path / "src", copy)
    pack("imagenet-v2", tmp_path / "src", tmp_path / "shards")
    as_val = {s["jpg"]: s["meta"]["wnid"] for s in read_webdataset(val)}
    as_v2 = {s["jpg"]: s["meta"]["wnid"] for s in read_webdataset(tmp_path / "shards" / "threshold-0.7")}
    assert as_v2 == as_val and len(as_val) == 20
    (tmp_path / "src" / "imagenetv2-top-images.tar.gz").write_bytes(b"")
    assert (
        make_shards.main(["imagenet-v2", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    )


def test_a_repair_keeps_the_real_labels(real_val, tmp_path, capsys):
    """Re-running the pack over a damaged shard rewrites the manifest; the ReaL side file still
    matches the rebuilt samples and is recorded again (verify then passes)."""
    root, val, _, _ = real_val
    out = tmp_path / "shards"
    shutil.copytree(val, out / "val")
    m = manifest(out / "val")
    (out / "val" / m["shards"][1]["file"]).write_bytes(b"damaged")
    pack("imagenet", root / "imagenet", out)
    said = capsys.readouterr().out
    assert "rebuilt" in said and "ReaL labels" in said and "still match" in said
    assert manifest(out / "val")["real_labels"] == m["real_labels"]
    assert read_real_labels(out / "val") == read_real_labels(val)
    verify(out / "val")
