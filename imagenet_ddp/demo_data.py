"""The demo's real dataset: scikit-learn's handwritten digits as JPEGs in the generic folder layout.

    python -m imagenet_ddp.demo_data --out data/digits     # then: make_shards.py folder --src data/digits

The 1797 8x8 scans of UCI's optical digits (shipped inside scikit-learn, no network) are scaled to
32x32 and written as train/<digit>/, val/<digit>/ (20% of each class) and test/<digit>/ (two per
class, held out of both for predict.py). The split is fixed by the seed, so every run packs the
same files.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from imagenet_ddp.errors import ArgumentParser

SIZE = 32


def write_digits(out: str | Path, seed: int = 0, val_fraction: float = 0.2, test_per_class: int = 2) -> dict:
    """Write the dataset under `out`; returns the number of images per split."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from imagenet_ddp.errors import UserError

        raise UserError("the demo data needs scikit-learn: pip install -e '.[demo]'") from None
    digits = load_digits()
    out = Path(out)
    counts = {"train": 0, "val": 0, "test": 0}
    rng = random.Random(seed)
    for label in range(10):
        indexes = [i for i, t in enumerate(digits.target) if t == label]
        rng.shuffle(indexes)
        n_val = round(len(indexes) * val_fraction)
        splits = {
            "test": indexes[:test_per_class],
            "val": indexes[test_per_class : test_per_class + n_val],
            "train": indexes[test_per_class + n_val :],
        }
        for split, chosen in splits.items():
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                # Ink 0..16 on white paper, as scanned: dark digits on a light background.
                pixels = (255 - digits.images[i] * 255 / 16).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB")
                image.save(folder / f"digit_{i:04d}.jpg", quality=95)
                counts[split] += 1
    return counts


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="python -m imagenet_ddp.demo_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="data/digits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        counts = write_digits(args.out, args.seed)
    except OSError as e:
        print(f"{p.prog}: error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception:  # a bug: the traceback follows this line
        print(
            f"{p.prog}: unexpected error while writing digits to {args.out} (traceback below)",
            file=sys.stderr,
        )
        raise
    print(f"digits: {', '.join(f'{n} {s}' for s, n in counts.items())} images in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
