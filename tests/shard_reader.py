"""Read shard splits back the way training will: webdataset and DALI (CPU), not our own writer's code."""

from __future__ import annotations

import json
from pathlib import Path


def manifest(split_dir) -> dict:
    return json.loads((Path(split_dir) / "manifest.json").read_text())


def read_webdataset(split_dir) -> list[dict]:
    """Every sample of a split through webdataset: key, cls (int), meta (json), jpg (bytes)."""
    import webdataset as wds

    m = manifest(split_dir)
    urls = [str(Path(split_dir) / s["file"]) for s in m["shards"]]
    samples = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples.append(
            {"key": s["__key__"], "cls": int(s["cls"]), "meta": json.loads(s["json"]), "jpg": s["jpg"]}
        )
    return samples


def read_dali(split_dir, batch_size: int = 8) -> list[tuple[str, int, tuple]]:
    """(source, class index, decoded HWC shape) of every sample, through fn.readers.webdataset + decoder."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    m = manifest(split_dir)
    paths = [str(Path(split_dir) / s["file"]) for s in m["shards"]]
    indexes = [str(Path(split_dir) / s["index"]) for s in m["shards"]]

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def pipe():
        jpg, cls, meta = fn.readers.webdataset(
            paths=paths,
            index_paths=indexes,
            ext=["jpg", "cls", "json"],
            missing_component_behavior="error",
            dont_use_mmap=True,
            name="reader",
        )
        # A dense batch needs equal label lengths: pad the ASCII digits with spaces.
        return (
            fn.decoders.image(jpg, device="cpu", output_type=types.RGB),
            fn.pad(cls, fill_value=32, shape=[8]),
            meta,
        )

    p = pipe()
    p.build()
    total = p.epoch_size("reader")
    out = []
    while len(out) < total:
        images, labels, metas = p.run()
        for i in range(len(images)):
            if len(out) == total:
                break
            meta = json.loads(bytes(np.array(metas.at(i))).decode())
            label = int(bytes(np.array(labels.at(i))).decode().strip())
            out.append((meta["source"], label, tuple(np.array(images.at(i)).shape)))
    return out
