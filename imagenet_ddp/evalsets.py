"""What evaluating a packed split needs beyond its images and labels: the label space of its classes
and, for ImageNet's val split, the ReaL label sets (Beyer et al. 2020, "Are we done with ImageNet?").

    python make_shards.py imagenet --src /data/imagenet --out shards/imagenet --real-labels real.json
    python make_shards.py real-labels --real real.json shards/imagenet/val    # or afterwards

The reading side, for evaluators:
- `label_space(manifest)` -> `LabelSpace(name, imagenet_indices)`: `name` is "imagenet-1k" when the
  split's `classes` are the 1000 ImageNet-1k wnids in sorted order, "imagenet-1k-subset" when they are
  some of them (ImageNet-R and -A: 200), None otherwise (a folder dataset of your own).
  `imagenet_indices[i]` is the ImageNet-1k class index (sorted-wnid order) of the split's class i, so
  a 1000-way model's logits restricted to a subset are `logits[:, imagenet_indices]`.
- `read_real_labels(split_dir)` -> for the i-th sample of the split in its canonical order (the
  manifest's shard order, then the order within each shard: the order evaluation streams), its ReaL
  set as class indices of the split's `classes` (= ImageNet-1k indices when the split has the 1000
  classes); an empty list = an image left out of ReaL accuracy. None when the split has no ReaL labels.
  The labels live in `<split>/real-labels.json`
  (`{"source", "sha256_of_real_json", "num_labelled", "keys", "labels"}`), recorded in the manifest
  as `"real_labels": {"file", "sha256", "num_labelled"}` and checked by `make_shards.py verify`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from imagenet_ddp.errors import UserError
from imagenet_ddp.shards import atomic_write, file_sha256
from imagenet_ddp.sources.evalsets import imagenet_wnids, label_fields

__all__ = ["LabelSpace", "attach_real_labels", "imagenet_wnids", "label_space", "read_real_labels"]

REAL_FILE = "real-labels.json"
_VAL_KEY = re.compile(r"^ILSVRC2012_val_(\d{8})$")


class LabelSpace(NamedTuple):
    name: str | None  # "imagenet-1k", "imagenet-1k-subset" or None (classes not all ImageNet-1k wnids)
    imagenet_indices: list[int] | None  # ImageNet-1k class index of each of the split's classes


def label_space(manifest: dict) -> LabelSpace:
    """The label space of a split's manifest, computed from its `classes` (see the module docstring)."""
    fields = label_fields(manifest["classes"])
    if fields.get("label_space") == "imagenet-1k":
        return LabelSpace("imagenet-1k", list(range(1000)))
    return LabelSpace(fields.get("label_space"), fields.get("imagenet_indices"))


def read_real_labels(split_dir: str | Path) -> list[list[int]] | None:
    """ReaL sets of the split's samples in canonical order, or None (see the module docstring).
    UserError when the side file is missing or not the one the manifest recorded."""
    split_dir = Path(split_dir)
    manifest = json.loads((split_dir / "manifest.json").read_text())
    entry = manifest.get("real_labels")
    if entry is None:
        return None
    path = split_dir / entry["file"]
    if not path.is_file() or file_sha256(path) != entry["sha256"]:
        raise UserError(
            f"{path} is missing or differs from the one recorded in {split_dir / 'manifest.json'}: "
            "run `make_shards.py real-labels --real real.json` on the split again"
        )
    labels = json.loads(path.read_text())["labels"]
    if len(labels) != manifest["num_samples"]:
        raise UserError(f"{path} has {len(labels)} label sets for {manifest['num_samples']} samples")
    return labels


def load_real_json(path: str | Path) -> list[list[int]]:
    """real.json: a list (one entry per val image, ILSVRC2012_val_00000001 first) of lists of class
    indices in 0..999. UserError naming the first malformed entry."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of lists of class indices (ReaL's real.json)")
    for i, entry in enumerate(data):
        if not isinstance(entry, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1000 for c in entry
        ):
            raise UserError(
                f"{path}: entry {i} (ILSVRC2012_val_{i + 1:08d}) is {json.dumps(entry)[:60]}, "
                "not a list of class indices 0..999"
            )
    return data


def split_keys(split_dir: Path, manifest: dict) -> list[str]:
    """Sample keys in canonical order, read from the shards' DALI index files (verify checks them)."""
    keys = []
    for shard in manifest["shards"]:
        lines = (split_dir / shard["index"]).read_text().splitlines()[1:]
        keys += [line.split()[3].rsplit(".", 1)[0] for line in lines]
    return keys


def attach_real_labels(split_dir: str | Path, real_json: str | Path) -> dict:
    """Write `<split>/real-labels.json` for a packed ImageNet val split and record it in the manifest.
    Returns the manifest's entry plus counts. Idempotent: running it again rewrites the same bytes."""
    split_dir = Path(split_dir)
    manifest_path = split_dir / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{split_dir} is not a packed split (no manifest.json): pack it first")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("dataset") != "imagenet":
        raise UserError(f"{split_dir} holds {manifest.get('dataset')}: ReaL labels are for ImageNet's val")
    real = load_real_json(real_json)
    space = label_space(manifest)
    if space.name is None:
        raise UserError(f"{split_dir}: its classes are not ImageNet-1k wnids; ReaL's indices cannot map")
    to_split = {imagenet: i for i, imagenet in enumerate(space.imagenet_indices)}
    keys = split_keys(split_dir, manifest)
    labels, dropped = [], 0
    for key in keys:
        number = _VAL_KEY.match(key)
        if number is None:
            raise UserError(
                f"{split_dir}: sample {key} is not named ILSVRC2012_val_XXXXXXXX: is this ImageNet's val split?"
            )
        n = int(number.group(1))
        if not 1 <= n <= len(real):
            raise UserError(f"{real_json} has {len(real)} entries: none for {key}")
        mine = sorted({to_split[c] for c in real[n - 1] if c in to_split})
        dropped += len(set(real[n - 1])) - len(mine)
        labels.append(mine)
    side = {
        "source": str(real_json),
        "sha256_of_real_json": file_sha256(Path(real_json)),
        "num_labelled": sum(1 for lab in labels if lab),
        "keys": keys,
        "labels": labels,
    }
    atomic_write(split_dir / REAL_FILE, (json.dumps(side, separators=(",", ":")) + "\n").encode())
    entry = {
        "file": REAL_FILE,
        "sha256": file_sha256(split_dir / REAL_FILE),
        "num_labelled": side["num_labelled"],
    }
    manifest["real_labels"] = entry
    atomic_write(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())  # as pack_split writes it
    # dropped: ReaL labels naming classes the split does not have (a subset pack of ImageNet)
    return {**entry, "num_samples": len(keys), "dropped": dropped}


def keep_real_labels(split_dir: str | Path) -> bool:
    """After a repair rewrote a split's manifest: record its ReaL side file again when the file's keys
    are still the split's samples in order (a repair rebuilds the same samples). True if recorded."""
    split_dir = Path(split_dir)
    path = split_dir / REAL_FILE
    manifest = json.loads((split_dir / "manifest.json").read_text())
    if "real_labels" in manifest or not path.is_file():
        return False
    try:
        side = json.loads(path.read_text())
        if side["keys"] != split_keys(split_dir, manifest):
            return False
        num_labelled = sum(1 for lab in side["labels"] if lab)
    except (ValueError, KeyError, TypeError):
        return False
    manifest["real_labels"] = {"file": REAL_FILE, "sha256": file_sha256(path), "num_labelled": num_labelled}
    atomic_write(split_dir / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return True


def check_real_labels(split_dir: Path, manifest: dict, keys: list[str]) -> list[str]:
    """verify's problems with a split's ReaL side file: its sha256, its keys against the shards' own
    order (`keys`, read from the tars), its class indices."""
    entry = manifest.get("real_labels")
    if entry is None:
        return []
    path = split_dir / entry.get("file", REAL_FILE)
    try:
        if file_sha256(path) != entry["sha256"]:
            return [f"{path}: sha256 differs from the manifest's real_labels"]
        side = json.loads(path.read_text())
        side_keys, labels = side["keys"], side["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: missing or unreadable ({type(e).__name__}: {e})"]
    problems = []
    if side_keys != keys:
        problems.append(f"{path}: its keys are not the split's samples in shard order")
    if len(labels) != len(keys):
        problems.append(f"{path}: {len(labels)} label sets for {len(keys)} samples")
    n = len(manifest["classes"])
    if not all(
        isinstance(lab, list) and all(isinstance(c, int) and 0 <= c < n for c in lab) for lab in labels
    ):
        problems.append(f"{path}: a label set holds something other than class indices 0..{n - 1}")
    if sum(1 for lab in labels if lab) != entry.get("num_labelled"):
        problems.append(f"{path}: num_labelled differs from the manifest's")
    return problems
