"""Node-local staging throughput (data.stage_dir) against GNU cp of the same files, in one run.

    python -m imagenet_ddp.bench stage [--gb 1] [--shard-mb 64] [--dir /tmp] [--stage-dir $SLURM_TMPDIR]

Writes a train split of random-byte shards (GB total; staging only copies and hashes, so the bytes
need not be JPEGs) with its manifest under --dir, then times: `cp` of the tars + sync (the floor:
pure I/O), staging them (copy, sha256, fsync, rename: what a node does before training), and a second
staging that reuses every copy (stat only). The source was just written, so it is read from the page
cache: this measures the node's side; on a cluster the shared filesystem's read rate usually sets
the pace. Prints a table and a last JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from imagenet_ddp.errors import ArgumentParser


def make_split(root: Path, total: int, shard_bytes: int) -> int:
    """A train and a one-shard val split of random shards with a manifest each; returns the train bytes."""
    written = 0
    for split, size in (("train", total), ("val", min(total, shard_bytes))):
        (root / split).mkdir(parents=True)
        shards, left, i = [], size, 0
        while left > 0:
            n = min(shard_bytes, left)
            data = os.urandom(n)
            name = f"{split}-{i:06d}"
            (root / split / f"{name}.tar").write_bytes(data)
            (root / split / f"{name}.idx").write_text("v1.2 1\njpg 0 1 x.jpg cls 0 1 x.cls\n")
            shards.append(
                {
                    "file": f"{name}.tar",
                    "index": f"{name}.idx",
                    "num_samples": 1,
                    "bytes": n,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            left, i = left - n, i + 1
        manifest = {"classes": ["a"], "num_samples": len(shards), "shards": shards}
        (root / split / "manifest.json").write_text(json.dumps(manifest))
        written += size if split == "train" else 0
    return written


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="train split size in GB (default 1)")
    p.add_argument("--shard-mb", type=int, default=64, help="shard size in MB (default 64)")
    p.add_argument("--dir", default=None, help="where the source split goes (default: a temp folder)")
    p.add_argument("--stage-dir", default=None, help="where the copies go (default: beside the source)")
    args = p.parse_args(argv)

    from imagenet_ddp.data import DataConfig
    from imagenet_ddp.data.stage import stage_node

    work = Path(tempfile.mkdtemp(prefix="bench-stage-", dir=args.dir))
    try:
        # A folder of its own under --stage-dir: the benchmark removes only what it made.
        stage = Path(tempfile.mkdtemp(prefix="bench-stage-", dir=args.stage_dir or work))
        src, plain = work / "shared", work / "cp"
        train_bytes = make_split(src, int(args.gb * 1e9), args.shard_mb * 10**6)
        total = sum(p.stat().st_size for p in src.glob("*/*.tar"))
        plain.mkdir()
        start = time.perf_counter()
        subprocess.run(["cp", *map(str, src.glob("*/*.tar")), str(plain)], check=True)
        subprocess.run(["sync", "-f", str(plain)], check=True)
        cp_s = time.perf_counter() - start
        cfg = DataConfig(root=str(src), backend="torch", stage_dir=str(stage))
        first = stage_node(cfg, [0], 1, 0, range(1))
        again = stage_node(cfg, [0], 1, 0, range(1))
        if first.copied_bytes != total or again.copied or first.warning:
            raise SystemExit(f"unexpected staging: {first} then {again}")
        rows = [
            ("cp + sync", cp_s),
            ("stage (copy, sha256, fsync)", first.seconds),
            ("stage again (reuse)", again.seconds),
        ]
        print(
            f"{total / 1e9:.2f} GB in {len(list(src.glob('*/*.tar')))} shards ({train_bytes / 1e9:.2f} GB train)"
        )
        print(f"{'':30} {'seconds':>8} {'GB/s':>7} {'vs cp':>6}")
        for name, s in rows:
            print(f"{name:30} {s:8.2f} {total / 1e9 / s:7.2f} {s / cp_s:6.2f}")
        print(
            json.dumps(
                {
                    "bench": "stage",
                    "gb": round(total / 1e9, 3),
                    "shard_mb": args.shard_mb,
                    "cp_s": round(cp_s, 3),
                    "stage_s": round(first.seconds, 3),
                    "stage_gb_per_s": round(total / 1e9 / first.seconds, 3),
                    "reuse_s": round(again.seconds, 4),
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "date": time.strftime("%Y-%m-%d"),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.stage_dir and "stage" in locals():
            shutil.rmtree(stage, ignore_errors=True)
    return 0
