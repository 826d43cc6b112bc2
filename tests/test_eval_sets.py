"""make_shards.py on the evaluation sets' real layouts (ImageNet-V2, -R, -A, -Sketch, -C) and ReaL labels:
packed, verified, read back by webdataset and GNU tar, each label checked against the layout's own
definition (V2: folder = class index in sorted-wnid order; the others: wnid folders)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import make_shards
from imagenet_ddp.evalsets import imagenet_wnids, label_space, read_real_labels
from imagenet_ddp.synth import jpeg_bytes, synth_image
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
