"""Bad input, as a careless or unlucky user types it, across every command line: each case exits with
the documented status, says in one line what is wrong, and leaves every existing file as it was.

python -m pytest tests/test_bad_input.py -q

The table calls each CLI's main() in this process (a subprocess only where the entry point itself is
under test); the files every case may touch live in one small world built once per module, hashed
before and after each case.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import pytest

import make_shards
import predict
import train_ddp
from imagenet_ddp import runs
from tests.fixtures import make_folder
from tests.test_predict import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLIS = {
    "train": (train_ddp.main, "train_ddp.py"),
    "predict": (predict.main, "predict.py"),
    "shards": (make_shards.main, "make_shards.py"),
    "runs": (runs.main, "python -m imagenet_ddp.runs"),
}


def call(cli: str, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    main = CLIS[cli][0]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder below root -> sha256 of its bytes ('dir' for a folder)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                seen[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except PermissionError:
                seen[os.path.relpath(path, root)] = "unreadable"
    return seen


def assert_one_line(code: int, err: str, expected_code: int, message: str, prefix: str) -> None:
    assert code == expected_code, f"exit {code}, stderr: {err}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert err.startswith(prefix), err
    assert "Traceback" not in err
    assert message in err, f"{message!r} not in {err!r}"


# ------------------------------------------------------------------------------------------ the world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    make_checkpoint(w / "best.pt")
    make_folder(w / "src", num_classes=2, per_class=3, val_per_class=2, bad=False, side_range=(32, 48))
    code, _, err = call("shards", ["folder", "--src", w / "src", "--out", w / "shards", "--workers", 1])
    assert code == 0, err
    (w / "photo.jpg").write_bytes((w / "src" / "train" / "dog" / "img.001.jpg").read_bytes())
    (w / "notes.txt").write_text("a user's notes, not a model\n")
    (w / "afile").write_text("a file where a folder is expected\n")
    (w / "recipe.yaml").write_text("train:\n  epochs: 1\n")
    return w


# (id, cli, argv with {w} for the world folder, exit status, words the one line must hold)
CASES = [
    # predict.py --export: outputs never over inputs
    (
        "export-over-own-checkpoint",
        "predict",
        "--checkpoint {w}/best.pt --export {w}/best.pt",
        2,
        "is the checkpoint it reads",
    ),
    ("export-over-notes", "predict", "--checkpoint {w}/best.pt --export {w}/notes.txt", 2, "add --force"),
    (
        "export-over-photo",
        "predict",
        "--checkpoint {w}/best.pt --export {w}/photo.jpg",
        2,
        "not an ONNX file",
    ),
    ("export-into-folder", "predict", "--checkpoint {w}/best.pt --export {w}/src", 2, "is a folder"),
    (
        "export-missing-parent",
        "predict",
        "--checkpoint {w}/best.pt --export {w}/nope/m.onnx",
        2,
        "does not exist",
    ),
    (
        "export-force-own-checkpoint",
        "predict",
        "--checkpoint {w}/best.pt --export {w}/best.pt --force",
        2,
        "is the checkpoint",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    _, cli, argv, expected_code, message = case
    before = snapshot(world)
    code, out, err = call(cli, argv.format(w=world).split())
    assert_one_line(code, err, expected_code, message, f"{CLIS[cli][1]}")
    assert snapshot(world) == before


def test_export_replaces_its_own_onnx_and_with_force_another_file(world, tmp_path):
    model = tmp_path / "model.onnx"
    assert call("predict", ["--checkpoint", world / "best.pt", "--export", model])[0] == 0
    assert call("predict", ["--checkpoint", world / "best.pt", "--export", model])[0] == 0  # ours: replaced
    other = tmp_path / "other.bin"
    other.write_bytes(b"someone's data")
    assert call("predict", ["--checkpoint", world / "best.pt", "--export", other])[0] == 2
    assert other.read_bytes() == b"someone's data"
    assert call("predict", ["--checkpoint", world / "best.pt", "--export", other, "--force"])[0] == 0
    assert other.read_bytes() != b"someone's data"
