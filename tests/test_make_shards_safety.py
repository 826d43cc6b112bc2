"""make_shards.py never loses a source image without a word and a re-run repairs: unreadable files and
folders are rejected with the reason (a whole class lost is a one-line failure), verify
--against-source counts them, and missing or damaged shards are rebuilt to a clean run's bytes.

python -m pytest tests/test_make_shards_safety.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

import make_shards
from tests.fixtures import make_folder
from tests.test_run_folder import unprivileged


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = make_shards.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_folder(root, num_classes=3, per_class=8, val_per_class=3, side_range=(32, 48))  # some bad images
    return root


def test_a_rerun_rebuilds_missing_and_damaged_shards_to_a_clean_runs_bytes(source, tmp_path):
    command = ["folder", "--src", source, "--out", tmp_path / "out", "--shard-size", "4", "--workers", "1"]
    assert run(*command)[0] == 0
    clean = tree(tmp_path / "out")
    train = tmp_path / "out" / "train"
    tars = sorted(train.glob("*.tar"))
    assert len(tars) >= 5 and (train / "rejected.jsonl").read_text()  # rejections must survive a repair
    tars[0].unlink()  # deleted
    with open(tars[1], "r+b") as f:  # truncated
        f.truncate(1024)
    with open(tars[2], "r+b") as f:  # one byte flipped: same size, another sha256
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    tars[3].with_suffix(".idx").unlink()  # its index lost
    code, out, err = run(*command)
    assert code == 0, err
    assert "train: 4 shard(s) were missing or damaged and are rebuilt" in out, out
    assert "val: already complete" in out
    assert tree(tmp_path / "out") == clean
    code, out, _ = run("verify", train, tmp_path / "out" / "val", "--against-source")
    assert code == 0 and "verify: OK" in out
    # Nothing damaged: the same command does nothing.
    code, out, _ = run(*command)
    assert code == 0 and out.count("already complete") == 2 and tree(tmp_path / "out") == clean
    # A manifest whose shard list is damaged: every shard is checked by being written again.
    manifest = json.loads((train / "manifest.json").read_text())
    (train / "manifest.json").write_text(json.dumps({**manifest, "shards": "lost"}))
    code, out, err = run(*command)
    assert code == 0 and "were missing or damaged and are rebuilt" in out, err
    assert tree(tmp_path / "out") == clean


def test_out_and_src_apart(source, tmp_path):
    before = tree(source)
    for out, message in [
        (source, "is the source itself"),
        (source / "train" / "dog", "is inside --src"),
        (source.parent, "is inside --out"),
    ]:
        code, stdout, err = run("folder", "--src", source, "--out", out, "--workers", "1")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert tree(source) == before


@pytest.fixture
def copy(source, tmp_path) -> Path:
    shutil.copytree(source, tmp_path / "src")
    sub = tmp_path / "src" / "train" / "dog" / "more"
    sub.mkdir()
    shutil.copy(tmp_path / "src" / "train" / "dog" / "img.001.jpg", sub / "x.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o777)
    return tmp_path / "src"


def test_unreadable_files_and_folders_are_rejected_with_the_reason_and_counted(copy, tmp_path):
    unreadable_file = copy / "train" / "cat" / "img.001.jpg"
    unreadable_dir = copy / "train" / "dog" / "more"
    unreadable_file.chmod(0)
    unreadable_dir.chmod(0)
    try:
        with unprivileged(copy):
            code, out, err = run("folder", "--src", copy, "--out", tmp_path / "out", "--workers", "1")
            assert code == 0, err
            rejected = {
                r["source"]: r["reason"]
                for r in map(
                    json.loads, (tmp_path / "out" / "train" / "rejected.jsonl").read_text().splitlines()
                )
            }
            assert rejected[str(unreadable_file)] == "cannot read it: Permission denied"
            assert rejected[str(unreadable_dir)] == "cannot list this folder: Permission denied"
            split = tmp_path / "out" / "train"
            code, out, _ = run("verify", split, "--against-source")
            assert code == 0 and "verify: OK" in out, out
    finally:
        unreadable_file.chmod(0o644)
        unreadable_dir.chmod(0o755)
    # Readable again, the folder's file is one the shards do not account for: verify counts it.
    code, out, _ = run("verify", tmp_path / "out" / "train", "--against-source")
    assert code == 1 and f"neither packed nor rejected: {unreadable_dir / 'x.jpg'}" in out, out


def test_a_whole_class_that_cannot_be_read_is_a_one_line_failure(copy, tmp_path):
    cat = copy / "train" / "cat"
    cat.chmod(0)
    try:
        with unprivileged(copy):
            code, out, err = run("folder", "--src", copy, "--out", tmp_path / "out", "--workers", "1")
    finally:
        cat.chmod(0o755)
    assert code == 2 and err.count("\n") == 1 and f"cannot read {cat}: Permission denied" in err, err
    files = sorted(cat.iterdir())
    for f in files:
        f.chmod(0)
    try:
        with unprivileged(copy):
            code, out, err = run("folder", "--src", copy, "--out", tmp_path / "out", "--workers", "1")
    finally:
        for f in files:
            f.chmod(0o644)
    assert code == 2 and err.count("\n") == 1, err
    assert f"none of the {len(files)} files of class cat can be read" in err
    # Fixed, the same command finishes the job and reads the class.
    code, out, err = run("folder", "--src", copy, "--out", tmp_path / "out", "--workers", "1")
    assert code == 0, err
    rejected = (tmp_path / "out" / "train" / "rejected.jsonl").read_text()
    assert "cannot read" not in rejected
