"""Re-check shard splits against their manifests: every problem is reported, none stops the check.

    python make_shards.py verify shards/imagenet/train shards/imagenet/val --workers 8

Checks per shard: size and sha256 against the manifest, the tar reads to its end with only regular
`<key>.{jpg,cls,json}` members, the sample count, the DALI index equals the members' real offsets, every
jpg decodes as a baseline RGB JPEG, every cls is a class index agreeing with the json's wnid. Across the
split: keys are unique, totals match, no stray shard files; across splits packed from one source: the
same class list; a ReaL side file (evalsets.py): its sha256, its keys in the shards' order, its class
indices.

With `--against-source` (`check_source=True`) the split's source is listed again (the dataset and
path recorded in the manifest, or `--src`): every source file must be in the shards or in
rejected.jsonl exactly once, and nothing else may be there.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from imagenet_ddp.evalsets import check_real_labels
from imagenet_ddp.imagecheck import check_jpeg
from imagenet_ddp.shards import INDEX_VERSION, default_signals, file_sha256

EXTS = ("jpg", "cls", "json")


def verify_shard(split_dir: str, entry: dict, classes: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(problems, keys, source paths) of one shard; problems are lines naming the shard."""
    path = Path(split_dir) / entry["file"]
    problems: list[str] = []

    def bad(msg: str) -> None:
        problems.append(f"{path}: {msg}")

    if not path.is_file():
        bad("missing")
        return problems, [], []
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
    sources: list[str] = []
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
            meta = json.loads(parts["json"][2])
            wnid = meta["wnid"]
            sources.append(meta["source"])
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
    return problems, order, sources


MAX_LISTED = 20  # per kind of source mismatch: the count says the rest


def _check_against_source(split_dir: Path, manifest: dict, packed: list[str], src: str | None) -> list[str]:
    from imagenet_ddp.errors import UserError
    from imagenet_ddp.sources import list_source

    split = manifest["split"]
    try:
        listing = list_source(manifest["dataset"], src or manifest["source"]["path"], (split,))
    except UserError as e:
        return [f"{split_dir}: cannot list the source again: {e}"]
    expected = {f.path for f in listing.splits[split]} | {p for p, _ in listing.missing.get(split, [])}
    rejected_path = split_dir / "rejected.jsonl"
    try:
        rejected = [json.loads(line)["source"] for line in rejected_path.read_text().splitlines() if line]
    except (OSError, ValueError, KeyError) as e:
        return [f"{rejected_path}: missing or unreadable ({e})"]
    seen: dict[str, int] = {}
    for path in packed + rejected:
        seen[path] = seen.get(path, 0) + 1
    problems = []
    for what, paths in (
        ("source file neither packed nor rejected", sorted(expected - seen.keys())),
        ("packed or rejected more than once", sorted(p for p, n in seen.items() if n > 1)),
        ("in the shards but not in the source", sorted(seen.keys() - expected)),
    ):
        problems += [f"{split_dir}: {what}: {p}" for p in paths[:MAX_LISTED]]
        if len(paths) > MAX_LISTED:
            problems.append(f"{split_dir}: {what}: {len(paths) - MAX_LISTED} more")
    return problems


def verify_splits(
    split_dirs: list[str], workers: int = 1, check_source: bool = False, src: str | None = None
) -> list[str]:
    """Every problem found in the given split folders (empty list = all good)."""
    import multiprocessing as mp

    problems, jobs, class_lists, manifests = [], [], {}, {}
    for d in split_dirs:
        manifest_path = Path(d) / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            shards, classes = manifest["shards"], manifest["classes"]
            fields = ("file", "index", "num_samples", "bytes", "sha256")
            if not isinstance(classes, list) or not all(
                isinstance(s, dict) and set(fields) <= set(s) for s in shards
            ):
                raise ValueError(f"each shard needs {', '.join(fields)}")
            if not all(isinstance(s["num_samples"], int) for s in shards):
                raise ValueError("a shard's num_samples is not a whole number")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{manifest_path}: missing or unreadable manifest ({type(e).__name__}: {e})")
            continue
        class_lists[d], manifests[d] = classes, manifest
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
        with mp.get_context("fork").Pool(workers, default_signals) as pool:
            results = pool.starmap(verify_shard, jobs, chunksize=1)
    else:
        results = [verify_shard(*job) for job in jobs]
    keys: dict[str, dict[str, str]] = {}
    order: dict[str, list[str]] = {d: [] for d in manifests}  # keys in canonical order, for ReaL
    packed: dict[str, list[str]] = {d: [] for d in manifests}
    for (d, entry, _), (shard_problems, shard_keys, sources) in zip(jobs, results, strict=True):
        problems += shard_problems
        packed[d] += sources
        seen = keys.setdefault(d, {})
        order[d] += shard_keys
        for key in shard_keys:
            if key in seen:
                problems.append(f"{Path(d) / entry['file']}: key {key} also in {seen[key]}")
            seen[key] = entry["file"]
    # Splits packed from one source (train and val) share one class list; evaluation sets need not.
    by_source: dict[tuple, dict[str, list]] = {}
    for d, manifest in manifests.items():
        source = (manifest.get("dataset"), json.dumps(manifest.get("source")))
        by_source.setdefault(source, {})[d] = class_lists[d]
    for group in by_source.values():
        if len({json.dumps(c) for c in group.values()}) > 1:
            problems.append(f"class lists differ between {', '.join(group)}")
    for d, manifest in manifests.items():
        problems += check_real_labels(Path(d), manifest, order[d])
    if check_source:
        for d, manifest in manifests.items():
            problems += _check_against_source(Path(d), manifest, packed[d], src)
    return problems
