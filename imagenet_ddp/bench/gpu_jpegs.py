"""The JPEGs of `python -m imagenet_ddp.bench gpu`: shards generated on the spot, and decode rates.

    python -m imagenet_ddp.bench gpu --images 10240      # the shards the loader feeds read

The images come from imagenet_ddp.synth (photo-like, 500x375, quality 90: ~75 KB, an ImageNet
photo's weight), drawn on all cores and packed by shards.pack_split into enough files that every
loader worker reads its own. The decode rates: nvJPEG through data/jpeg.py's decode_many (TorchCodec or torchvision.io) on a list
(nvJPEG's batched decoder), against the same call on the CPU (libjpeg-turbo) in one process per core.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import torch

IMAGE = (500, 375)  # generated JPEGs: width, height
KEEP = 1024  # generated files kept in memory for the decode rates


def write_shards(tmp: Path, count: int, keep: list[bytes]) -> Path:
    from imagenet_ddp.shards import PackOptions, pack_split
    from imagenet_ddp.sources import list_source

    src, processes = tmp / "jpegs", cores()
    classes = max(2, min(processes, count // 8))
    per_class = [count // classes + (c < count % classes) for c in range(classes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.starmap(_write_class, [(src / "train" / f"class{c:03d}", n, c) for c, n in enumerate(per_class)])
    files = sorted((src / "train").rglob("*.JPEG"))
    keep.extend(f.read_bytes() for f in files[:KEEP])
    # Enough files that every reader gets some of its own; --images 10240 on 16 cores: 32 shards of 320.
    shard_size = max(1, math.ceil(count / (2 * processes)))
    options = PackOptions(shard_size=shard_size, check="header")
    pack_split(list_source("folder", str(src), None), "train", tmp / "shards", options, processes)
    shutil.rmtree(src)
    return tmp / "shards"


def _write_class(folder: Path, count: int, seed: int) -> None:
    from imagenet_ddp.synth import write_image_set

    write_image_set(folder, count, size=IMAGE, quality=90, seed=seed)


def decode_nvjpeg(jpegs, batch_size, device, slice_s, count) -> tuple[float, int]:
    from imagenet_ddp.data.jpeg import decode_many

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    data *= math.ceil(2 * batch_size / len(data))  # at least two different batches
    batches = [data[i : i + batch_size] for i in range(0, len(data) - batch_size + 1, batch_size)]
    decode_many(batches[0], device)  # the decoder's set-up
    sync(device)
    images, start = 0, time.perf_counter()
    while (count is None and time.perf_counter() - start < slice_s) or (count is not None and images < count):
        decode_many(batches[(images // batch_size) % len(batches)], device)
        images += batch_size
    sync(device)
    return images / (time.perf_counter() - start), images


_cpu_jpegs: list[bytes] = []  # what the forked decode processes read


def _decode_cpu_chunk(indexes: range) -> int:
    from imagenet_ddp.data.jpeg import decode

    for i in indexes:
        decode(bytearray(_cpu_jpegs[i]))
    return len(indexes)


def decode_cpu(jpegs, processes: int, slice_s: float, count) -> tuple[float, int]:
    _cpu_jpegs[:] = jpegs
    chunks = [range(i, min(i + 16, len(jpegs))) for i in range(0, len(jpegs), 16)]
    with multiprocessing.get_context("fork").Pool(
        processes, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        pool.map(_decode_cpu_chunk, chunks[:processes])  # start-up outside the clock
        images, start = 0, time.perf_counter()
        while (count is None and time.perf_counter() - start < slice_s) or (
            count is not None and images < count
        ):
            images += sum(
                pool.map(_decode_cpu_chunk, chunks if count is None else chunks[: max(1, count // 16)])
            )
        seconds = time.perf_counter() - start
    _cpu_jpegs.clear()
    return images / seconds, images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cores() -> int:
    return len(os.sched_getaffinity(0))
