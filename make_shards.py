#!/usr/bin/env python3
"""Pack ImageNet, its evaluation sets, Tiny ImageNet or an image folder tree into verified webdataset tar shards.

    python make_shards.py imagenet --src /data/imagenet --out shards/imagenet --workers 16 [--real-labels real.json]
    python make_shards.py tiny-imagenet --src tiny-imagenet-200.zip --out shards/tiny
    python make_shards.py folder --src my_photos --out shards/photos --max-side 256 --quality 90
    python make_shards.py imagenet-v2 --src imagenetv2-matched-frequency.tar.gz --out shards/imagenet-v2
    python make_shards.py imagenet-r --src imagenet-r.tar     (also imagenet-a, imagenet-sketch, imagenet-c)
    python make_shards.py real-labels --real real.json shards/imagenet/val
    python make_shards.py verify shards/imagenet/train shards/imagenet/val [--against-source]

`imagenet` detects the original archives (ILSVRC2012_img_*.tar + devkit), the Kaggle layout or
extracted train/<wnid> val/<wnid> folders. Re-running an interrupted job finishes it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imagenet_ddp.errors import ArgumentParser, UserError


def _default_workers() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        value = int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r} (e.g. 500M, 1G)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_args(argv):
    from imagenet_ddp.imagecheck import CHECKS
    from imagenet_ddp.sources import DATASETS

    p = ArgumentParser(
        prog="make_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for dataset in DATASETS:
        s = sub.add_parser(dataset, help=f"pack {dataset} into shards")
        s.add_argument("--src", required=True, help="dataset folder, archive folder or zip")
        s.add_argument("--out", help=f"output root (default: shards/{dataset})")
        s.add_argument("--splits", help="comma-separated splits to pack (default: all found)")
        size = s.add_mutually_exclusive_group()
        size.add_argument(
            "--shard-size", type=_positive, default=1250, help="samples per shard (default 1250)"
        )
        size.add_argument("--shard-bytes", type=_size, help="source bytes per shard instead, e.g. 500M")
        s.add_argument("--max-side", type=_positive, help="re-encode images larger than this many pixels")
        s.add_argument(
            "--quality",
            type=int,
            default=95,
            choices=range(1, 101),
            metavar="1-100",
            help="JPEG quality of re-encoded images (default 95)",
        )
        s.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
        s.add_argument(
            "--check",
            choices=CHECKS,
            default="decode",
            help="decode every image (default) or read headers only (pack-only mode)",
        )
        s.add_argument(
            "--workers", type=_positive, default=_default_workers(), help="processes (default: CPUs)"
        )
        if dataset == "imagenet":
            s.add_argument("--real-labels", metavar="REAL_JSON", help="store ReaL labels with the val split")
    r = sub.add_parser("real-labels", help="store ReaL labels (real.json) with packed ImageNet val splits")
    r.add_argument("--real", required=True, metavar="REAL_JSON", help="ReaL's real.json")
    r.add_argument("splits", nargs="+", help="packed val split folders, e.g. shards/imagenet/val")
    v = sub.add_parser("verify", help="re-check shard splits against their manifests")
    v.add_argument("splits", nargs="+", help="split folders, e.g. shards/imagenet/train")
    v.add_argument("--workers", type=_positive, default=_default_workers())
    v.add_argument(
        "--against-source",
        action="store_true",
        help="also list the source again: every file packed or rejected exactly once, nothing else",
    )
    v.add_argument("--src", help="with --against-source: the source, if it moved since packing")
    return p.parse_args(argv)


def check_apart(src: Path, out: Path) -> None:
    """UserError if the shards would land in the source (packing it again would read them as images)
    or the source lies inside the output (a re-run's cleanup could reach it)."""
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise UserError(f"--out {out} is the source itself: give a folder outside --src")
    if s in o.parents:
        raise UserError(f"--out {out} is inside --src {src}: give a folder outside the source")
    if o in s.parents:
        raise UserError(f"--src {src} is inside --out {out}: give an --out outside the source")


def pack(args) -> int:
    from imagenet_ddp.evalsets import keep_real_labels
    from imagenet_ddp.shards import PackOptions, pack_split
    from imagenet_ddp.sources import list_source

    splits = tuple(args.splits.split(",")) if args.splits else None
    out = Path(args.out or f"shards/{args.command}")
    check_apart(Path(args.src), out)
    listing = list_source(args.command, args.src, splits)
    counts = ", ".join(f"{s} {len(f)}" for s, f in listing.splits.items())
    print(
        f"{listing.dataset} ({listing.layout} layout) in {listing.src}: {len(listing.classes)} classes, {counts} files"
    )
    for note in listing.notes:
        print(f"note: {note}")
    real = getattr(args, "real_labels", None)
    if real:
        from imagenet_ddp.evalsets import load_real_json

        if "val" not in listing.splits:
            raise UserError(f"--real-labels: no val split in {args.src} to label")
        load_real_json(real)  # a malformed file stops the run before hours of packing
    opts = PackOptions(args.shard_size, args.shard_bytes, args.max_side, args.quality, args.seed, args.check)
    for split in listing.splits:
        r = pack_split(listing, split, out, opts, args.workers)
        if keep_real_labels(r.out):  # a repair (or an interrupted one, finished) rewrote the manifest
            print(f"{split}: its ReaL labels ({r.out / 'real-labels.json'}) still match and are kept")
        if r.skipped:
            print(f"{split}: already complete in {r.out} ({r.num_samples} images, {r.num_rejected} rejected)")
            continue
        if r.repaired:
            shown = ", ".join(r.repaired[:3]) + (
                f" and {len(r.repaired) - 3} more" if len(r.repaired) > 3 else ""
            )
            print(f"{split}: {len(r.repaired)} shard(s) were missing or damaged and are rebuilt: {shown}")
        rate = r.num_samples / max(r.seconds, 1e-9)
        print(
            f"{split}: {r.num_samples} images in {r.out}, {r.num_rejected} rejected"
            f"{f' (see {r.out}/rejected.jsonl)' if r.num_rejected else ''}, {r.bytes / 1e6:.1f} MB, "
            f"{r.seconds:.1f} s, {rate:.0f} img/s, {r.bytes / 1e6 / max(r.seconds, 1e-9):.1f} MB/s"
        )
    if real:
        attach_real(out / "val", real)
    return 0


def attach_real(split_dir: Path, real_json: str) -> None:
    from imagenet_ddp.evalsets import attach_real_labels

    r = attach_real_labels(split_dir, real_json)
    print(
        f"{split_dir}: ReaL labels for {r['num_samples']} images ({r['num_labelled']} with a ReaL set, "
        f"{r['num_samples'] - r['num_labelled']} left out of ReaL accuracy) in {split_dir / r['file']}"
        + (f"; {r['dropped']} labels name classes this split lacks" if r["dropped"] else "")
    )


def verify(args) -> int:
    from imagenet_ddp.verify import verify_splits

    problems = verify_splits(args.splits, args.workers, args.against_source, args.src)
    for line in problems:
        print(line)
    print(
        f"verify: {len(problems)} problem(s) in {', '.join(args.splits)}"
        if problems
        else f"verify: OK {', '.join(args.splits)}"
    )
    return 1 if problems else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "real-labels":
            for split_dir in args.splits:
                attach_real(Path(split_dir), args.real)
            return 0
        return verify(args) if args.command == "verify" else pack(args)
    except UserError as e:
        print(f"make_shards.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_shards.py: interrupted; re-run the same command to finish", file=sys.stderr)
        return 130
    except Exception:  # a bug or an environment problem: the traceback follows this line
        what = (
            f"packing {args.src}"
            if hasattr(args, "src") and args.command != "verify"
            else (f"{args.command} on {', '.join(args.splits)}")
        )
        print(f"make_shards.py: unexpected error while {what} (traceback below)", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
