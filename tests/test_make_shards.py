"""make_shards.py end to end on fixtures in every real layout: what goes in is what comes out."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import make_shards
from tests import fixtures
from tests.needs import needs
from tests.shard_reader import manifest, read_dali, read_webdataset

ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "imagenet-archives": ("imagenet", fixtures.make_imagenet_archives, {}),
    "imagenet-kaggle": ("imagenet", fixtures.make_imagenet_kaggle, {}),
    "imagenet-extracted": ("imagenet", fixtures.make_imagenet_extracted, {}),
    "tiny-imagenet-folder": ("tiny-imagenet", fixtures.make_tiny_imagenet, {}),
    "tiny-imagenet-zip": ("tiny-imagenet", fixtures.make_tiny_imagenet, {"as_zip": True}),
    "folder": ("folder", fixtures.make_folder, {}),
}


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "make_shards.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"make_shards.py {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def pack(dataset, src, out, *extra) -> None:
    assert (
        make_shards.main([dataset, "--src", str(src), "--out", str(out), "--workers", "1", *map(str, extra)])
        == 0
    )


def source_rel(fx, source: str) -> str:
    return os.path.relpath(source, fx.root)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_image_arrives_once_with_its_label(layout, tmp_path):
    dataset, make, kwargs = LAYOUTS[layout]
    fx = make(tmp_path / "src", **kwargs)
    out = tmp_path / "out"
    pack(dataset, fx.src, out, "--shard-size", 5)
    for split in ("train", "val"):
        m = manifest(out / split)
        assert m["classes"] == fx.wnids, "class index must be the sorted-wnid position"
        samples = read_webdataset(out / split)
        arrived = [source_rel(fx, s["meta"]["source"]) for s in samples]
        expected = {r["relpath"]: r for r in fx.expected(split)}
        assert sorted(arrived) == sorted(expected), "each valid source image exactly once"
        for s in samples:
            record = expected[source_rel(fx, s["meta"]["source"])]
            assert m["classes"][s["cls"]] == record["wnid"] == s["meta"]["wnid"]
            img = Image.open(io.BytesIO(s["jpg"]))
            assert (img.format, img.mode) == ("JPEG", "RGB") and not img.info.get("progressive")
            if record["kind"] != "ok":
                assert "converted" in s["meta"], record
        assert len({s["key"] for s in samples}) == len(samples) and all("." not in s["key"] for s in samples)
        assert m["num_samples"] == len(samples) == sum(sh["num_samples"] for sh in m["shards"])
        rejected = [json.loads(line) for line in (out / split / "rejected.jsonl").read_text().splitlines()]
        assert sorted(source_rel(fx, r["source"]) for r in rejected) == sorted(
            r["relpath"] for r in fx.rejected(split)
        )
        assert all(r["reason"] for r in rejected)
        assert manifest(out / split)["num_rejected"] == len(rejected)
    assert manifest(out / "train")["classes"] == manifest(out / "val")["classes"]


@pytest.mark.needs("nvidia.dali")
@pytest.mark.parametrize("layout", ["imagenet-archives", "tiny-imagenet-zip"])
def test_dali_reads_every_sample(layout, tmp_path):
    dataset, make, kwargs = LAYOUTS[layout]
    fx = make(tmp_path / "src", **kwargs)
    pack(dataset, fx.src, tmp_path / "out", "--shard-size", 4)
    for split in ("train", "val"):
        got = read_dali(tmp_path / "out" / split)
        expected = {r["relpath"]: fx.wnids.index(r["wnid"]) for r in fx.expected(split)}
        assert {source_rel(fx, src): label for src, label, _ in got} == expected
        assert len(got) == len(expected) and all(shape[2] == 3 for _, _, shape in got)


def test_shards_are_gnu_tar_with_dali_indexes_equal_to_wds2idx(tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", per_class=8)
    pack("folder", fx.src, tmp_path / "out", "--shard-size", 6)
    wds2idx = needs("wds2idx")  # webdataset's own index writer: the reference for ours
    for shard in manifest(tmp_path / "out" / "train")["shards"]:
        tar = tmp_path / "out" / "train" / shard["file"]
        listing = subprocess.run(
            ["tar", "tf", str(tar)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(listing) == 3 * shard["num_samples"]
        assert {name.split(".", 1)[1] for name in listing} == {"jpg", "cls", "json"}
        subprocess.run([wds2idx, str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "ref.idx").read_text() == (tar.parent / shard["index"]).read_text()


def test_shards_are_class_mixed_and_seeded(tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", num_classes=4, per_class=10, bad=False)
    pack("folder", fx.src, tmp_path / "a", "--shard-size", 8)
    pack("folder", fx.src, tmp_path / "b", "--shard-size", 8, "--seed", 1)
    first = [s["cls"] for s in read_webdataset(tmp_path / "a" / "train")][:8]
    assert len(set(first)) > 1, "the first shard holds several classes"
    keys_a = [s["key"] for s in read_webdataset(tmp_path / "a" / "train")]
    keys_b = [s["key"] for s in read_webdataset(tmp_path / "b" / "train")]
    assert sorted(keys_a) == sorted(keys_b) and keys_a != keys_b


def test_max_side_and_shard_bytes(tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", per_class=8, bad=False, side_range=(80, 160))
    pack("folder", fx.src, tmp_path / "out", "--max-side", 48, "--quality", 80, "--shard-bytes", "20K")
    m = manifest(tmp_path / "out" / "train")
    assert m["options"]["max_side"] == 48 and m["options"]["quality"] == 80
    assert len(m["shards"]) > 1
    for s in read_webdataset(tmp_path / "out" / "train"):
        assert max(Image.open(io.BytesIO(s["jpg"])).size) <= 48


def test_pack_only_mode_keeps_bytes_and_rejects_truncated(tmp_path):
    fx = fixtures.make_imagenet_extracted(tmp_path / "src")
    pack("imagenet", fx.src, tmp_path / "out", "--check", "header")
    samples = read_webdataset(tmp_path / "out" / "train")
    assert sorted(source_rel(fx, s["meta"]["source"]) for s in samples) == sorted(
        r["relpath"] for r in fx.expected("train")
    )
    for s in samples:
        if "converted" not in s["meta"]:
            assert s["jpg"] == Path(s["meta"]["source"]).read_bytes()
    assert run_cli("verify", tmp_path / "out" / "train").returncode == 0


def _kill_after_parts(args, out: Path, parts_done: int) -> bool:
    """Start make_shards, SIGKILL it once `parts_done` shards are finished; False if it ended first."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "make_shards.py"), *map(str, args), "--out", str(out)]
    )
    parts = out / "train" / ".parts"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("train-*.json"))) >= parts_done:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return proc.wait() == -signal.SIGKILL


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_run_rerun_gives_identical_shards_nothing_lost_nothing_twice(workers, tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", num_classes=4, per_class=60, val_per_class=2)
    args = ["folder", "--src", fx.src, "--shard-size", 3, "--workers", workers, "--splits", "train"]
    run_cli(*args, "--out", tmp_path / "ref")
    num_shards = len(manifest(tmp_path / "ref" / "train")["shards"])
    out = tmp_path / "out"
    rng = random.Random(workers)
    kills = 0
    for _ in range(2):  # killed twice at random points, the second time while resuming
        kills += _kill_after_parts(args, out, rng.randrange(1, num_shards - 2))
    assert kills >= 1, "at least one run should have been killed mid-way"
    assert not (out / "train" / "manifest.json").exists()
    resumed = run_cli(*args, "--out", out)
    assert "images" in resumed.stdout
    ref_files = sorted(p.name for p in (tmp_path / "ref" / "train").iterdir())
    assert sorted(p.name for p in (out / "train").iterdir()) == ref_files
    for name in ref_files:
        assert (out / "train" / name).read_bytes() == (tmp_path / "ref" / "train" / name).read_bytes(), name
    proc = run_cli("verify", out / "train", "--against-source")
    assert proc.stdout.strip().endswith(f"verify: OK {out / 'train'}")
    again = run_cli(*args, "--out", out)
    assert "already complete" in again.stdout


def test_verify_against_source_finds_lost_duplicated_and_foreign_samples(tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", per_class=4, val_per_class=1)
    out = tmp_path / "out"
    pack("folder", fx.src, out, "--shard-size", 5)
    assert run_cli("verify", out / "train", "--against-source").returncode == 0
    new = fx.src / "train" / fx.wnids[0] / "late_addition.jpg"
    new.write_bytes(fixtures.Fixture.read_bytes(fx, fx.expected("train")[0]))
    rejected = out / "train" / "rejected.jsonl"
    lines = rejected.read_text().splitlines()
    rejected.write_text("\n".join([lines[0], lines[0], json.dumps({"source": "/elsewhere/x.jpg"})]) + "\n")
    proc = run_cli("verify", out / "train", "--against-source", check=False)
    assert proc.returncode == 1
    text = proc.stdout
    assert f"neither packed nor rejected: {new}" in text
    assert "more than once: " + json.loads(lines[0])["source"] in text
    assert "not in the source: /elsewhere/x.jpg" in text
    assert all(json.loads(line)["source"] in text for line in lines[1:]), "dropped rejections are lost files"


def test_verify_names_every_problem(tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", per_class=6, bad=False)
    out = tmp_path / "out"
    pack("folder", fx.src, out, "--shard-size", 5)
    assert run_cli("verify", out / "train", out / "val").returncode == 0
    shards = manifest(out / "train")["shards"]
    t0, t1, t2, t3 = (out / "train" / s["file"] for s in shards[:4])
    t0.write_bytes(t0.read_bytes()[: t0.stat().st_size // 2])  # truncated
    data = bytearray(t1.read_bytes())
    data[600] ^= 0xFF  # a flipped byte inside the first JPEG
    t1.write_bytes(bytes(data))
    idx = out / "train" / shards[2]["index"]
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    t3.unlink()
    shutil.copy(t2, out / "train" / "stray.tar")
    proc = run_cli("verify", out / "train", check=False)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    for name, what in [
        (t0.name, "truncated"),
        (t1.name, "sha256"),
        (shards[2]["index"], "index"),
        (t3.name, "missing"),
        ("stray.tar", "not listed"),
    ]:
        assert any(name in line and what in line for line in lines), (name, what, lines)


def test_bad_arguments_are_one_line_errors(tmp_path):
    fx = fixtures.make_folder(tmp_path / "src", bad=False)
    cases = [
        ("imagenet", "--src", tmp_path / "nope", "--out", tmp_path / "o1"),  # missing source
        ("imagenet", "--src", tmp_path, "--out", tmp_path / "o2"),  # no known layout
        ("tiny-imagenet", "--src", fx.src, "--out", tmp_path / "o3"),  # not Tiny ImageNet
        ("folder", "--src", fx.src, "--out", tmp_path / "o4", "--splits", "test"),  # no such split
    ]
    for args in cases:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("make_shards.py: error:")
    # An output folder that holds another dataset is refused, not overwritten.
    other = fixtures.make_tiny_imagenet(tmp_path / "tiny", bad=False)
    run_cli("tiny-imagenet", "--src", other.src, "--out", tmp_path / "o5", "--workers", 1)
    before = manifest(tmp_path / "o5" / "train")
    proc = run_cli("folder", "--src", fx.src, "--out", tmp_path / "o5", check=False)
    assert (
        proc.returncode == 2 and "tiny-imagenet" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    assert manifest(tmp_path / "o5" / "train") == before
    proc = run_cli("tiny-imagenet", "--src", other.src, "--out", tmp_path / "o5", "--seed", 3, check=False)
    assert proc.returncode == 2 and "options" in proc.stderr


def test_parallel_workers_give_the_same_shards(tmp_path):
    fx = fixtures.make_tiny_imagenet(tmp_path / "src")
    run_cli("tiny-imagenet", "--src", fx.src, "--out", tmp_path / "one", "--shard-size", 4, "--workers", 1)
    proc = run_cli(
        "tiny-imagenet", "--src", fx.src, "--out", tmp_path / "two", "--shard-size", 4, "--workers", 2
    )
    assert "rejected" in proc.stdout and "img/s" in proc.stdout
    for split in ("train", "val"):
        a, b = manifest(tmp_path / "one" / split), manifest(tmp_path / "two" / split)
        assert a["shards"] == b["shards"]
