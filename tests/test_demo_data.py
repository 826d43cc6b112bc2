"""The demo's dataset: real digits from scikit-learn, split without overlap, packable as it is."""

from __future__ import annotations

import hashlib

import make_shards
from imagenet_ddp.demo_data import write_digits
from tests.shard_reader import manifest


def test_digits_are_written_in_the_folder_layout_with_disjoint_splits(tmp_path):
    counts = write_digits(tmp_path / "digits")
    assert counts == {"train": 1418, "val": 359, "test": 20}  # all 1797 of scikit-learn's digits
    by_split = {s: sorted((tmp_path / "digits" / s).glob("*/*.jpg")) for s in counts}
    names = {s: {p.name for p in paths} for s, paths in by_split.items()}
    assert not (names["train"] & names["val"]) and not (names["test"] & (names["train"] | names["val"]))
    assert {p.parent.name for p in by_split["val"]} == {str(d) for d in range(10)}
    again = write_digits(tmp_path / "again")
    assert again == counts
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in by_split["train"])).hexdigest()
    redo = sorted((tmp_path / "again" / "train").glob("*/*.jpg"))
    assert hashlib.sha256(b"".join(p.read_bytes() for p in redo)).hexdigest() == digest, "deterministic"
    out = tmp_path / "shards"
    assert (
        make_shards.main(["folder", "--src", str(tmp_path / "digits"), "--out", str(out), "--workers", "1"])
        == 0
    )
    assert manifest(out / "train")["num_samples"] == 1418 and manifest(out / "val")["num_rejected"] == 0
    assert manifest(out / "train")["classes"] == [str(d) for d in range(10)]
