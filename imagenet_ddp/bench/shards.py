"""make_shards throughput against GNU tar on the same files, in one run.

    python -m imagenet_ddp.bench shards [--images 2000] [--src DIR]

Generates ImageNet-like JPEGs (500x375, quality 90, photo-like content) in a temp folder unless
`--src` names a `folder`-layout tree, warms the page cache, then times: `tar cf` of the files (the
floor: pure I/O), make_shards in pack-only mode (`--check header`), and make_shards with full
validation (`--check decode`, the default) at 1..N workers. Prints a table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from imagenet_ddp.errors import ArgumentParser


def _make_images(root: Path, n: int, classes: int = 10) -> None:
    from imagenet_ddp.synth import write_image_set

    for c in range(classes):
        write_image_set(root / "train" / f"class{c:02d}", n // classes, seed=c)


def _warm(files: list[Path]) -> int:
    return sum(len(p.read_bytes()) for p in files)


def _time_tar(src: Path, out: Path) -> float:
    """GNU tar, then fsync: make_shards syncs each shard before renaming it, so both pay for durability."""
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(src), "train"], check=True)
    with open(out, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def _time_pack(listing, out: Path, workers: int, check: str) -> float:
    from imagenet_ddp.shards import PackOptions, pack_split

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    pack_split(listing, "train", out, PackOptions(shard_size=250, check=check), workers)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--src", help="existing folder-layout tree (train/<class>/*) instead of generated images")
    p.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    if args.images < 10 and not args.src:
        p.error(f"--images must be at least 10 (one per class), got {args.images}")
    if args.max_workers < 1:
        p.error(f"--max-workers must be at least 1, got {args.max_workers}")

    from imagenet_ddp.sources import list_source

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp = Path(tmp)
        src = Path(args.src) if args.src else tmp / "src"
        if not args.src:
            print(f"generating {args.images} images of 500x375 in {src} ...", flush=True)
            _make_images(src, args.images)
        listing = list_source("folder", src, ("train",))
        files = [Path(f.path) for f in listing.splits["train"]]
        nbytes = _warm(files)
        n = len(files)
        rows = [("tar cf + fsync (baseline)", 1, _time_tar(src, tmp / "all.tar"))]
        for check in ("header", "decode"):
            for workers in range(1, args.max_workers + 1):
                secs = _time_pack(listing, tmp / "out", workers, check)
                rows.append((f"make_shards --check {check}", workers, secs))
    tar_s = rows[0][2]
    single = {what: secs for what, workers, secs in rows if workers == 1}
    print(
        f"\n{n} images, {nbytes / 1e6:.1f} MB, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'what':30} {'workers':>7} {'seconds':>8} {'img/s':>8} {'MB/s':>8} {'x tar time':>10} {'speedup':>8}"
    )
    result = {"images": n, "megabytes": round(nbytes / 1e6, 1), "cpus": os.cpu_count(), "runs": []}
    for what, workers, secs in rows:
        speedup = single[what] / secs if what.startswith("make_shards") else None
        print(
            f"{what:30} {workers:7d} {secs:8.2f} {n / secs:8.0f} {nbytes / 1e6 / secs:8.1f} {secs / tar_s:10.2f} "
            f"{f'{speedup:.2f}' if speedup else '':>8}"
        )
        result["runs"].append(
            {
                "what": what,
                "workers": workers,
                "seconds": round(secs, 3),
                "images_per_sec": round(n / secs, 1),
                "mb_per_sec": round(nbytes / 1e6 / secs, 1),
                "time_vs_tar": round(secs / tar_s, 2),
            }
        )
    result["pack_only_vs_tar"] = round(min(s for w, _, s in rows if "header" in w) / tar_s, 2)
    print(json.dumps(result))
    return 0
