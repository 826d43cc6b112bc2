"""Memory over hundreds of epochs: does a training job's loader memory creep?

    python -m imagenet_ddp.bench soak [--epochs 300] [--images 2000] [--backends dali,torch]

Generates small JPEGs (64x48, so that 300 epochs take minutes), packs them into shards, then runs
each backend in a fresh process (one backend's heap neither flatters nor spoils the other's):
`build_loader` for train and val as train_ddp.py does (rank 0 of --world-size, so index files are
cut to the rank's ranges too), and per epoch a train pass and a val pass. After each epoch it
samples the process's resident memory, and on a CUDA device the memory CUDA reserves (torch's
caching allocator) and uses (the whole device, DALI's pools included).

With the DALI backend it also counts, after each epoch, the DALI pipelines still alive: the train
and val passes' own must be gone (only the one built ahead for the next train pass may remain), not
left to a garbage collection that Python runs only every few hundred passes.

Prints, per backend, the figures at epoch --at (10: after the first epochs' warm-up, when caches
and pools are full) and at the last epoch, their ratio (the goal: within 5%), and the least-squares
slope of resident memory over those epochs (MB an epoch), then writes every sample to --out (JSON).
--max-ratio and --max-slope make the exit status 1 beyond them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from imagenet_ddp.bench import cpu_name

IMAGE_SIZE = (64, 48)  # width, height of the generated JPEGs
CLASSES = 10


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        return _child(args)
    backends = [b for b in args.backends.split(",") if b]
    if args.at > args.epochs:
        print(f"--at ({args.at}) must not be past --epochs ({args.epochs})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        root = _fixture(Path(tmp), args.images, args.workers)
        runs = {b: _run_child(b, root, args) for b in backends}
    report = {
        "machine": _machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "root", "out")},
        "backends": {b: _figures(run, args.at) for b, run in runs.items()},
    }
    _print(report, args)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    figures = report["backends"].values()
    too_high = args.max_ratio and max(f["rss_ratio"] for f in figures) > args.max_ratio
    too_steep = args.max_slope and max(f["rss_slope_mb_per_epoch"] for f in figures) > args.max_slope
    return 1 if too_high or too_steep else 0


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--images", type=int, default=2000, help="train images (val: a quarter as many)")
    p.add_argument("--backends", default="dali,torch", help="comma-separated: dali, torch")
    p.add_argument(
        "--at", type=int, default=10, help="the reference epoch (1-based) the last is compared with"
    )
    p.add_argument("--world-size", type=int, default=2, help="the loaders are rank 0's of this many")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--image-size", type=int, default=32, help="train and eval crop side")
    p.add_argument("--out", default="soak.json")
    p.add_argument(
        "--max-ratio", type=float, default=0.0, help="exit 1 when a backend's last/--at RSS exceeds it"
    )
    p.add_argument(
        "--max-slope",
        type=float,
        default=0.0,
        help="exit 1 when a backend's RSS slope from --at on exceeds it (MB an epoch)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # the backend this process soaks (run by the parent)
    p.add_argument("--root", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _fixture(tmp: Path, images: int, workers: int) -> Path:
    """tmp/shards/{train,val}: `images` train JPEGs and a quarter as many val ones, in shards of 100."""
    from imagenet_ddp.shards import PackOptions, pack_split
    from imagenet_ddp.sources import list_source
    from imagenet_ddp.synth import write_image_set

    for split, count, seed in (("train", images, 0), ("val", max(CLASSES, images // 4), 1000)):
        for c in range(CLASSES):
            write_image_set(
                tmp / "images" / split / f"class{c:02d}", count // CLASSES, IMAGE_SIZE, seed=seed + c
            )
    listing = list_source("folder", str(tmp / "images"), None)
    for split in ("train", "val"):
        pack_split(listing, split, tmp / "shards", PackOptions(shard_size=100, check="header"), workers)
    return tmp / "shards"


def _run_child(backend: str, root: Path, args) -> dict:
    cmd = [sys.executable, "-m", "imagenet_ddp.bench", "soak", "--child", backend, "--root", str(root)]
    for name in ("epochs", "world_size", "batch_size", "workers", "image_size"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    print(f"{backend}: {args.epochs} epochs ...", flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(args) -> int:
    import warnings

    from imagenet_ddp.data import DataConfig, build_loader

    warnings.simplefilter("ignore")  # fewer shards than readers: expected of a small fixture
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DataConfig(
        root=args.root,
        backend=args.child,
        image_size=args.image_size,
        eval_size=args.image_size,
        batch_size=args.batch_size,
        workers=args.workers,
        shuffle_buffer=256,
    )
    where = dict(rank=0, world_size=args.world_size, device=device, seed=0)
    pipelines = _live_pipelines if args.child == "dali" else lambda: None
    samples, start = [], time.perf_counter()
    with build_loader(cfg, "train", **where) as train, build_loader(cfg, "val", **where) as val:
        for epoch in range(args.epochs):
            train.set_epoch(epoch)
            steps = sum(1 for _ in train) + sum(1 for _ in val)
            sample = {"epoch": epoch + 1, "steps": steps, "rss_mb": _rss_mb(), **_cuda_mb(device)}
            samples.append(sample | ({"dali_pipelines": pipelines()} if args.child == "dali" else {}))
    print(json.dumps({"device": str(device), "seconds": time.perf_counter() - start, "samples": samples}))
    return 0


def _live_pipelines() -> int:
    """DALI pipelines not yet freed, without a collection (one would free what is waiting for it)."""
    from nvidia.dali import Pipeline

    return sum(1 for o in gc.get_objects() if isinstance(o, Pipeline))


def _slope(ys: list[float]) -> float:
    """The least-squares slope of ys against 0, 1, 2, ...: their trend, not the noise of two samples."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys)) / sum(
        (x - mean_x) ** 2 for x in range(n)
    )


def _rss_mb() -> float:
    """This process's resident memory now (not the peak that getrusage gives)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def _cuda_mb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return {"cuda_reserved_mb": reserved / 2**20, "cuda_used_mb": (total - free) / 2**20}


def _figures(run: dict, at: int) -> dict:
    samples = run["samples"]
    ref, last = samples[at - 1], samples[-1]
    after = [s["rss_mb"] for s in samples[at - 1 :]]
    figures = {
        "device": run["device"],
        "seconds": round(run["seconds"], 1),
        "at_epoch": at,
        "last_epoch": last["epoch"],
        "rss_mb_at": round(ref["rss_mb"], 1),
        "rss_mb_last": round(last["rss_mb"], 1),
        "rss_ratio": round(last["rss_mb"] / ref["rss_mb"], 4),
        "rss_mb_range_after": [round(min(after), 1), round(max(after), 1)],
        "rss_slope_mb_per_epoch": round(_slope(after), 4),
        "samples": samples,
    }
    if "dali_pipelines" in last:
        figures["dali_pipelines_max"] = max(s["dali_pipelines"] for s in samples)
    for key in ("cuda_reserved_mb", "cuda_used_mb"):
        if key in ref:
            figures[f"{key}_at"], figures[f"{key}_last"] = round(ref[key], 1), round(last[key], 1)
            figures[key.replace("_mb", "_ratio")] = round(last[key] / max(ref[key], 1e-9), 4)
    return figures


def _print(report: dict, args) -> None:
    print(
        f"\n{report['machine']['cpu']}, {report['machine']['cores']} cores; {args.images} train images "
        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, rank 0 of {args.world_size}, batch {args.batch_size}, "
        f"workers {args.workers}"
    )
    print(
        f"{'backend':8s} {'device':6s} {'RSS@' + str(args.at):>9s} {'RSS@' + str(args.epochs):>9s} "
        f"{'ratio':>6s} {'MB/epoch':>8s} {'range after':>15s} {'time':>7s}"
    )
    for backend, f in report["backends"].items():
        low, high = f["rss_mb_range_after"]
        print(
            f"{backend:8s} {f['device']:6s} {f['rss_mb_at']:7.0f}MB {f['rss_mb_last']:7.0f}MB {f['rss_ratio']:6.3f} "
            f"{f['rss_slope_mb_per_epoch']:8.3f} {low:6.0f}-{high:.0f}MB {f['seconds']:6.0f}s"
        )
        if "dali_pipelines_max" in f:
            print(f"{'':8s} DALI pipelines alive after an epoch: at most {f['dali_pipelines_max']}")
        if "cuda_used_mb_at" in f:
            print(
                f"{'':8s} CUDA used {f['cuda_used_mb_at']:.0f} -> {f['cuda_used_mb_last']:.0f} MB "
                f"({f['cuda_used_ratio']:.3f}), reserved {f['cuda_reserved_mb_at']:.0f} -> "
                f"{f['cuda_reserved_mb_last']:.0f} MB ({f['cuda_reserved_ratio']:.3f})"
            )


def _machine() -> dict:
    cpu = cpu_name()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, **versions}
