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
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import make_shards
import predict
import train_ddp
from imagenet_ddp import runs
from imagenet_ddp.config import dump_yaml, load_config
from imagenet_ddp.export import check_export_target
from tests.fixtures import make_folder
from tests.test_predict import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLIS = {
    "train": (train_ddp.main, "train_ddp.py"),
    "predict": (predict.main, "predict.py"),
    "shards": (make_shards.main, "make_shards.py"),
    "runs": (runs.main, ("runs:", "python -m imagenet_ddp.runs")),
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
    """What a user has on disk: a checkpoint, a source tree, its shards, runs, and files of the wrong
    kind. Every case runs against it; none may change it."""
    w = tmp_path_factory.mktemp("world")
    make_checkpoint(w / "best.pt")
    make_folder(w / "src", num_classes=2, per_class=3, val_per_class=2, bad=False, side_range=(32, 48))
    code, _, err = call("shards", ["folder", "--src", w / "src", "--out", w / "shards", "--workers", 1])
    assert code == 0, err
    (w / "photo.jpg").write_bytes((w / "src" / "train" / "dog" / "img.001.jpg").read_bytes())
    (w / "notes.txt").write_text("a user's notes, not a model\n")
    (w / "afile").write_text("a file where a folder is expected\n")
    (w / "list.yaml").write_text("- train\n- epochs\n")
    (w / "twice.yaml").write_text("train:\n  epochs: 1\n  epochs: 2\n")
    (w / "typo.yaml").write_text("train:\n  epoch: 1\n")
    (w / "broken.yaml").write_text("train: [epochs: 1\n")
    (w / "damaged.pt").write_bytes((w / "best.pt").read_bytes()[:5000])
    (w / "empty.pt").write_bytes(b"")
    shutil.copytree(w / "shards", w / "badshards")
    (w / "badshards" / "train" / "manifest.json").write_text("{not json")
    for name, text in [
        ("listshards", "[]"),
        ("nullshards", "null"),
        ("fieldshards", '{"shards": [{"file": "x"}], "classes": []}'),
    ]:
        shutil.copytree(w / "shards", w / name)
        (w / name / "train" / "manifest.json").write_text(text)
    shutil.copytree(w / "shards", w / "cutshards")
    tar = sorted((w / "cutshards" / "train").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:700])
    (w / "emptydir").mkdir()
    for name, lines in [
        (
            "run_null",
            ['{"epoch": 1, "step": 2, "val_top1": 0.5}', '{"epoch": 2, "step": 4, "val_top1": null}'],
        ),
        ("run_ok", ['{"epoch": 1, "step": 2, "val_top1": 0.5}']),
        ("run_stray", ['{"epoch": 1, "step": 2, "val_top1": 0.5}', '{"epoch": 2, "step": 4\xff}']),
    ]:
        run = w / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(dump_yaml(load_config(None, ["train.epochs=2"])))
        (run / "metrics.jsonl").write_bytes("".join(line + "\n" for line in lines).encode("latin-1"))
        (run / "status.json").write_text('{"state": "finished", "hours": 0.1}\n')
    (w / "runs" / "run_badstatus").mkdir()
    shutil.copy(w / "runs" / "run_ok" / "config.yaml", w / "runs" / "run_badstatus")
    (w / "runs" / "run_badstatus" / "status.json").write_text("[1, 2]\n")
    (w / "runs" / "run_binconfig").mkdir()
    (w / "runs" / "run_binconfig" / "config.yaml").write_bytes(bytes(range(128, 256)))
    return w


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Where a refused training run may leave its (empty) run folder: not part of the world."""
    return tmp_path_factory.mktemp("scratch")


TRAIN = (
    "data.root={w}/shards data.backend=torch data.workers=0 model.name=resnet18 train.precision=fp32 "
    "train.batch_size=2 logging.wandb=false run.dir={x}/run "
)
CKPT = "--checkpoint {w}/best.pt "
SRC = "folder --src {w}/src --out {x}/out "

# (id, cli, argv ({w}: the world, {x}: scratch), exit status, words the one line must hold)
# fmt: off
CASES = [
    # train_ddp.py: every number finite and in range, checked before anything is read or written
    ("lr-inf", "train", TRAIN + "optim.lr=inf", 2, "optim.lr=inf: every number must be finite"),
    ("lr-nan", "train", TRAIN + "optim.lr=nan", 2, "optim.lr=nan"),
    ("lr-negative", "train", TRAIN + "optim.lr=-0.1", 2, "optim.lr must be > 0"),
    ("lr-zero", "train", TRAIN + "optim.lr=0", 2, "optim.lr must be > 0"),
    ("lr-word", "train", TRAIN + "optim.lr=fast", 2, "optim.lr: expected a number"),
    ("lr-empty", "train", TRAIN + "optim.lr=", 2, "optim.lr: expected a number"),
    ("lr-overflows-when-scaled", "train", TRAIN + "optim.lr=1e308 optim.ref_batch_size=1", 2, "lower optim.lr"),
    ("momentum-negative", "train", TRAIN + "optim.momentum=-1", 2, "optim.momentum must be in [0, 1)"),
    ("momentum-one", "train", TRAIN + "optim.momentum=1", 2, "optim.momentum must be in [0, 1)"),
    ("momentum-nan", "train", TRAIN + "optim.momentum=nan", 2, "optim.momentum=nan"),
    ("wd-negative", "train", TRAIN + "optim.weight_decay=-1e-4", 2, "optim.weight_decay must be >= 0"),
    ("wd-nan", "train", TRAIN + "optim.weight_decay=nan", 2, "optim.weight_decay=nan"),
    ("wd-inf", "train", TRAIN + "optim.weight_decay=inf", 2, "optim.weight_decay=inf"),
    ("warmup-negative", "train", TRAIN + "optim.warmup_epochs=-1", 2, "optim.warmup_epochs must be in [0, 100000]"),
    ("warmup-inf", "train", TRAIN + "optim.warmup_epochs=inf", 2, "optim.warmup_epochs=inf"),
    ("betas-nan", "train", TRAIN + "optim.betas=[0.9,.nan]", 2, "optim.betas="),
    ("betas-one", "train", TRAIN + "optim.betas=[0.9]", 2, "optim.betas must be two numbers"),
    ("betas-word", "train", TRAIN + "optim.betas=high", 2, "optim.betas: expected a list"),
    ("eps-zero", "train", TRAIN + "optim.eps=0", 2, "optim.eps must be > 0"),
    ("step-gamma-zero", "train", TRAIN + "optim.step_gamma=0", 2, "optim.step_gamma in (0, 1]"),
    ("min-lr-factor-2", "train", TRAIN + "optim.min_lr_factor=2", 2, "optim.min_lr_factor"),
    ("ref-batch-negative", "train", TRAIN + "optim.ref_batch_size=-1", 2, "optim.ref_batch_size must be >= 0"),
    ("optimizer-unknown", "train", TRAIN + "optim.name=adamx", 2, "optim.name: 'adamx' is not one of"),
    ("schedule-typo", "train", TRAIN + "optim.schedule=cosin", 2, "did you mean 'cosine'"),
    ("warmup-huge", "train", TRAIN + "optim.warmup_epochs=1e308", 2, "optim.warmup_epochs must be in [0, 100000]"),
    ("epochs-huge", "train", TRAIN + "train.epochs=10000000", 2, "train.epochs must be at most 100000"),
    ("epochs-zero", "train", TRAIN + "train.epochs=0", 2, "train.epochs must be >= 1"),
    ("epochs-fraction", "train", TRAIN + "train.epochs=1.5", 2, "train.epochs: expected an integer"),
    ("epochs-bool", "train", TRAIN + "train.epochs=true", 2, "train.epochs: expected an integer"),
    ("epochs-inf", "train", TRAIN + "train.epochs=.inf", 2, "train.epochs: expected an integer"),
    ("batch-zero", "train", TRAIN + "train.batch_size=0", 2, "train.batch_size must be >= 1"),
    ("batch-negative", "train", TRAIN + "train.batch_size=-4", 2, "train.batch_size must be >= 1"),
    ("batch-one-batchnorm", "train", TRAIN + "train.batch_size=1", 2, "train.batch_size=1 with resnet18's BatchNorm"),
    ("grad-accum-zero", "train", TRAIN + "train.grad_accum=0", 2, "train.grad_accum must be >= 1"),
    ("smoothing-one", "train", TRAIN + "train.label_smoothing=1", 2, "train.label_smoothing must be in [0, 1)"),
    ("smoothing-nan", "train", TRAIN + "train.label_smoothing=nan", 2, "train.label_smoothing=nan"),
    ("ema-one", "train", TRAIN + "train.ema_decay=1", 2, "train.ema_decay must be in [0, 1)"),
    ("grad-clip-negative", "train", TRAIN + "train.grad_clip=-1", 2, "train.grad_clip must be >= 0"),
    ("grad-clip-inf", "train", TRAIN + "train.grad_clip=inf", 2, "train.grad_clip=inf"),
    ("mixup-negative", "train", TRAIN + "train.mixup_alpha=-1", 2, "train.mixup_alpha"),
    ("switch-prob-2", "train", TRAIN + "train.mix_switch_prob=2", 2, "train.mix_switch_prob"),
    ("precision-fp8", "train", TRAIN + "train.precision=fp8", 2, "train.precision: 'fp8' is not one of"),
    ("precision-fp16-cpu", "train", TRAIN + "train.precision=fp16", 2, "train.precision=fp16 needs a GPU"),
    ("nonfinite-steps-zero", "train", TRAIN + "train.max_nonfinite_steps=0", 2, "train.max_nonfinite_steps"),
    ("image-size-zero", "train", TRAIN + "data.image_size=0", 2, "data.image_size and data.eval_size must be in"),
    ("image-size-4", "train", TRAIN + "data.image_size=4", 2, "data.image_size and data.eval_size must be in"),
    ("image-size-huge", "train", TRAIN + "data.image_size=100000", 2, "data.image_size and data.eval_size must be in"),
    ("eval-size-negative", "train", TRAIN + "data.eval_size=-224", 2, "data.image_size and data.eval_size must be in"),
    ("crop-ratio-zero", "train", TRAIN + "data.eval_crop_ratio=0", 2, "data.eval_size / data.eval_crop_ratio"),
    ("crop-ratio-tiny", "train", TRAIN + "data.eval_crop_ratio=0.001", 2, "must be at most 4096 pixels"),
    ("crop-ratio-nan", "train", TRAIN + "data.eval_crop_ratio=nan", 2, "data.eval_crop_ratio=nan"),
    ("workers-negative", "train", TRAIN + "data.workers=-1", 2, "data.workers must be 0 or more"),
    ("backend-unknown", "train", TRAIN + "data.backend=tf", 2, "data.backend: 'tf' is not one of"),
    ("crop-area-zero", "train", TRAIN + "data.crop_area_min=0", 2, "data.crop_area_min must be in (0, 1]"),
    ("random-erase-2", "train", TRAIN + "data.random_erase=2", 2, "data.random_erase is a probability"),
    ("model-typo", "train", TRAIN + "model.name=resnet5", 2, "unknown model.name 'resnet5'"),
    ("drop-path-one", "train", TRAIN + "model.drop_path=1", 2, "model.drop_path must be in [0, 1)"),
    ("dropout-nan", "train", TRAIN + "model.dropout=nan", 2, "model.dropout=nan"),
    ("run-dir-empty", "train", TRAIN + "run.dir=", 2, "run.dir must name a folder"),
    ("seed-negative", "train", TRAIN + "train.seed=-1", 2, "train.seed must be in [0, 2**32)"),
    ("seed-huge", "train", TRAIN + "train.seed=99999999999999999999", 2, "train.seed must be in [0, 2**32)"),
    ("keep-last-negative", "train", TRAIN + "run.keep_last=-1", 2, "run.keep_last must be >= 0"),
    ("timeout-zero", "train", TRAIN + "run.timeout_s=0", 2, "run.timeout_s must be > 0"),
    ("log-every-zero", "train", TRAIN + "logging.log_every=0", 2, "logging.log_every must be >= 1"),
    ("unknown-section", "train", TRAIN + "optimizer.lr=0.1", 2, "unknown section (did you mean 'optim'?)"),
    ("key-typo", "train", TRAIN + "train.epoch=3", 2, "did you mean train.epochs?"),
    ("key-wrong-section", "train", TRAIN + "train.lr=0.1", 2, "did you mean optim.lr?"),
    ("override-no-equals", "train", TRAIN + "train.epochs", 2, "expected section.key=value"),
    ("override-derived", "train", TRAIN + "derived.lr=1", 2, "computed at start-up, cannot be set"),
    ("print-config-checks-too", "train", "--print-config optim.momentum=-1", 2, "optim.momentum must be in [0, 1)"),
    # train_ddp.py: paths
    ("run-dir-is-a-file", "train", TRAIN + "run.dir={w}/afile", 2, "is a file, not a folder"),
    ("config-is-a-checkpoint", "train", "--config {w}/best.pt " + TRAIN, 2, "is not a YAML text file"),
    ("config-is-a-photo", "train", "--config {w}/photo.jpg " + TRAIN, 2, "is not a YAML text file"),
    ("config-missing", "train", "--config {w}/nope.yaml " + TRAIN, 2, "cannot read config"),
    ("config-is-a-folder", "train", "--config {w}/src " + TRAIN, 2, "cannot read config"),
    ("config-is-prose", "train", "--config {w}/notes.txt " + TRAIN, 2, "expected a mapping of sections"),
    ("config-is-a-list", "train", "--config {w}/list.yaml " + TRAIN, 2, "expected a mapping of sections"),
    ("config-key-twice", "train", "--config {w}/twice.yaml " + TRAIN, 2, "train.epochs is given twice"),
    ("config-key-typo", "train", "--config {w}/typo.yaml " + TRAIN, 2, "typo.yaml:2: train.epoch: unknown key"),
    ("config-broken-yaml", "train", "--config {w}/broken.yaml " + TRAIN, 2, "not valid YAML"),
    ("data-root-missing", "train", TRAIN + "data.root={w}/nope", 2, "does not exist"),
    ("data-root-a-file", "train", TRAIN + "data.root={w}/afile", 2, "afile"),
    ("data-root-not-shards", "train", TRAIN + "data.root={w}/src", 2, "manifest"),
    ("data-root-bad-manifest", "train", TRAIN + "data.root={w}/badshards", 2, "manifest"),
    ("data-root-empty-folder", "train", TRAIN + "data.root={w}/emptydir", 2, "emptydir"),
    ("init-from-missing", "train", TRAIN + "model.init_from={w}/nope.pt", 2, "nope.pt"),
    ("init-from-damaged", "train", TRAIN + "model.init_from={w}/damaged.pt", 2, "damaged.pt"),
    # predict.py --export: outputs never over inputs
    ("export-over-own-checkpoint", "predict", CKPT + "--export {w}/best.pt", 2, "is the checkpoint it reads"),
    ("export-force-own-checkpoint", "predict", CKPT + "--export {w}/best.pt --force", 2, "is the checkpoint"),
    ("export-over-notes", "predict", CKPT + "--export {w}/notes.txt", 2, "add --force"),
    ("export-over-photo", "predict", CKPT + "--export {w}/photo.jpg", 2, "not an ONNX file"),
    ("export-over-other-checkpoint", "predict", CKPT + "--export {w}/damaged.pt", 2, "not an ONNX file"),
    ("export-into-folder", "predict", CKPT + "--export {w}/src", 2, "is a folder"),
    ("export-missing-parent", "predict", CKPT + "--export {w}/nope/m.onnx", 2, "does not exist"),
    ("export-unwritable-folder", "predict", CKPT + "--export /proc/m.onnx", 2, "cannot write /proc/m.onnx"),
    ("export-with-model", "predict", "--model {w}/best.pt --export {x}/m.onnx", 2, "--export and --ema need --checkpoint"),
    # predict.py: checkpoints, models and options
    ("checkpoint-missing", "predict", "--checkpoint {w}/nope.pt {w}/photo.jpg", 2, "checkpoint not found"),
    ("checkpoint-prose", "predict", "--checkpoint {w}/notes.txt {w}/photo.jpg", 2, "cannot read checkpoint"),
    ("checkpoint-truncated", "predict", "--checkpoint {w}/damaged.pt {w}/photo.jpg", 2, "cannot read checkpoint"),
    ("checkpoint-empty", "predict", "--checkpoint {w}/empty.pt {w}/photo.jpg", 2, "checkpoint"),
    ("checkpoint-folder", "predict", "--checkpoint {w}/src {w}/photo.jpg", 2, "checkpoint"),
    ("model-not-onnx", "predict", "--model {w}/best.pt {w}/photo.jpg", 2, "onnxruntime cannot load it"),
    ("model-missing", "predict", "--model {w}/nope.onnx {w}/photo.jpg", 2, "no such file"),
    ("topk-zero", "predict", CKPT + "--topk 0 {w}/photo.jpg", 2, "--topk and --batch-size must be at least 1"),
    ("topk-negative", "predict", CKPT + "--topk -3 {w}/photo.jpg", 2, "--topk and --batch-size must be at least 1"),
    ("topk-word", "predict", CKPT + "--topk five {w}/photo.jpg", 2, "invalid int value: 'five'"),
    ("batch-size-zero", "predict", CKPT + "--batch-size 0 {w}/photo.jpg", 2, "--batch-size must be at least 1"),
    ("workers-negative-predict", "predict", CKPT + "--workers -1 {w}/photo.jpg", 2, "--workers at least 0"),
    ("device-foo", "predict", CKPT + "--device foo {w}/photo.jpg", 2, "--device foo: not a device here"),
    ("device-mps", "predict", CKPT + "--device mps {w}/photo.jpg", 2, "--device mps: not a device here"),
    ("device-cuda-none", "predict", CKPT + "--device cuda:3 {w}/photo.jpg", 2, "--device cuda"),
    ("port-too-big", "predict", CKPT + "--serve --port 99999", 2, "--port 99999: a port is 0-65535"),
    ("port-negative", "predict", CKPT + "--serve --port -1", 2, "--port -1: a port is 0-65535"),
    ("max-concurrent-zero", "predict", CKPT + "--serve --max-concurrent 0", 2, "--max-concurrent at least 1"),
    ("max-upload-zero", "predict", CKPT + "--serve --max-upload-mb 0", 2, "--max-upload-mb and --max-megapixels"),
    ("lang-unknown", "predict", CKPT + "--lang xx {w}/photo.jpg", 2, "no class names for language 'xx'"),
    ("format-unknown", "predict", CKPT + "--format xml {w}/photo.jpg", 2, "invalid choice: 'xml'"),
    ("precision-unknown", "predict", CKPT + "--precision fp8 {w}/photo.jpg", 2, "invalid choice: 'fp8'"),
    ("nothing-to-do", "predict", CKPT, 2, "give images to classify"),
    ("two-modes", "predict", CKPT + "--serve {w}/photo.jpg", 2, "(one of them)"),
    ("no-checkpoint", "predict", "{w}/photo.jpg", 2, "one of the arguments --checkpoint --model is required"),
    ("evaluate-missing", "predict", CKPT + "--evaluate {w}/nope", 2, "nope"),
    ("evaluate-a-file", "predict", CKPT + "--evaluate {w}/afile", 2, "afile"),
    ("evaluate-not-shards", "predict", CKPT + "--evaluate {w}/src", 2, "manifest"),
    ("evaluate-bad-manifest", "predict", CKPT + "--evaluate {w}/badshards/train", 2, "manifest"),
    ("ema-without-ema", "predict", CKPT + "--ema {w}/photo.jpg", 2, "EMA"),
    # make_shards.py: outputs never over inputs, sizes, sources
    ("out-is-src", "shards", "folder --src {w}/src --out {w}/src", 2, "is the source itself"),
    ("out-inside-src", "shards", "folder --src {w}/src --out {w}/src/train/dog", 2, "is inside --src"),
    ("src-inside-out", "shards", "folder --src {w}/src --out {w}", 2, "is inside --out"),
    ("src-missing", "shards", "folder --src {w}/nope --out {x}/out", 2, "source not found"),
    ("src-a-file", "shards", "folder --src {w}/afile --out {x}/out", 2, "no train/ or val/ folder"),
    ("src-empty", "shards", "folder --src {w}/emptydir --out {x}/out", 2, "no train/ or val/ folder"),
    ("src-not-imagenet", "shards", "imagenet --src {w}/src --out {x}/out", 2, "src"),
    ("src-not-tiny", "shards", "tiny-imagenet --src {w}/notes.txt --out {x}/out", 2, "notes.txt"),
    ("shard-bytes-zero", "shards", SRC + "--shard-bytes 0", 2, "--shard-bytes: must be positive"),
    ("shard-bytes-negative", "shards", SRC + "--shard-bytes=-5M", 2, "--shard-bytes: must be positive"),
    ("shard-bytes-word", "shards", SRC + "--shard-bytes big", 2, "not a size: 'BIG'"),
    ("shard-size-zero", "shards", SRC + "--shard-size 0", 2, "--shard-size: must be positive"),
    ("shard-size-word", "shards", SRC + "--shard-size many", 2, "not a whole number"),
    ("both-sizes", "shards", SRC + "--shard-size 5 --shard-bytes 1M", 2, "not allowed with argument"),
    ("quality-zero", "shards", SRC + "--quality 0", 2, "--quality: invalid choice: 0"),
    ("quality-101", "shards", SRC + "--quality 101", 2, "--quality: invalid choice: 101"),
    ("max-side-zero", "shards", SRC + "--max-side 0", 2, "--max-side: must be positive"),
    ("workers-zero", "shards", SRC + "--workers 0", 2, "--workers: must be positive"),
    ("split-unknown", "shards", SRC + "--splits test", 2, "split 'test' not found"),
    ("check-unknown", "shards", SRC + "--check all", 2, "--check: invalid choice: 'all'"),
    ("out-holds-other-shards", "shards", "folder --src {w}/src --out {w}/badshards", 2, "badshards"),
    ("out-manifest-a-list", "shards", "folder --src {w}/src --out {w}/listshards", 2, "is not one make_shards.py wrote"),
    ("out-manifest-null", "shards", "folder --src {w}/src --out {w}/nullshards", 2, "is not one make_shards.py wrote"),
    ("evaluate-manifest-a-list", "predict", CKPT + "--evaluate {w}/listshards/train", 2, "is not a shard manifest"),
    ("dataset-unknown", "shards", "photos --src {w}/src", 2, "invalid choice: 'photos'"),
    ("src-required", "shards", "folder --out {x}/out", 2, "the following arguments are required: --src"),
    # make_shards.py verify: the problems on stdout, exit 1
    ("verify-missing", "shards", "verify {w}/nope", 1, "verify: 1 problem(s)"),
    ("verify-bad-manifest", "shards", "verify {w}/badshards/train", 1, "verify: 1 problem(s)"),
    ("verify-manifest-a-list", "shards", "verify {w}/listshards/train", 1, "verify: 1 problem(s)"),
    ("verify-manifest-null", "shards", "verify {w}/nullshards/train", 1, "verify: 1 problem(s)"),
    ("verify-manifest-fields", "shards", "verify {w}/fieldshards/train", 1, "verify: 1 problem(s)"),
    ("verify-cut-shard", "shards", "verify {w}/cutshards/train", 1, "problem(s) in"),
    ("verify-workers-zero", "shards", "verify {w}/shards/train --workers 0", 2, "must be positive"),
    # python -m imagenet_ddp.runs
    ("compare-missing", "runs", "compare {w}/nope", 2, "none of the folders given is a run"),
    ("compare-a-file", "runs", "compare {w}/afile", 2, "none of the folders given is a run"),
    ("compare-not-a-run", "runs", "compare {w}/src", 2, "not a run folder (no config.yaml"),
    ("compare-target-percent", "runs", "compare {w}/runs/run_ok --target 75", 2, "a val top-1 is a fraction"),
    ("compare-target-nan", "runs", "compare {w}/runs/run_ok --target nan", 2, "a val top-1 is a fraction"),
    ("compare-target-zero", "runs", "compare {w}/runs/run_ok --target 0", 2, "a val top-1 is a fraction"),
    ("compare-out-txt", "runs", "compare {w}/runs/run_ok --out {x}/r.txt", 2, "--out must end in .html or .png"),
    ("compare-out-no-folder", "runs", "compare {w}/runs/run_ok --out {w}/nope/r.html", 2, "does not exist"),
    ("compare-format-xml", "runs", "compare {w}/runs/run_ok --format xml", 2, "invalid choice: 'xml'"),
    ("compare-anchor-unknown", "runs", "compare {w}/runs/run_ok --anchor nope", 2, "nope"),
    ("compare-null-val-top1", "runs", "compare {w}/runs/run_null", 0, "line 2 is damaged (val_top1 is not a number)"),
    ("compare-stray-byte", "runs", "compare {w}/runs/run_stray", 0, "line 2 is damaged: ignored"),
    ("compare-status-a-list", "runs", "compare {w}/runs/run_badstatus", 0, "status.json: not one train_ddp.py wrote"),
    ("compare-config-binary", "runs", "compare {w}/runs/run_binconfig", 2, "not a config written by train_ddp.py"),
    ("list-missing", "runs", "list {w}/nope", 2, "no such folder"),
    ("list-a-file", "runs", "list {w}/afile", 2, "no such folder"),
    ("list-null-val-top1", "runs", "list {w}/runs/run_null", 0, "val_top1 is not a number"),
    ("runs-no-command", "runs", "", 2, "the following arguments are required: command"),
]
# fmt: on
VERIFY_ON_STDOUT = {c[0] for c in CASES if c[0].startswith("verify-") and c[3] == 1}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, scratch, case):
    name, cli, argv, expected_code, message = case
    before = snapshot(world)
    code, out, err = call(cli, argv.format(w=world, x=scratch).split())
    if name in VERIFY_ON_STDOUT:  # verify lists each problem on stdout, then a summary line
        assert code == expected_code and err == "" and message in out, (code, out, err)
    else:
        assert_one_line(code, err, expected_code, message, CLIS[cli][1])
    assert snapshot(world) == before


# python -m entries: the module's own handling, in a process of its own.
MODULES = [
    ("bench-shards-no-images", "imagenet_ddp.bench shards --images 0", "--images must be at least 10"),
    ("bench-serve-no-clients", "imagenet_ddp.bench serve --clients 0", "--clients, --requests"),
    ("bench-unknown", "imagenet_ddp.bench nosuch", "usage: python -m imagenet_ddp.bench"),
]


@pytest.mark.parametrize("case", MODULES, ids=[c[0] for c in MODULES])
def test_python_m_entries_are_one_line_too(world, case):
    _, argv, message = case
    before = snapshot(world)
    done = subprocess.run([sys.executable, "-m", *argv.split()], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and snapshot(world) == before


def test_export_writes_over_its_own_onnx_and_with_force_another_file(world, tmp_path):
    other = tmp_path / "other.bin"
    other.write_bytes(b"someone's data")
    assert call("predict", ["--checkpoint", world / "best.pt", "--export", other])[0] == 2
    assert other.read_bytes() == b"someone's data"
    code, _, err = call("predict", ["--checkpoint", world / "best.pt", "--export", other, "--force"])
    assert code == 0 and other.read_bytes() != b"someone's data", err
    check_export_target(other, world / "best.pt")  # now an export of ours: replaced without --force


# Every numeric setting of the schema against values a slip of the keyboard gives: each is accepted
# (then finite, and start-up goes on) or refused in one line naming the setting. (A table over all
# keys rather than Hypothesis: the same coverage, deterministic, in about a second.)
NUMBERS = [
    "0",
    "-1",
    "1",
    "0.5",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "-inf",
    "1e-300",
    "1099511627776",
    "",
    "abc",
]


SETTING = re.compile(r"\b(data|model|train|optim|run|logging)\.[a-z_]+")


def numeric_keys() -> list[str]:
    import dataclasses
    import typing

    from imagenet_ddp.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        if section.name == "derived":
            continue
        hints = typing.get_type_hints(typing.get_type_hints(Config)[section.name])
        for name, tp in hints.items():
            if {int, float} & {tp, *typing.get_args(tp)}:
                keys.append(f"{section.name}.{name}")
    return keys


def test_every_numeric_setting_is_accepted_finite_or_refused_in_one_line_naming_it():
    import math

    from imagenet_ddp.config import ConfigError, resolve, validate

    keys = numeric_keys()
    assert len(keys) > 40
    accepted = refused = 0
    for key in keys:
        for value in NUMBERS:
            try:
                cfg = validate(load_config(None, [f"{key}={value}"]))
                section, name = key.split(".")
                number = getattr(getattr(cfg, section), name)
                assert number is None or math.isfinite(number), (key, value)
                resolve(cfg, 8, "cpu", 1000)
                accepted += 1
            except ConfigError as e:
                message = str(e)
                assert "\n" not in message and SETTING.search(message), (key, value, message)
                if value in ("nan", "inf", "-inf", "", "abc"):  # the value itself is wrong: named
                    assert key in message, (key, value, message)
                refused += 1
    assert accepted and refused > len(keys) * 4  # nan, inf, -inf, abc at least, for every key
