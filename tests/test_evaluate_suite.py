"""predict.py --evaluate over a suite: real shards in each set's layout, packed by make_shards.py, scored
by a model whose predictions the test controls, against accuracies computed by hand.

The model reads each image's red level (the fixtures are plain colours) and scores class k by how close
it is to 20k + 10: an image painted at 20j + 10 + 4 is predicted j, then j+1, j-1, j+2, j-2 (its top-5).

python -m pytest tests/test_evaluate_suite.py -q
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import make_shards
import predict
from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ddp.evalsets import imagenet_wnids
from imagenet_ddp.evaluate import corruption_errors, evaluate_suite, find_splits
from imagenet_ddp.inference import Classifier
from tests.needs import needs
from tests.test_predict import make_checkpoint

INDICES = (1, 2, 10, 20, 100, 200, 300, 999)  # ImageNet class indices: "10" < "2" as strings
WNIDS = [imagenet_wnids()[i] for i in INDICES]  # the model's classes, k = 0..7
SIDE = 16


class Nearest(nn.Module):
    """Logits -|red - (20k + 10)| of each class k, red being the image's mean red level (0-255)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("codes", torch.arange(num_classes, dtype=torch.float32) * 20 + 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        red = images[:, 0].mean((1, 2)) * (IMAGENET_STD[0] * 255) + IMAGENET_MEAN[0] * 255
        return -(red[:, None] - self.codes).abs()


def paint(code: int, offset: int = 4) -> bytes:
    """A plain-colour JPEG the model predicts as `code` (offset +4: then code+1; -4: then code-1)."""
    out = io.BytesIO()
    Image.new("RGB", (SIDE + 4, SIDE), (20 * code + 10 + offset, 128, 96)).save(out, "JPEG", quality=95)
    return out.getvalue()


def write_tree(root: Path, samples, folder=lambda k: WNIDS[k], name=lambda i: f"img{i:03d}.JPEG") -> Path:
    """samples: (class k, predicted code, offset); files root/<folder(k)>/<name(i)>."""
    for i, (k, code, offset) in enumerate(samples, 1):
        path = root / folder(k) / name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(paint(code, offset))
    return root


def pack(dataset: str, src: Path, out: Path, *extra) -> None:
    argv = [dataset, "--src", src, "--out", out, "--workers", "1", "--shard-size", "4", *extra]
    assert make_shards.main([str(a) for a in argv]) == 0


# ImageNet val: (class, predicted, offset) for ILSVRC2012_val_00000001 ... 10. Top-1: images 1-7 right;
# top-5 adds image 9 (predicted 2: top-5 2, 3, 1, 4, 0). ReaL: images 2 and 8 have empty sets (left
# out); image 9's set {0, 2} holds its prediction; image 10's {1} does not: 7 of 8.
VAL = [
    (0, 0, 4),
    (1, 1, 4),
    (2, 2, 4),
    (3, 3, 4),
    (4, 4, 4),
    (5, 5, 4),
    (6, 6, 4),
    (7, 0, 4),
    (0, 2, 4),
    (1, 5, 4),
]
REAL = [[0], [], [2], [3], [4], [5], [6], [], [0, 2], [1]]
# ImageNet-R: 4 of the model's classes. Restricted to them, images 1, 2 and 3 are right (1 of 4 unrestricted).
R_CLASSES = (1, 2, 3, 5)
R = [(3, 4, -4), (5, 4, 4), (1, 1, 4), (2, 6, 4)]


# ImageNet-C, two corruptions x two severities, one image of each class: the first `wrong` are missed.
def _c_split(wrong: int) -> list[tuple[int, int, int]]:
    return [(k, (k + 3) % 8 if k < wrong else k, 4) for k in range(8)]


C = {
    ("fog", 1): _c_split(2),
    ("fog", 2): _c_split(4),
    ("contrast", 1): _c_split(0),
    ("contrast", 2): _c_split(1),
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict[str, Path]:
    """Each set in its published layout, packed by make_shards.py."""
    tmp = tmp_path_factory.mktemp("suite")
    src, out = tmp / "src", tmp / "shards"
    val = write_tree(src / "imagenet" / "val", VAL, name=lambda i: f"ILSVRC2012_val_{i:08d}.JPEG")
    write_tree(src / "imagenet" / "train", [(k, k, offset) for k in range(8) for offset in (-6, -2, 2, 6)])
    (src / "real.json").write_text(json.dumps([[INDICES[k] for k in labels] for labels in REAL]))
    pack("imagenet", val.parent, out / "imagenet", "--real-labels", src / "real.json")
    # The same images in ImageNet-V2's layout (folder = class index in sorted-wnid order) and Sketch's.
    write_tree(src / "imagenetv2-matched-frequency-format-val", VAL, folder=lambda k: str(INDICES[k]))
    pack("imagenet-v2", src / "imagenetv2-matched-frequency-format-val", out / "imagenet-v2")
    pack("imagenet-sketch", write_tree(src / "sketch", VAL), out / "imagenet-sketch")
    pack("imagenet-r", write_tree(src / "imagenet-r", R), out / "imagenet-r")
    pack("imagenet-a", write_tree(src / "imagenet-a", R), out / "imagenet-a")
    for (corruption, severity), samples in C.items():
        write_tree(src / "imagenet-c" / corruption / str(severity), samples)
    pack("imagenet-c", src / "imagenet-c", out / "imagenet-c")
    return {
        "src": src,
        "val": out / "imagenet" / "val",
        "v2": out / "imagenet-v2" / "matched-frequency",
        "sketch": out / "imagenet-sketch" / "val",
        "r": out / "imagenet-r" / "val",
        "a": out / "imagenet-a" / "val",
        "c": out / "imagenet-c",
    }


def _as_val(tree: Path, rename: dict[str, str]) -> Path:
    """`tree`'s class folders under <copy>/val/, renamed by `rename`."""
    copy = tree.with_name(tree.name + "-renamed")
    for folder in sorted(tree.iterdir()):
        shutil.copytree(folder, copy / "val" / rename[folder.name])
    return copy


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> Classifier:
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", classes=WNIDS, crop=SIDE, resize=SIDE)
    clf = Classifier.from_checkpoint(path, device="cpu", precision="fp32")
    clf.model = Nearest(len(WNIDS))
    return clf


def by_name(report: dict) -> dict[str, dict]:
    return {r["dataset"]: r for r in report["splits"]}


def test_each_set_is_scored_as_its_paper_scores_it(suite, clf):
    splits = find_splits([suite[k] for k in ("val", "v2", "sketch", "r", "a", "c")])
    c_splits = ["contrast-1", "contrast-2", "fog-1", "fog-2"]
    assert [s.name for s in splits[5:]] == c_splits  # a folder of splits: each of them
    report = evaluate_suite(clf, splits, batch_size=3, workers=2)  # 2 readers: order kept
    got = by_name(report)
    val = got["imagenet/val"]
    assert (val["images"], val["top1"], val["top5"]) == (10, 7 / 10, 8 / 10)
    assert (val["real_images"], val["real_top1"]) == (8, 7 / 8)
    for name in ("imagenet-v2/matched-frequency", "imagenet-sketch/val"):  # the same images
        assert (got[name]["images"], got[name]["top1"], got[name]["top5"]) == (10, 7 / 10, 8 / 10)
        assert "real_top1" not in got[name]
    for name in ("imagenet-r/val", "imagenet-a/val"):
        assert (got[name]["images"], got[name]["classes"], got[name]["top1"]) == (4, 4, 3 / 4)
    c = report["imagenet_c"]
    fog, contrast = (2 / 8 + 4 / 8) / 2 / 0.819324, (0 / 8 + 1 / 8) / 2 / 0.853204  # AlexNet's errors
    assert c["ce"] == pytest.approx({"fog": fog, "contrast": contrast})
    assert c["mce"] == pytest.approx((fog + contrast) / 2)
    assert (c["corruptions"], c["of"]) == (2, 15)


def test_restricting_the_logits_changes_the_answer(suite, clf, tmp_path):
    # Negative control: the same images in a set of all the model's classes are scored unrestricted.
    tree = write_tree(tmp_path / "full" / "val", R + [(k, k, 4) for k in range(8) if k not in R_CLASSES])
    pack("folder", tree.parent, tmp_path / "shards")
    [full] = evaluate_suite(clf, [tmp_path / "shards" / "val"], batch_size=4, workers=0)["splits"]
    assert full["classes"] == 8 and full["top1"] == (1 + 4) / 8  # R's images: only image 3 is right


def test_v2_folders_map_by_class_index_and_a_string_sort_does_not(suite, clf, tmp_path):
    report = evaluate_suite(clf, [suite["val"], suite["v2"]], batch_size=4, workers=0)
    val, v2 = report["splits"]
    assert (
        (v2["images"], v2["top1"], v2["top5"]) == (val["images"], val["top1"], val["top5"]) == (10, 0.7, 0.8)
    )
    # What a generic folder reader does with V2: folders sorted as strings ("10" < "100" < "2") taken
    # as the classes in order. Another answer.
    folders = sorted(str(i) for i in INDICES)
    v2_tree = suite["src"] / "imagenetv2-matched-frequency-format-val"
    pack("folder", _as_val(v2_tree, dict(zip(folders, WNIDS, strict=True))), tmp_path / "shards")
    [string_sorted] = evaluate_suite(clf, [tmp_path / "shards" / "val"], batch_size=4, workers=0)["splits"]
    assert string_sorted["top1"] != v2["top1"]


def test_a_model_of_fewer_classes_is_scored_on_the_images_of_its_classes(suite, tmp_path):
    known = [0, 2, 5, 7]  # a fine-tune on 4 of the 8 classes, its own class order
    path = make_checkpoint(tmp_path / "few.pt", classes=[WNIDS[k] for k in known], crop=SIDE, resize=SIDE)
    few = Classifier.from_checkpoint(path, device="cpu", precision="fp32")
    few.model = _Picked(Nearest(len(WNIDS)), known)
    [val] = evaluate_suite(few, [suite["val"]], batch_size=4, workers=0)["splits"]
    # Images of classes 0, 2, 5, 7: 1, 3, 6, 8, 9. Right: 1, 3, 6. (8 is predicted 0: now class 0 of 4.)
    assert (val["images"], val["split_images"], val["classes"], val["top1"]) == (5, 10, 4, 3 / 5)
    # ReaL over the same images: image 8 left out (empty set); 9 predicted 2, in {0, 2}: 4 of 4.
    assert (val["real_images"], val["real_top1"]) == (4, 4 / 4)


class _Picked(nn.Module):
    def __init__(self, model: nn.Module, classes: list[int]):
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, images):
        return self.model(images)[:, self.classes]


def test_the_cli_prints_one_table_and_writes_json_next_to_the_model(suite, onnx, tmp_path, capsys):
    suite_file = tmp_path / "suite.txt"
    suite_file.write_text(f"# the suite\n{suite['val']}\n\n{suite['r']}  # 200 classes\n{suite['c']}\n")
    argv = ["--model", str(onnx), "--suite", str(suite_file), "--batch-size", "3", "--workers", "0"]
    code = predict.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["dataset", "images", "top-1", "top-5", "ReaL", "top-1", "mCE"]
    assert lines[2].split()[:5] == ["imagenet/val", "10", "70.00%", "80.00%", "87.50%"]
    assert lines[4].startswith("imagenet-c: 4 splits (2 of 15 corruptions)")
    saved = json.loads(onnx.with_suffix(".eval.json").read_text())
    assert by_name(saved)["imagenet-r/val"]["top1"] == 3 / 4
    assert saved["imagenet_c"]["mce"] == pytest.approx(corruption_errors(saved["splits"])["mce"])


@pytest.fixture(scope="module")
def onnx(clf, tmp_path_factory) -> Path:
    """The controlled model exported by predict.py's exporter: a real ONNX file with its metadata."""
    needs("onnxscript")
    from imagenet_ddp.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(clf, path, {"checkpoint": "test"})
    return path


def test_torchrun_ranks_score_each_image_once(suite, onnx):
    # 10 images over 2 ranks in batches of 3: padded last batches, and each image's ReaL set found by
    # its position in the split.
    argv = ["--model", str(onnx), "--evaluate", str(suite["val"]), str(suite["r"]), "--batch-size", "3"]
    argv += ["--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(predict.__file__).parent)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, predict.__file__, *argv, "--format", "jsonl"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = {r["dataset"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert (got["imagenet/val"]["images"], got["imagenet/val"]["top1"]) == (10, 0.7)
    assert (got["imagenet/val"]["real_images"], got["imagenet/val"]["real_top1"]) == (8, 7 / 8)
    assert (got["imagenet-r/val"]["images"], got["imagenet-r/val"]["top1"]) == (4, 3 / 4)
    assert json.loads(onnx.with_suffix(".eval.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.needs("nvidia.dali"))])
def test_an_exported_model_scores_as_its_checkpoint_on_both_loaders(suite, clf, onnx, backend):
    from imagenet_ddp.export import OnnxClassifier

    splits = [suite["val"], suite["r"]]
    ours = evaluate_suite(clf, splits, batch_size=4, workers=0)["splits"]
    theirs = evaluate_suite(OnnxClassifier(onnx), splits, backend=backend, batch_size=4, workers=1)["splits"]
    keys = ("dataset", "images", "top1", "top5", "real_top1", "real_images")
    assert [[r.get(k) for k in keys] for r in theirs] == [[r.get(k) for k in keys] for r in ours]


def test_training_scores_the_extra_sets_and_runs_compare_shows_them(suite, tmp_path, capsys):
    import train_ddp
    from imagenet_ddp import runs
    from tests.test_train import read_metrics, small_run

    run_dir = tmp_path / "run"
    extra = f"data.extra_eval=[{suite['v2']},{suite['r']},{suite['c']}]"
    argv = small_run(suite["val"].parent, run_dir, "train.epochs=2", "data.extra_eval_every=2", extra)
    assert train_ddp.main([*argv, "data.eval_size=16"]) == 0
    first, last = read_metrics(run_dir)
    assert not any(k.startswith("eval/") for k in first)  # every 2 epochs, and after the last
    # A model trained on the classes: its V2-layout copy of val scores as val.
    assert last["eval/imagenet-v2/matched-frequency/top1"] == last["val_top1"]
    assert {"eval/imagenet-r/val/top1", "eval/imagenet-c/mce", "eval/imagenet-c/fog-2/top5"} < set(last)
    # Val's ReaL top-1 beside its top-1 at every epoch, as predict.py scores the saved model.
    [val] = evaluate_suite(Classifier.from_checkpoint(run_dir / "last.pt"), [suite["val"]], workers=0)[
        "splits"
    ]
    assert (val["top1"], val["real_top1"], val["real_images"]) == (
        last["val_top1"],
        last["val_real_top1"],
        last["val_real_count"],
    )
    assert first["val_real_count"] == 8
    capsys.readouterr()
    assert runs.main(["compare", str(run_dir), "--anchor", "timm-rn50-a3"]) == 0
    out = capsys.readouterr().out
    header, _, row, published = out.splitlines()
    assert "imagenet-v2/matched-frequency top-1" in header and "imagenet-c mCE" in header
    assert "final ReaL top-1" in header
    assert f"{last['eval/imagenet-c/mce']:.2%}" in row
    assert published.startswith("published top-1 of timm ResNet-50 A3") and "ReaL 84.48%" in published
