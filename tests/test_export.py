"""predict.py --export model.onnx, and predict.py --model model.onnx on onnxruntime: the same answers as
the checkpoint on every kind of image people have, the same per-file errors, one-line refusals.

python -m pytest tests/test_export.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

import predict
from imagenet_ddp import checkpoint as ck
from imagenet_ddp.export import METADATA_KEY
from imagenet_ddp.labels import available_languages, imagenet_names
from tests.test_predict import WNIDS, good_images, make_checkpoint, records, run


def confident_checkpoint(path: Path) -> Path:
    """An untrained model's answers are near-uniform (top-1 a coin toss between runtimes): a larger
    classifier makes them confident, as a trained model's are."""
    make_checkpoint(path)
    ckpt = ck.load(path)
    ckpt["model"]["fc.weight"] *= 300
    ck.save_atomic(ckpt, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("export")
    ckpt = confident_checkpoint(folder / "best.pt")
    assert predict.main(["--checkpoint", str(ckpt), "--export", str(folder / "model.onnx")]) == 0
    return ckpt, folder / "model.onnx"


def test_the_onnx_file_carries_preprocessing_classes_and_names_in_every_language(exported):
    ckpt_path, model_path = exported
    ckpt = ck.load(ckpt_path)
    model = onnx.load(model_path)
    onnx.checker.check_model(model)
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    assert meta["format"] == "imagenet-ddp-onnx/1" and meta["architecture"] == ckpt["architecture"]
    assert meta["preprocess"] == ckpt["preprocess"] and meta["classes"] == list(WNIDS)
    assert set(meta["names"]) == set(available_languages())
    assert meta["names"]["es"] == [imagenet_names("es")[w] for w in WNIDS]
    assert meta["source"]["checkpoint"] == str(ckpt_path) and len(meta["source"]["sha256"]) == 64
    [images] = model.graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_onnxruntime_answers_as_torch_on_every_kind_of_image(exported, tmp_path, capsys):
    ckpt_path, model_path = exported
    files = [str(p) for p in good_images(tmp_path / "in").values()]
    code, out, err = run(capsys, "--checkpoint", ckpt_path, *files, "--format", "jsonl", "--device", "cpu")
    assert code == 0, err
    torch_top = records(out)
    code, out, err = run(capsys, "--model", model_path, *files, "--format", "jsonl")
    assert code == 0, err
    onnx_top = records(out)
    assert list(onnx_top) == files
    for path in files:
        a, b = torch_top[path]["top"], onnx_top[path]["top"]
        assert a[0]["wnid"] == b[0]["wnid"], path
        assert max(abs(x["probability"] - y["probability"]) for x, y in zip(a, b, strict=True)) < 1e-3, path
        assert a[0]["probability"] - a[1]["probability"] > 2e-3, "a top-1 that a rounding could flip"


def test_bad_files_get_the_same_per_file_errors_and_a_non_zero_exit(exported, tmp_path, capsys):
    _, model_path = exported
    (tmp_path / "notes.jpg").write_bytes(b"not an image\n")
    good = good_images(tmp_path / "good")["photo.jpg"]
    code, out, err = run(
        capsys,
        "--model",
        model_path,
        tmp_path / "notes.jpg",
        good,
        tmp_path / "missing.jpg",
        "--format",
        "jsonl",
    )
    assert code == 1 and err.strip() == "predict.py: 2 of 3 files could not be classified"
    got = records(out)
    assert got[str(tmp_path / "notes.jpg")]["error"] == "not an image (unrecognized format)"
    assert got[str(tmp_path / "missing.jpg")]["error"] == "no such file"
    assert len(got[str(good)]["top"]) == 5


def test_a_file_that_is_not_an_export_and_modes_that_need_a_checkpoint_are_refused(
    exported, tmp_path, capsys
):
    ckpt_path, model_path = exported
    code, _, err = run(capsys, "--model", ckpt_path, "x.jpg")
    assert code == 2 and err.startswith(
        f"predict.py: error: --model {ckpt_path}: onnxruntime cannot load it ("
    )
    assert err.count("\n") == 1
    plain = onnx.load(model_path)
    del plain.metadata_props[:]
    onnx.save_model(plain, tmp_path / "plain.onnx")
    code, _, err = run(capsys, "--model", tmp_path / "plain.onnx", "x.jpg")
    assert code == 2 and "not a model exported by predict.py --export" in err
    with pytest.raises(SystemExit) as usage:
        predict.main(["--model", str(model_path), "--ema", "x.jpg"])
    assert usage.value.code == 2 and "--export and --ema need --checkpoint" in capsys.readouterr().err


def test_the_exported_graph_takes_any_batch_size(exported):
    import onnxruntime

    _, model_path = exported
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8).numpy()
        assert session.run(["logits"], {"images": images})[0].shape == (n, len(WNIDS))


def test_the_predict_benchmark_runs_both_runtimes_on_one_folder():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "imagenet_ddp.bench", "predict", "--images", "4", "--model", "resnet18"]
    out = subprocess.run(
        [*cmd, "--repeats", "1", "--batch-size", "3"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(record["img_per_s"]) == {"torch", "onnxruntime"} and min(record["img_per_s"].values()) > 0
    assert record["top1_agreement"] == 1.0
