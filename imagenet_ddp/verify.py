"""Re-check shard splits against their manifests: every problem is reported, none stops the check.

    python make_shards.py verify shards/imagenet/train shards/imagenet/val --workers 8

Checks per shard: size and sha256 against the manifest, the tar reads to its end with only regular
`<key>.{jpg,cls,json}` members, the sample count, the DALI index equals the members' real offsets, every
jpg decodes as a baseline RGB JPEG, every cls is a class index agreeing with the json's wnid. Across the
split: keys are unique, totals match, no stray shard files; across splits: the same class list.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from imagenet_ddp.imagecheck import check_jpeg
from imagenet_ddp.shards import INDEX_VERSION, file_sha256

EXTS = ("jpg", "cls", "json")


def verify_shard(split_dir: str, entry: dict, classes: list[str]) -> tuple[list[str], list[str]]:
    """(problems, keys) of one shard; problems are lines naming the shard."""
    path = Path(split_dir) / entry["file"]
    problems: list[str] = []

    def bad(msg: str) -> None:
        problems.append(f"{path}: {msg}")

    if not path.is_file():
        bad("missing")
        return problems, []
    size = path.stat().st_size
    if size != entry["bytes"]:
        bad(f"{size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
    elif file_sha256(path) != entry["sha256"]:
        bad("sha256 differs from the manifest (corrupted)")
    samples: dict[str, dict[str, tuple[int, int, bytes]]] = {}
    order: list[str] = []
    tar_complete = False
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                key, dot, ext = m.name.partition(".")
                if not m.isfile() or "/" in m.name or ext not in EXTS:
                    bad(f"unexpected member {m.name}")
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = (m.offset_data, m.size, tar.extractfile(m).read())
        tar_complete = True
    except (tarfile.TarError, EOFError, OSError) as e:
        bad(f"not a complete tar archive ({e})")
    if len(samples) != entry["num_samples"]:
        bad(f"{len(samples)} samples, manifest says {entry['num_samples']}")
    expected_index = [f"{INDEX_VERSION} {len(order)}"]
    for key in order:
        parts = samples[key]
        missing = [e for e in EXTS if e not in parts]
        if missing:
            bad(f"sample {key} lacks {', '.join(missing)}")
            continue
        expected_index.append(
            " ".join(f"{e} {parts[e][0]} {parts[e][1]} {key}.{e}" for e in EXTS if e in parts)
        )
        reason = check_jpeg(parts["jpg"][2])
        if reason:
            bad(f"sample {key}: {reason}")
        try:
            label = int(parts["cls"][2].decode())
            wnid = json.loads(parts["json"][2])["wnid"]
        except (ValueError, KeyError, TypeError):
            bad(f"sample {key}: unreadable cls or json")
            continue
        if not 0 <= label < len(classes):
            bad(f"sample {key}: class index {label} outside 0..{len(classes) - 1}")
        elif classes[label] != wnid:
            bad(f"sample {key}: cls {label} is {classes[label]} but json says {wnid}")
    index_path = Path(split_dir) / entry["index"]
    try:
        index = index_path.read_text().splitlines()
    except OSError:
        bad(f"index {index_path.name} missing")
    else:
        if tar_complete and index != expected_index:
            bad(f"index {index_path.name} does not match the tar's members")
    return problems, order


def verify_splits(split_dirs: list[str], workers: int = 1) -> list[str]:
    """Every problem found in the given split folders (empty list = all good)."""
    import multiprocessing as mp

    problems, jobs, class_lists = [], [], {}
    for d in split_dirs:
        manifest_path = Path(d) / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            shards, classes = manifest["shards"], manifest["classes"]
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{manifest_path}: missing or unreadable manifest ({e})")
            continue
        class_lists[d] = classes
        listed = {s["file"] for s in shards}
        problems += [
            f"{p}: shard not listed in the manifest"
            for p in sorted(Path(d).glob("*.tar"))
            if p.name not in listed
        ]
        if sum(s["num_samples"] for s in shards) != manifest.get("num_samples"):
            problems.append(f"{manifest_path}: num_samples differs from the sum over its shards")
        jobs += [(d, s, classes) for s in shards]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.starmap(verify_shard, jobs, chunksize=1)
    else:
        results = [verify_shard(*job) for job in jobs]
    keys: dict[str, dict[str, str]] = {}
    for (d, entry, _), (shard_problems, shard_keys) in zip(jobs, results, strict=True):
        problems += shard_problems
        seen = keys.setdefault(d, {})
        for key in shard_keys:
            if key in seen:
                problems.append(f"{Path(d) / entry['file']}: key {key} also in {seen[key]}")
            seen[key] = entry["file"]
    if len({json.dumps(c) for c in class_lists.values()}) > 1:
        problems.append(f"class lists differ between {', '.join(class_lists)}")
    return problems
