"""Loader throughput: the dali and torch backends against torchvision ImageFolder + PIL, in one run.

    python -m imagenet_ddp.bench loaders [--images 2000] [--shards shards/imagenet]

All figures come from this one process, on the same JPEG files and the same cores: a folder
of ImageNet-like JPEGs (generated: 500x375, quality 90, photo-like content; or, with --shards,
the first --images samples of ROOT/train extracted as they are stored) and the same files packed
into temporary shards. Measured, each the best of --repeats runs taken in turn:

- ImageFolder + PIL + torchvision v2 transforms in a DataLoader: the baseline (ratio 1.0);
- the torch and dali backends of imagenet_ddp.data (train preprocessing, normalized batches);
- the torch backend's device-decode path (data.decode_device=cuda): workers read the bytes, the
  training process's decode thread decodes and crops a batch at a time; on a CPU this is its
  stand-in (libjpeg-turbo for nvJPEG, the same code and thread);
- with each augmentation policy (--policies; data.auto_augment), both backends, against the
  policy baseline: ImageFolder + PIL + v2 with TrivialAugmentWide after the flip (bilinear, as
  torchvision's reference recipe);
- the decode-only limit: DALI's decoder and PIL over all cores, decoding and nothing else;
- images/s of a small model trained from the best backend and from the synthetic one.

Prints a table, then one JSON line with every figure and its ratio to the baseline. The CPU
ms/img column (this process and its workers, start-up included) says what each image costs
whatever else runs on the machine; img/s is what a training job would see.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from imagenet_ddp.bench import cpu_name
from imagenet_ddp.data import DataConfig, build_loader
from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD

WARMUP = 3  # batches before the clock starts: worker start-up and pipeline build are not throughput


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        images, max_side = _image_folder(Path(tmp), args)
        shards = Path(tmp) / "shards"
        _pack(images, shards, args.workers)
        cfg = DataConfig(
            root=str(shards),
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            shuffle_buffer=256,
        )
        runs = {
            "imagefolder": lambda: _imagefolder(images / "train", args),
            "torch": lambda: _backend(cfg, "torch"),
            "torch_device": lambda: _backend(cfg, "torch", decode_device="cuda"),
            "dali": lambda: _backend(cfg, "dali"),
            "decode_dali": lambda: _decode_dali(shards / "train", args),
            "decode_pil": lambda: _decode_pil(images / "train", args),
        }
        if args.policies:
            runs["imagefolder_ta"] = lambda: _imagefolder(images / "train", args, policy=True)
        for policy in args.policies:
            for backend in ("torch", "dali"):
                runs[f"{backend}:{policy}"] = functools.partial(_backend, cfg, backend, policy)
        best, cpu_ms = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, run in runs.items():  # in turn, so that load from elsewhere hits all alike
                start = _cpu_seconds()
                rate, images_done = run()
                used = 1000 * (_cpu_seconds() - start) / images_done
                best[name], cpu_ms[name] = max(best[name], rate), min(cpu_ms[name], used)
                print(f"  {name:12s} {rate:8.0f} img/s {used:6.2f} CPU ms/img", flush=True)
        fastest = max(("torch", "dali"), key=best.get)
        train = _train_speeds(cfg, fastest, args) if args.train_steps else {}
    _report(best, cpu_ms, train, fastest, max_side, args)
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, pools): less
    affected than img/s by other jobs on a shared machine; start-up costs are included."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard root whose train split provides the images (default: generate)")
    p.add_argument("--images", type=int, default=2000, help="images to measure on (default 2000)")
    p.add_argument("--image-size", type=int, default=224, help="train crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best counts")
    p.add_argument("--model", default="resnet18", help="torchvision model for the train measurement")
    p.add_argument("--train-steps", type=int, default=6, help="timed train steps per loader (0: skip)")
    p.add_argument(
        "--policies",
        nargs="*",
        default=["ta_wide", "ra", "imagenet"],
        choices=["ta_wide", "ra", "imagenet"],
        help="augmentation policies to measure on both backends (none: give the flag alone)",
    )
    args = p.parse_args(argv)
    if args.images // args.batch_size < WARMUP + 2:
        p.error(
            f"--images {args.images} gives {args.images // args.batch_size} batches of {args.batch_size}; "
            f"at least {WARMUP + 2} are needed ({WARMUP} warm up the loaders)"
        )
    return args


def _image_folder(tmp: Path, args) -> tuple[Path, int | None]:
    """tmp/images/train/<class>/*.jpg: generated, or extracted byte for byte from --shards."""
    root = tmp / "images"
    if args.shards is None:
        from imagenet_ddp.synth import write_image_set

        classes = 10
        for c in range(classes):
            write_image_set(root / "train" / f"class{c:02d}", args.images // classes, seed=c)
        return root, None
    from imagenet_ddp.data.shardset import open_split, read_index

    split = open_split(args.shards, "train")
    count = 0
    for shard in split.shards:
        index = read_index(shard)
        with open(shard.path, "rb") as f:
            for key, (at, size), (cls_at, cls_size) in zip(index.keys, index.jpg, index.cls, strict=True):
                f.seek(cls_at)
                folder = root / "train" / split.classes[int(f.read(cls_size))]
                folder.mkdir(parents=True, exist_ok=True)
                f.seek(at)
                (folder / f"{key}.jpg").write_bytes(f.read(size))
                count += 1
                if count == args.images:
                    break
        if count == args.images:
            break
    manifest = json.loads((split.dir / "manifest.json").read_text())
    return root, (manifest.get("options") or {}).get("max_side")


def _pack(images: Path, out: Path, workers: int) -> None:
    from imagenet_ddp.shards import PackOptions, pack_split
    from imagenet_ddp.sources import list_source

    listing = list_source("folder", str(images), None)
    # Small shards, so that every reader of every backend has files of its own.
    pack_split(listing, "train", out, PackOptions(shard_size=100, check="header"), workers)


def _rate(batches, batch_size: int) -> tuple[float, int]:
    """(images/s from the warm-up batches to the last batch's arrival, images in all batches). The
    clock stops at the last batch, not after the loader's teardown (workers joined, a pipeline
    released): that runs once a pass, where training validates."""
    n, start, last, i = 0, None, None, -1
    for i, _ in enumerate(batches):
        last = time.perf_counter()
        if i == WARMUP:
            start = last
        elif i > WARMUP:
            n += batch_size
    return n / (last - start), (i + 1) * batch_size


def _imagefolder(root: Path, args, policy: bool = False) -> tuple[float, int]:
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.RandomResizedCrop(args.image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            # On the PIL image, bilinear, as torchvision's reference recipe (its presets.py passes
            # --interpolation, default bilinear; the transform's own default is nearest) and as ours.
            *([v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)] if policy else []),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )
    return _rate(loader, args.batch_size)


def _backend(cfg: DataConfig, backend: str, policy: str = "none", decode_device="cpu") -> tuple[float, int]:
    cfg = dataclasses.replace(cfg, backend=backend, auto_augment=policy, decode_device=decode_device)
    with build_loader(cfg, "train") as loader:
        return _rate(loader, cfg.batch_size)


def _decode_dali(split_dir: Path, args) -> tuple[float, int]:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    tars = sorted(split_dir.glob("*.tar"))

    @pipeline_def
    def decode():
        jpegs = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg"],
            dont_use_mmap=True,
        )
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    pipe = decode(batch_size=args.batch_size, num_threads=args.workers, device_id=None, seed=0)
    pipe.build()
    steps = args.images // args.batch_size
    try:
        return _rate((pipe.run() for _ in range(steps)), args.batch_size)
    finally:
        del pipe


def _pil_decode(path: str) -> None:
    from PIL import Image

    with Image.open(path) as img:
        img.convert("RGB")


def _decode_pil(root: Path, args) -> tuple[float, int]:
    import multiprocessing

    files = sorted(str(p) for p in root.rglob("*.jpg")) + sorted(str(p) for p in root.rglob("*.JPEG"))
    warmup = files[: args.workers * 4]
    pool = multiprocessing.get_context("fork").Pool(args.workers)
    try:
        pool.map(_pil_decode, warmup)  # start-up outside the clock
        start = time.perf_counter()
        pool.map(_pil_decode, files, chunksize=16)
        rate = len(files) / (time.perf_counter() - start)
    finally:
        pool.close()
        pool.join()  # reaped children count in _cpu_seconds
    return rate, len(warmup) + len(files)


def _train_speeds(cfg: DataConfig, backend: str, args) -> dict:
    """Images/s of SGD steps on a small model (bf16 autocast, channels_last) fed by each loader."""
    import torchvision

    loaders = {
        name: build_loader(dataclasses.replace(cfg, backend=name), "train") for name in (backend, "synthetic")
    }
    model = torchvision.models.get_model(args.model, num_classes=loaders[backend].num_classes)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def steps(loader):
        for step, (images, labels) in enumerate(loader):
            if step == WARMUP + 1 + args.train_steps:
                break
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield step

    speeds = dict.fromkeys(loaders, 0.0)
    for _ in range(args.repeats):
        for name, loader in loaders.items():  # in turn, so that load from elsewhere hits both alike
            speeds[name] = max(speeds[name], _rate(steps(loader), cfg.batch_size)[0])
            loader.close()
            print(f"  train {name:10s} {speeds[name]:6.1f} img/s (best so far)", flush=True)
    return speeds


def _report(best: dict, cpu_ms: dict, train: dict, fastest: str, max_side, args) -> None:
    base, limit = best["imagefolder"], max(best["decode_dali"], best["decode_pil"])
    names = {
        "imagefolder": "ImageFolder + PIL + v2 (baseline)",
        "torch": "imagenet_ddp torch backend",
        "torch_device": "torch backend, decode thread",
        "dali": "imagenet_ddp dali backend (CPU)",
        "decode_dali": "decode only: DALI CPU decoder",
        "decode_pil": "decode only: PIL",
    }
    print(
        f"\n{args.images} images, train crop {args.image_size}, batch {args.batch_size}, {args.workers} workers"
    )
    print(f"{'':36s} {'img/s':>8s} {'vs baseline':>12s} {'of decode limit':>16s} {'CPU ms/img':>11s}")
    for key, label in names.items():
        print(
            f"{label:36s} {best[key]:8.0f} {best[key] / base:11.2f}x {best[key] / limit:15.0%} {cpu_ms[key]:11.2f}"
        )
    if args.policies:
        policy_base = best["imagefolder_ta"]
        print(
            "\nAugmentation policies (data.auto_augment), against ImageFolder + PIL + v2 + TrivialAugmentWide:"
        )
        print(f"{'':36s} {'img/s':>8s} {'vs IF + TA':>12s} {'vs no policy':>13s} {'CPU ms/img':>11s}")
        print(
            f"{'ImageFolder + PIL + v2 + TA (base)':36s} {policy_base:8.0f} {1:11.2f}x {'':13s} {cpu_ms['imagefolder_ta']:11.2f}"
        )
        for policy in args.policies:
            for backend in ("torch", "dali"):
                key = f"{backend}:{policy}"
                print(
                    f"{backend + ' backend, ' + policy:36s} {best[key]:8.0f} {best[key] / policy_base:11.2f}x "
                    f"{best[key] / best[backend]:12.0%} {cpu_ms[key]:11.2f}"
                )
    if train:
        synthetic = train["synthetic"]
        print(f"\n{args.model} train steps (bf16, channels_last), batch {args.batch_size}:")
        print(
            f"  fed by {fastest} backend {train[fastest]:8.1f} img/s = {train[fastest] / synthetic:.0%} of synthetic"
        )
        print(f"  fed by synthetic      {synthetic:8.1f} img/s")
    result = {
        "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "gpu": None},
        "images": args.images,
        "source": args.shards or "generated 500x375 q90",
        "max_side": max_side,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "img_per_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_to_imagefolder": {k: round(v / base, 3) for k, v in best.items()},
        "fraction_of_decode_limit": {k: round(best[k] / limit, 3) for k in ("torch", "torch_device", "dali")},
        "ratio_to_imagefolder_ta": {
            k: round(v / best["imagefolder_ta"], 3)
            for k, v in best.items()
            if ":" in k or k == "imagefolder_ta"
        },
        "cpu_ms_per_img": {k: round(v, 3) for k, v in cpu_ms.items()},
        "best_backend": fastest,
        "train_img_per_s": {k: round(v, 2) for k, v in train.items()},
        "train_real_over_synthetic": round(train[fastest] / train["synthetic"], 3) if train else None,
    }
    print(json.dumps(result))
