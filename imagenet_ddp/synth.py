"""Synthetic photo-like images: for benchmarks, test fixtures and the bundled demo dataset.

    python -c "from imagenet_ddp.synth import write_image_set; write_image_set('/tmp/imgs', 1000)"

The images are built to behave like photographs where it matters to a data pipeline: a
500x375 JPEG at quality 90 weighs about as much as an ImageNet photo (~75 KB), because
it has smooth colour gradients, hard edges and sensor-like per-pixel noise. Given a class
index, an image also carries a signal a small CNN learns quickly even at 64x64: one large
shape whose hue, outline and orientation depend on the class, placed, scaled and lit at
random over a random background with random distractors.

Only numpy and PIL, all vectorized: ~3 ms per 500x375 image, plus ~1 ms to encode it.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# Outlines of the class shape, as polygons on the unit circle (see _shape_polygon).
SHAPES = ("ellipse", "rectangle", "triangle", "cross")
_GOLDEN = 0.6180339887498949
# Half-width of the per-pixel noise at 375 px, in 8-bit levels: sets how much a JPEG weighs.
_NOISE = 28
# Cells of the finest octave of the background along the long side (cells are >= 4 px).
_FINEST_OCTAVE = 60


def synth_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    class_index: int | None = None,
    num_classes: int | None = None,
) -> Image.Image:
    """One RGB image of `width` x `height`; with `class_index`, its content depends on the class."""
    if class_index is not None and not (num_classes and 0 <= class_index < num_classes):
        raise ValueError(f"class_index {class_index} needs 0 <= class_index < num_classes ({num_classes})")
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    for _ in range(int(rng.integers(2, 6))):
        _draw_shape(draw, rng, width, height, rng.uniform(0.06, 0.2) * side, _random_colour(rng))
    if class_index is None:
        hue, shape, angle = rng.random(), str(rng.choice(SHAPES)), rng.uniform(0, np.pi)
    else:
        hue, shape, angle = _class_style(class_index, num_classes)
        hue += rng.normal(0, 0.15 / num_classes)
        angle += rng.normal(0, np.radians(8))
    colour = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    _draw_shape(draw, rng, width, height, rng.uniform(0.22, 0.38) * side, colour, shape, angle)
    for _ in range(int(rng.integers(0, 3))):
        xy = rng.uniform(0, 1, 4) * (width, height, width, height)
        draw.line(list(xy), fill=_random_colour(rng), width=max(1, int(side * rng.uniform(0.005, 0.02))))
    return _add_noise(rng, img)


def jpeg_bytes(img: Image.Image, quality: int = 90, progressive: bool = False) -> bytes:
    """`img` encoded as JPEG (baseline unless `progressive`)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


def write_image_set(
    root: str | Path, n: int, size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0
) -> list[Path]:
    """Write `n` JPEGs of `size` (width, height) as root/img_00000000.JPEG...; return their paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / f"img_{i:08d}.JPEG"
        path.write_bytes(jpeg_bytes(synth_image(rng, *size), quality))
        paths.append(path)
    return paths


def _class_style(class_index: int, num_classes: int) -> tuple[float, str, float]:
    """Hue, outline and orientation of a class: neighbours in index differ in all three."""
    hue = class_index / num_classes
    shape = SHAPES[class_index % len(SHAPES)]
    angle = ((class_index * _GOLDEN) % 1.0) * np.pi
    return hue, shape, angle


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with structure at several scales, roughly 1/f like a photo.

    The octaves are mostly luminance (colour channels of a photo move together) and are
    summed on a small grid, then upsampled in one PIL call: ~1 ms at 500x375.
    """
    finest = min(_FINEST_OCTAVE, max(width, height) // 4)
    cw, ch = (max(2, round(finest * n / max(width, height))) for n in (width, height))
    field = np.zeros((ch, cw, 3), np.float32)
    for cells, amplitude in ((3, 100.0), (12, 45.0), (finest, 30.0)):
        gw, gh = (max(2, round(cells * n / max(cw, ch))) for n in (cw, ch))
        grid = rng.uniform(-1, 1, (gh, gw, 3))
        grid = 0.4 * grid + 0.6 * grid.mean(axis=2, keepdims=True)
        grid = Image.fromarray((grid * 127 + 128).astype(np.uint8)).resize((cw, ch), Image.BICUBIC)
        field += (np.asarray(grid, np.float32) - 128) * (amplitude / 128)
    field += np.asarray(_random_colour(rng), np.float32) * rng.uniform(0.4, 0.9) + 30
    coarse = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    return coarse.resize((width, height), Image.BILINEAR)


def _add_noise(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Sensor-like noise, as strong as a photo's at ~375 px and weaker in smaller images
    (downscaling averages it out, which is also why Tiny ImageNet JPEGs are ~2 KB).

    The noise is triangular (close to Gaussian): the sum of the two nibbles of a random
    byte, scaled by a lookup table. Random bytes are the fastest thing numpy's generator
    makes and `point` applies the table in C.
    """
    half_width = np.clip(_NOISE * min(img.size) / 375, 1, _NOISE)
    nibble_sum = (np.arange(256) & 15) + (np.arange(256) >> 4)  # 0..30, peak at 15
    table = np.round(nibble_sum * (half_width / 15)).astype(np.uint8).tolist()
    raw = Image.fromarray(rng.integers(0, 256, (img.height, img.width, 3), dtype=np.uint8))
    return ImageChops.add(img, raw.point(table * 3), offset=-round(half_width))


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    width: int,
    height: int,
    radius: float,
    colour: tuple[int, int, int],
    shape: str | None = None,
    angle: float | None = None,
) -> None:
    shape = shape or str(rng.choice(SHAPES))
    angle = rng.uniform(0, np.pi) if angle is None else angle
    centre = rng.uniform(0.3, 0.7, 2) * (width, height)
    points = _shape_polygon(shape) * radius
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    xy = points @ rot.T + centre
    draw.polygon([tuple(p) for p in xy], fill=colour)


def _shape_polygon(shape: str) -> np.ndarray:
    """Vertices of `shape`, centred on 0, about unit size; elongated so the orientation shows."""
    if shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return np.stack([np.cos(t), 0.45 * np.sin(t)], 1)
    if shape == "rectangle":
        return np.array([[-1, -0.4], [1, -0.4], [1, 0.4], [-1, 0.4]], float)
    if shape == "triangle":
        return np.array([[1.1, 0], [-0.8, -0.75], [-0.8, 0.75]], float)
    if shape == "cross":
        a, b = 1.0, 0.28
        return np.array(
            [[a, -b], [a, b], [b, b], [b, a * 0.7], [-b, a * 0.7], [-b, b], [-a, b], [-a, -b]]
            + [[-b, -b], [-b, -a * 0.7], [b, -a * 0.7], [b, -b]],
            float,
        )
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return _hsv(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.95))
