"""Classify images with a trained checkpoint: the model, the eval preprocessing, names, top-k.

    python predict.py --checkpoint runs/demo/best.pt photos/ --lang es

    clf = Classifier.from_checkpoint("runs/demo/best.pt")
    image = load_image(Path("cat.jpg").read_bytes())       # RGB PIL image, or ImageError
    [top] = clf.predict([clf.preprocess(image)], topk=5, lang="es")

The checkpoint alone is enough (read with weights_only=True): architecture, weights, classes and
the eval transform come from it. Images are decoded with PIL and transformed exactly as the
loaders' eval path does it (shorter side resized to `preprocess.resize` with torchvision's
antialiased resize, then a centre crop with the loaders' rounding), so a shard's JPEG gives the
model the same tensor here as in training's validation.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from imagenet_ddp import checkpoint as ck
from imagenet_ddp.data.presets import center_crop_origin, eval_resize_shape
from imagenet_ddp.errors import UserError
from imagenet_ddp.imagecheck import to_rgb  # as make_shards converts: alpha on white

# PIL refuses larger images itself (DecompressionBombError at 2x its MAX_IMAGE_PIXELS): 179 Mpx, a
# 16000 x 11000 photo. The limit is ours so that it holds whatever PIL's global setting is.
MAX_PIXELS = 178_956_970
# Beyond this aspect ratio the long side is centre-cropped before resizing: the crop keeps only the
# middle anyway, and a 1 x 100000 banner would otherwise be resized to 37 x 3.7M pixels first.
MAX_ASPECT = 64
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ImageError(Exception):
    """One file that cannot be classified; the message is the reason, shown on its line. `code` names
    the kind of reason for the web page, which tells it in the user's language: empty, not_an_image,
    too_many_pixels, damaged or unreadable."""

    def __init__(self, message: str, code: str = "unreadable"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClassInfo:
    class_index: int
    wnid: str
    name_en: str
    name: str  # in the requested language (the English name where the tables have none)


@dataclass(frozen=True)
class Prediction:
    top: list[tuple[ClassInfo, float]]  # (class, probability), most probable first


def load_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`data` decoded to an upright RGB image (EXIF orientation applied, alpha on white), or ImageError
    (also when it has more than `max_pixels` pixels, told by the header before decoding)."""
    if not data:
        raise ImageError("empty file", "empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette remarks
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(f"decompression bomb: {e}", "too_many_pixels") from None
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognized format)", "not_an_image") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(f"unreadable image header: {e}", "damaged") from None
        width, height = img.size
        if width * height > max_pixels:  # before decoding: the header alone tells
            raise ImageError(
                f"too many pixels: {width} x {height} = {width * height / 1e6:.0f} Mpx, "
                f"more than the limit of {max_pixels / 1e6:.0f} Mpx",
                "too_many_pixels",
            )
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
            # PIL's own words: "image file is truncated (12 bytes not processed)", "broken PNG file"...
            raise ImageError(f"cannot decode this {img.format}: {e}", "damaged") from None
    return to_rgb(img)


def read_image(path: str | Path) -> Image.Image:
    """load_image of a file, with the file system's errors as ImageError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    return load_image(data)


class Classifier:
    """A checkpoint's model on a device, with its classes, names and eval transform.

    `device`, `amp_dtype` and `channels_last` are what engine.evaluate reads from its state: the
    classifier can be passed there, so --evaluate runs the exact code of training's validation.
    """

    def __init__(self, ckpt: dict, *, device="auto", precision="auto", ema=False, source="checkpoint"):
        from torchvision.transforms import InterpolationMode

        from imagenet_ddp.models import adapter_for, build_model

        try:
            arch, classes, pre = ckpt["architecture"], list(ckpt["classes"]), dict(ckpt["preprocess"])
            self.resize, self.crop = int(pre["resize"]), int(pre["crop"])
            self.mean, self.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
            self.interpolation = InterpolationMode(pre.get("interpolation", "bilinear"))
            self.eval_flip = bool(pre.get("flip", False))  # --evaluate averages in the mirror's logits
            weights = ckpt["ema"] if ema else ckpt["model"]
        except (KeyError, TypeError, ValueError) as e:
            raise ck.CheckpointError(f"{source} lacks what predict needs ({type(e).__name__}: {e})") from None
        if ema and weights is None:
            raise ck.CheckpointError(f"{source} holds no EMA weights (trained with train.ema_decay=0)")
        if len(classes) != arch.get("num_classes"):
            raise ck.CheckpointError(
                f"{source}: {len(classes)} classes but a {arch.get('num_classes')}-way model"
            )
        try:
            model = build_model(**arch)
            model.load_state_dict(weights)
        except (UserError, TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()
            reason = " ".join(line.strip() for line in first[:3])[:300]
            raise ck.CheckpointError(f"{source} does not fit its architecture {arch}: {reason}") from None
        self.device = _pick_device(device)
        config = ckpt.get("config") or {}
        trained = (config.get("derived") or {}).get("precision", "fp32")
        self.precision = trained if precision == "auto" else precision
        if self.device.type == "cpu" and self.precision == "fp16":
            self.precision = "bf16"  # fp16 autocast on CPU is slow and not what training did there
        self.amp_dtype = PRECISIONS[self.precision]
        # As training ran: channels_last where the config asked for it and the model gains (not ViTs).
        asked = bool((config.get("train") or {}).get("channels_last", False))
        self.channels_last = asked and adapter_for(arch["name"]).channels_last(model)
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=fmt).eval().requires_grad_(False)
        self.architecture, self.classes = arch, classes
        self.class_names = [str(n) for n in ckpt.get("class_names") or classes]
        # x * scale + shift, computed as presets._scale_shift does: the loaders' exact float32 values.
        mean, std = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
        self._scale = (1 / (std * 255)).float().view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).float().view(1, 3, 1, 1).to(self.device)
        self._class_info: dict[str, list[ClassInfo]] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kw) -> Classifier:
        try:
            ckpt = ck.load(path)
        except ck.CheckpointError as e:
            raise ck.CheckpointError(_one_line(str(e), path)) from None
        return cls(ckpt, source=str(path), **kw)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_info(self, lang: str = "en") -> list[ClassInfo]:
        """Per class index: wnid, English name and name in `lang` (UserError for an unknown language).

        ImageNet wnids take their names from the shipped tables (imagenet_ddp.labels); other classes
        (a folder dataset's) keep the checkpoint's name in every language."""
        if lang not in self._class_info:
            from imagenet_ddp.labels import imagenet_names

            english, local = imagenet_names("en"), imagenet_names(lang)
            self._class_info[lang] = [
                ClassInfo(i, wnid, english.get(wnid, name), local.get(wnid, english.get(wnid, name)))
                for i, (wnid, name) in enumerate(zip(self.classes, self.class_names, strict=True))
            ]
        return self._class_info[lang]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> uint8 [3, crop, crop]: the loaders' eval transform (torch backend, step for step)."""
        import torchvision.transforms.v2.functional as F

        # [3, H, W] contiguous, as torchvision decodes: its uint8 resize kernels depend on the layout.
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        height, width = pixels.shape[1:]
        if max(height, width) > MAX_ASPECT * min(height, width):
            long = MAX_ASPECT * min(height, width)
            pixels = F.center_crop(pixels, [min(height, long), min(width, long)])
            height, width = pixels.shape[1:]
        h, w = eval_resize_shape(height, width, self.resize)
        pixels = F.resize(pixels, [h, w], interpolation=self.interpolation, antialias=True)
        top, left = center_crop_origin(h, self.crop), center_crop_origin(w, self.crop)
        return F.crop(pixels, top, left, self.crop, self.crop)

    def model_input(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, crop, crop] (or a list of [3, crop, crop]) -> normalized float32 on the device."""
        batch = torch.stack(list(images)) if isinstance(images, list) else images
        batch = torch.addcmul(self._shift, batch.to(self.device), self._scale)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    @torch.no_grad()
    def probabilities(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, crop, crop] (or a list of [3, crop, crop]) -> float32 [B, num_classes] on the CPU."""
        batch = self.model_input(images)
        dtype = self.amp_dtype or torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None):
            logits = self.model(batch)
        return logits.float().softmax(1).cpu()

    def predict(
        self, images: list[torch.Tensor] | torch.Tensor, topk: int = 5, lang: str = "en"
    ) -> list[Prediction]:
        info = self.class_info(lang)
        probs, indices = self.probabilities(images).topk(min(topk, self.num_classes), dim=1)
        return [
            Prediction([(info[i], p) for i, p in zip(row_i.tolist(), row_p.tolist(), strict=True)])
            for row_p, row_i in zip(probs, indices, strict=True)
        ]


def _one_line(message: str, path) -> str:
    """torch's weights_only refusal is a page of advice; the reason is the line after "error:"."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Weights only load failed" not in message:
        return lines[0] if lines else message
    marker = next((i for i, line in enumerate(lines) if line.endswith("error:")), None)
    reason = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else lines[0]
    return (
        f"cannot read checkpoint {path}: torch.load(weights_only=True) refused it ({reason}): "
        "not a checkpoint, damaged, or it would run code when loaded"
    )


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return device


# ---------------------------------------------------------------- many files

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def expand_inputs(
    args: Iterable[str], stdin: Iterable[str] | None = None
) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each file to classify, or (argument, reason) for an argument that names none.

    An argument is a file (any name: a non-image gets its error line later), a directory (its images,
    recursively, sorted, hidden entries skipped), a glob pattern (`photos/**/*.jpg`) or `-`: one such
    argument per line of `stdin`."""
    import glob

    for arg in args:
        if arg == "-" and stdin is not None:
            yield from expand_inputs((line.rstrip("\r\n") for line in stdin if line.strip()), None)
        elif os.path.isdir(arg):
            found = list(_images_under(arg))
            yield from ((path, None) for path in found)
            if not found:
                yield arg, f"no images in this directory ({' '.join(IMAGE_SUFFIXES)})"
        elif os.path.lexists(arg) or not glob.has_magic(arg):
            yield arg, None  # a missing file is reported when it is read, in its place in the output
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            yield from expand_inputs(matches) if matches else [(arg, "no file matches this pattern")]


def _images_under(root: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                yield os.path.join(folder, name)


def _prepared(clf: Classifier, path: str) -> torch.Tensor | str:
    """The model input for `path`, or why there is none. Runs in a decoding thread."""
    try:
        return clf.preprocess(read_image(path))
    except ImageError as e:
        return str(e)
    except Exception as e:  # one odd file (a PIL mode nothing converts) must not end a long run
        return f"cannot process: {type(e).__name__}: {e}"


def classify_files(
    clf: Classifier,
    inputs: Iterable[tuple[str, str | None]],
    *,
    topk: int = 5,
    lang: str = "en",
    batch_size: int = 32,
    workers: int = 2,
) -> Iterator[tuple[str, Prediction | str]]:
    """(path, Prediction or error message) per input, in input order. `workers` threads decode (PIL
    and torchvision release the GIL) the next batch while the model runs on this one."""
    clf.class_info(lang)  # an unknown language fails before any file is read
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
        pending: deque[list[tuple[str, Future | str]]] = deque()
        batch: list[tuple[str, Future | str]] = []
        for path, error in inputs:
            batch.append((path, error or pool.submit(_prepared, clf, path)))
            if len(batch) == batch_size:
                pending.append(batch)
                batch = []
                if len(pending) > 1:
                    yield from _finish(clf, pending.popleft(), topk, lang)
        pending.append(batch)
        while pending:
            yield from _finish(clf, pending.popleft(), topk, lang)


def _finish(clf, batch, topk: int, lang: str) -> Iterator[tuple[str, Prediction | str]]:
    done = [(path, item.result() if isinstance(item, Future) else item) for path, item in batch]
    images = [x for _, x in done if isinstance(x, torch.Tensor)]
    predictions = iter(clf.predict(images, topk, lang) if images else [])
    for path, x in done:
        yield path, next(predictions) if isinstance(x, torch.Tensor) else x


def as_record(path: str | None, result: Prediction | str, lang: str) -> dict:
    """The JSON form of one result (jsonl lines, the web endpoint)."""
    record = {"path": path} if path is not None else {}
    if isinstance(result, str):
        return {**record, "error": result}
    top = [
        {"class_index": c.class_index, "wnid": c.wnid, "name_en": c.name_en, "name": c.name, "probability": p}
        for c, p in result.top
    ]
    return {**record, "lang": lang, "top": top}
