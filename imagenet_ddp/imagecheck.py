"""Decide, per source image, what goes into a shard: the original bytes, a re-encoded baseline RGB JPEG,
or a rejection with its reason.

DALI's decoders (nvJPEG on the GPU, libjpeg-turbo on the CPU) stop the whole training pipeline on a
corrupt JPEG, and handle CMYK, grayscale, progressive or PNG-in-disguise files differently from PIL.
ImageNet has all of these, so every image is checked when packing and anything but a baseline RGB JPEG
is converted to one.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

CHECKS = ("decode", "header")


class Rejected(Exception):
    """The image cannot be packed; the message is the reason written to rejected.jsonl."""


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes
    width: int
    height: int
    converted: str | None  # why it was re-encoded, or None when the original bytes were kept


def _open(data: bytes) -> Image.Image:
    if not data:
        raise Rejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise Rejected("not an image (unrecognized format)") from None
    except Exception as e:
        raise Rejected(f"unreadable image header: {e}") from None


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:
        raise Rejected(f"cannot decode {img.format}: {e}") from None


def _needs_conversion(img: Image.Image, max_side: int | None) -> str | None:
    if img.format != "JPEG":
        return f"{img.format} to JPEG"
    if img.mode != "RGB":
        return f"{img.mode} to RGB"
    if img.info.get("progressive") or img.info.get("progression"):
        return "progressive to baseline"
    if max_side is not None and max(img.size) > max_side:
        return f"resized to max side {max_side}"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode: alpha composited on white, 16-bit/float grayscale scaled to 8 bits."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.getchannel("A"))
        return white
    if img.mode in ("I", "I;16", "I;16B", "F"):
        # 16-bit or float grayscale: scale to 8 bits instead of clipping everything to white.
        img = img.convert("F")
        lo, hi = img.getextrema()
        img = img.point(lambda v: (v - lo) * 255.0 / max(hi - lo, 1e-6)).convert("L")
    return img.convert("RGB")


def _baseline_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) if `data` is a complete-looking 8-bit, 3-component baseline JPEG, else None.

    A marker walk up to the frame header: ~20x cheaper than PIL's full header parse, for pack-only
    mode. Anything unusual returns None and goes through PIL."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1):  # baseline / extended sequential, Huffman
            frame = data[pos + 4 : pos + 10]
            if len(frame) < 6 or frame[0] != 8 or frame[5] != 3:
                return None
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # progressive, lossless or arithmetic frame, or scan data before any frame
        pos += 2 + length
    return None


def prepare(
    data: bytes, *, max_side: int | None = None, quality: int = 95, check: str = "decode"
) -> Prepared:
    """The JPEG to store for `data`, or Rejected.

    check="decode" decodes every image. A JPEG that is kept as is is decoded at 1/8 scale (libjpeg's
    DCT scaling): the entropy-coded data is still read in full, so truncation and corrupt data are
    found, at a fraction of the cost of a full decode. check="header" ("pack only") reads headers and
    checks that a kept JPEG ends with its end-of-image marker; `make_shards.py verify` decodes later.
    """
    if check == "header":
        size = _baseline_jpeg_size(data)
        if size is not None and (max_side is None or max(size) <= max_side):
            return Prepared(data, *size, None)
    img = _open(data)
    width, height = img.size
    reason = _needs_conversion(img, max_side)
    if reason is None:
        if check == "decode":
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            _load(img)
        elif data.rstrip(b"\0")[-2:] != b"\xff\xd9":
            raise Rejected("truncated JPEG: no end-of-image marker")
        return Prepared(data, width, height, None)
    if max_side is not None and img.format == "JPEG" and max(img.size) > 2 * max_side:
        # Let libjpeg shrink by a power of two while decoding: much faster, quality kept for the resize.
        img.draft(img.mode, (width * max_side // max(img.size), height * max_side // max(img.size)))
    _load(img)
    img = to_rgb(img)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, progressive=False, optimize=False)
    return Prepared(out.getvalue(), img.width, img.height, reason)


def check_jpeg(data: bytes) -> str | None:
    """Why `data` is not a decodable baseline RGB JPEG, or None (used by verify)."""
    try:
        img = _open(data)
        reason = _needs_conversion(img, None)
        if reason is not None:
            return f"not a baseline RGB JPEG ({reason})"
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        _load(img)
    except Rejected as e:
        return str(e)
    return None
