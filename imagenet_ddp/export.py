"""The trained model for apps: one ONNX file that carries its preprocessing and class names.

    python predict.py --checkpoint runs/demo/best.pt --export model.onnx     # [--ema]
    python predict.py --model model.onnx photo.jpg --lang es                  # onnxruntime
    python predict.py --model model.onnx --serve                              # the same page

The graph takes what the eval preprocessing makes, uint8 images [N, 3, crop, crop] (RGB; resize the
shorter side to `resize`, bilinear with antialiasing, then centre-crop `crop`), normalizes them
inside, and returns logits [N, num_classes]. Its metadata (`imagenet_ddp`, JSON) holds the format,
architecture, preprocess, classes (wnids), and the class names in every shipped language:

    {"format": "imagenet-ddp-onnx/1", "architecture": {...}, "preprocess": {"resize", "crop", "mean",
     "std", "interpolation"}, "classes": [wnid, ...], "names": {"en": [...], "es": [...], ...},
     "source": {"checkpoint", "weights", "sha256"}}

predict.py --model runs it on onnxruntime: the checkpoint and the model code are not read; the
preprocessing is this package's (torchvision on the CPU), so its inputs are those of --checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagenet_ddp.errors import UserError
from imagenet_ddp.inference import Classifier, ClassInfo

FORMAT = "imagenet-ddp-onnx/1"
METADATA_KEY = "imagenet_ddp"
OPSET = 18


class _Normalized(nn.Module):
    """uint8 [N, 3, H, W] -> logits: the normalization the loaders apply, inside the graph."""

    def __init__(self, clf: Classifier):
        super().__init__()
        self.model = clf.model
        self.register_buffer("scale", clf._scale.detach().cpu().clone())
        self.register_buffer("shift", clf._shift.detach().cpu().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(torch.addcmul(self.shift, images.float(), self.scale))


def check_export_target(path: str | Path, checkpoint: str | Path, force: bool = False) -> None:
    """UserError unless writing `path` loses nothing: never the checkpoint itself (not even with
    force), never a folder, and an existing file only if it is an ONNX file this module wrote."""
    path, checkpoint = Path(path), Path(checkpoint)
    if path.exists() and checkpoint.exists() and os.path.samefile(path, checkpoint):
        raise UserError(f"--export {path} is the checkpoint it reads: give another file, e.g. model.onnx")
    if path.is_dir():
        raise UserError(f"--export {path} is a folder: give a file name, e.g. {path / 'model.onnx'}")
    if path.exists() and not force and not _is_our_onnx(path):
        raise UserError(
            f"--export {path} exists and is not an ONNX file written by --export: "
            "give another file name, or add --force to replace it"
        )
    if not path.parent.is_dir():
        raise UserError(f"--export {path}: folder {path.parent} does not exist")


def _is_our_onnx(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # anything onnx cannot parse is not an export of ours
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def export_onnx(clf: Classifier, path: str | Path, source: dict) -> dict:
    """Write `clf`'s model (fp32, CPU) to `path` as ONNX with its metadata, atomically. Returns the metadata."""
    import onnx

    from imagenet_ddp.labels import available_languages

    path = Path(path)
    if clf.device.type != "cpu" or clf.amp_dtype is not None:
        raise UserError("export from a classifier on the CPU in fp32 (predict.py --export sets both)")
    metadata = {
        "format": FORMAT,
        "architecture": clf.architecture,
        "preprocess": {
            "resize": clf.resize,
            "crop": clf.crop,
            "mean": clf.mean,
            "std": clf.std,
            "interpolation": clf.interpolation.value,
        },
        "classes": clf.classes,
        "names": {lang: [c.name for c in clf.class_info(lang)] for lang in available_languages()},
        "source": source,
    }
    model = _Normalized(clf).eval()
    example = torch.zeros(2, 3, clf.crop, clf.crop, dtype=torch.uint8)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent if path.parent.exists() else None, prefix=".export-"))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", max=4096)}},
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata, ensure_ascii=False)
        onnx.save_model(proto, tmp / "model.onnx")
        os.replace(tmp / "model.onnx", path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except Exception as e:  # the exporter's own errors: an op it cannot translate, ...
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"torch.onnx could not export {clf.architecture['name']}: {reason}") from None
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return metadata


class OnnxClassifier(Classifier):
    """An exported model on onnxruntime, with predict.py's Classifier interface (preprocess, predict,
    class_info): the CLI and the web page use it as they use a checkpoint's."""

    def __init__(self, path: str | Path, *, threads: int = 0):
        import onnxruntime
        from torchvision.transforms import InterpolationMode

        path = Path(path)
        if not path.is_file():
            raise UserError(f"--model {path}: no such file")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own types for files it cannot read
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"--model {path}: onnxruntime cannot load it ({reason})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            meta = json.loads(raw or "")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            pre = meta["preprocess"]
            self.resize, self.crop = int(pre["resize"]), int(pre["crop"])
            self.mean, self.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
            self.interpolation = InterpolationMode(pre["interpolation"])
            self.architecture, self.classes = dict(meta["architecture"]), list(meta["classes"])
            self.names = {lang: list(names) for lang, names in meta["names"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--model {path}: not a model exported by predict.py --export ({e})") from None
        self.class_names = self.names["en"]
        self.device, self.precision, self.amp_dtype, self.channels_last = (
            torch.device("cpu"),
            "fp32",
            None,
            False,
        )
        self.runtime = f"onnxruntime {onnxruntime.__version__}"
        self._class_info: dict[str, list[ClassInfo]] = {}

    def class_info(self, lang: str = "en") -> list[ClassInfo]:
        if lang not in self.names:
            raise UserError(
                f"no class names for language {lang!r} in this model; it has: {', '.join(self.names)}"
            )
        if lang not in self._class_info:
            english = self.names["en"]
            self._class_info[lang] = [
                ClassInfo(i, wnid, english[i], name)
                for i, (wnid, name) in enumerate(zip(self.classes, self.names[lang], strict=True))
            ]
        return self._class_info[lang]

    def probabilities(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        batch = torch.stack(list(images)) if isinstance(images, list) else images
        [logits] = self.session.run(["logits"], {"images": np.ascontiguousarray(batch.numpy())})
        return torch.from_numpy(logits).float().softmax(1)
