"""Pack a dataset listing into verified webdataset tar shards with DALI index files.

    python make_shards.py imagenet --src /data/imagenet --out shards/imagenet --workers 16

Output per split (a contract: loaders and outside readers rely on it):
    OUT/<split>/<split>-NNNNNN.tar   POSIX tar; per sample <key>.jpg, <key>.cls (ASCII class index),
                                     <key>.json ({"wnid", "source", ...})
    OUT/<split>/<split>-NNNNNN.idx   DALI webdataset index, written from the writer's own offsets
    OUT/<split>/manifest.json        classes, names, options, per-shard num_samples/bytes/sha256
    OUT/<split>/rejected.jsonl       every source file that was not packed, with the reason

Samples are shuffled across shards with a fixed seed. Every file is written under a temporary name and
renamed; a finished shard leaves a record in OUT/<split>/.parts/, so an interrupted run re-run with the
same arguments redoes only unfinished shards and ends with the same bytes. manifest.json is written
last: its presence means the split is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from imagenet_ddp import __version__
from imagenet_ddp.errors import UserError
from imagenet_ddp.imagecheck import Rejected, prepare
from imagenet_ddp.sources import Listing, SourceFile, read_bytes
from imagenet_ddp.sources.readers import read_in_order

FORMAT = "imagenet-ddp-shards/1"
INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class PackOptions:
    shard_size: int = 1250  # samples per shard: ~140 MB of ImageNet JPEGs, 1025 train shards
    shard_bytes: int | None = None  # or: source bytes per shard (then shard_size is ignored)
    max_side: int | None = None  # re-encode images larger than this
    quality: int = 95  # JPEG quality of re-encoded images
    seed: int = 0  # shuffle seed
    check: str = "decode"  # "decode" every image, or "header" only (pack-only mode)


@dataclass
class SplitResult:
    split: str
    out: Path
    num_samples: int
    num_rejected: int
    bytes: int
    seconds: float
    skipped: bool  # already complete from an earlier run
    repaired: tuple[str, ...] = ()  # shards of a complete split found missing or damaged, rebuilt


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def plan_shards(files: list[SourceFile], split: str, opts: PackOptions) -> list[list[SourceFile]]:
    """Shuffle (fixed seed, independent of listing order) and cut into shards."""
    order = sorted(files, key=lambda f: f.key)
    random.Random(f"{opts.seed}:{split}").shuffle(order)
    if opts.shard_bytes is None:
        n = opts.shard_size
        return [order[i : i + n] for i in range(0, len(order), n)]
    shards, current, size = [], [], 0
    for f in order:
        if current and size + f.size > opts.shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    return shards + [current] if current else shards


def _fingerprint(listing: Listing, split: str, opts: PackOptions) -> str:
    h = hashlib.sha256(json.dumps([listing.dataset, listing.classes, asdict(opts)]).encode())
    for f in listing.splits[split]:
        h.update(f"{f.key}\t{f.wnid}\t{f.size}\n".encode())
    return h.hexdigest()


class _TarWriter:
    """A POSIX (ustar) tar written member by member, hashing as it goes and knowing its offsets.

    Fixed member metadata (mtime 0, root, 0644): the same samples always give the same bytes, whoever
    runs the job and whenever."""

    def __init__(self, f):
        self.f, self.sha, self.offset = f, hashlib.sha256(), 0

    def _write(self, b: bytes) -> None:
        self.f.write(b)
        self.sha.update(b)
        self.offset += len(b)

    def add(self, name: str, data: bytes) -> int:
        """Append a member; return the offset of its data (what DALI's index records)."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        start = self.offset
        self._write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        return start

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE  # two zero blocks end the archive
        self._write(b"\0" * (end - self.offset + (-end % tarfile.RECORDSIZE)))


def write_shard(job: dict, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Write one shard (tar + idx) atomically and return its record (also saved in .parts/)."""
    out, name, opts = Path(job["out"]), job["name"], PackOptions(**job["opts"])
    classes = {w: i for i, w in enumerate(job["classes"])}
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx"
    tmp_tar = out / f".{name}.tar.tmp-{os.getpid()}"
    index_lines, rejected = [], []
    ahead = read_in_order([f.loc for f in job["files"]])  # members of a .tar.gz: one forward pass
    with open(tmp_tar, "wb") as raw:
        tar = _TarWriter(raw)
        for f in job["files"]:
            try:
                data = ahead.pop(f.loc) if f.loc in ahead else read_bytes(f.loc)
                if isinstance(data, OSError):
                    raise data
                img = prepare(data, max_side=opts.max_side, quality=opts.quality, check=opts.check)
            except Rejected as e:
                rejected.append({"source": f.path, "wnid": f.wnid, "reason": str(e)})
                progress(1)
                continue
            except OSError as e:  # e.g. no read permission on a shared filesystem: said, never skipped
                rejected.append(
                    {"source": f.path, "wnid": f.wnid, "reason": f"{UNREADABLE}{e.strerror or e}"}
                )
                progress(1)
                continue
            meta = {"wnid": f.wnid, "source": f.path, "width": img.width, "height": img.height}
            if img.converted:
                meta["converted"] = img.converted
            parts = []
            for ext, data in (
                ("jpg", img.jpeg),
                ("cls", str(classes[f.wnid]).encode()),
                ("json", json.dumps(meta).encode()),
            ):
                member = f"{f.key}.{ext}"
                parts.append(f"{ext} {tar.add(member, data)} {len(data)} {member}")
            index_lines.append(" ".join(parts))
            progress(1)
        tar.close()
        raw.flush()
        os.fsync(raw.fileno())
    size = tar.offset
    os.replace(tmp_tar, tar_path)
    index = f"{INDEX_VERSION} {len(index_lines)}\n" + "".join(line + "\n" for line in index_lines)
    atomic_write(idx_path, index.encode())
    record = {
        "file": tar_path.name,
        "index": idx_path.name,
        "num_samples": len(index_lines),
        "bytes": size,
        "sha256": tar.sha.hexdigest(),
        "rejected": rejected,
    }
    atomic_write(out / ".parts" / f"{name}.json", _json_bytes(record))
    return record


def _done_record(out: Path, name: str) -> dict | None:
    part = out / ".parts" / f"{name}.json"
    try:
        record = json.loads(part.read_text())
    except (OSError, ValueError):
        return None
    tar = out / record["file"]
    if not tar.is_file() or tar.stat().st_size != record["bytes"] or not (out / record["index"]).is_file():
        return None
    return record


def _check_output(out: Path, listing: Listing, split: str, fingerprint: str) -> bool:
    """True when the split is already complete; UserError when `out` holds something else."""
    for marker in ("manifest.json", ".parts/plan.json"):
        path = out / marker
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is not valid JSON: delete {out} or choose another --out") from None
        if not isinstance(old, dict):
            raise UserError(f"{path} is not one make_shards.py wrote: delete {out} or choose another --out")
        if old.get("dataset") != listing.dataset or old.get("split") != split:
            raise UserError(
                f"{out} holds {old.get('dataset')}/{old.get('split')}, not {listing.dataset}/{split}: "
                "choose another --out"
            )
        if old.get("fingerprint") != fingerprint:
            raise UserError(
                f"{out} was made from other source files or options ({old.get('options')}): "
                "choose another --out, or delete it to rebuild"
            )
        return marker == "manifest.json"
    stray = sorted(p.name for p in out.glob("*.tar")) if out.is_dir() else []
    if stray:
        raise UserError(f"{out} already holds shards ({stray[0]}) without a manifest: choose another --out")
    return False


UNREADABLE = "cannot read it: "


def _check_classes_readable(files: list[SourceFile], split: str, shards: list[dict], out: Path) -> None:
    """UserError if every file of a class could not be read (a whole class lost is not a rejection);
    the shards holding unreadable files are forgotten, so a re-run after the fix reads them again."""
    unreadable = [r for s in shards for r in s["rejected"] if r["reason"].startswith(UNREADABLE)]
    if not unreadable:
        return
    listed = Counter(f.wnid for f in files)
    failed = Counter(r["wnid"] for r in unreadable)
    lost = sorted(w for w, n in failed.items() if n == listed[w])
    if lost:
        for s in shards:
            if any(r["reason"].startswith(UNREADABLE) for r in s["rejected"]):
                (out / ".parts" / f"{Path(s['file']).stem}.json").unlink(missing_ok=True)
        example = next(r for r in unreadable if r["wnid"] == lost[0])
        raise UserError(
            f"{split}: none of the {listed[lost[0]]} files of class {lost[0]} can be read ({example['source']}: "
            f"{example['reason'].removeprefix(UNREADABLE)}){f' (and {len(lost) - 1} more classes)' if len(lost) > 1 else ''}: "
            "fix the permissions and run the same command again"
        )


def pack_split(
    listing: Listing, split: str, out_root: Path, opts: PackOptions, workers: int = 1
) -> SplitResult:
    """Pack one split of `listing` into `out_root/split` with `workers` processes."""
    out = out_root / split
    start = time.time()
    fingerprint = _fingerprint(listing, split, opts)
    plan = plan_shards(listing.splits[split], split, opts)
    names = [f"{split}-{i:06d}" for i in range(len(plan))]
    intact: dict[str, dict] = {}
    repairing = False
    if _check_output(out, listing, split, fingerprint):
        manifest = json.loads((out / "manifest.json").read_text())
        try:
            damaged = damaged_shards(out, manifest, workers)
            if not damaged:
                return SplitResult(
                    split, out, manifest["num_samples"], manifest["num_rejected"], 0, 0.0, True
                )
            intact = _intact_records(out, manifest, dict(zip(names, plan, strict=True)), damaged)
        except (KeyError, TypeError, AttributeError):  # its shard list is damaged: every shard is rebuilt
            intact = {}
        repairing = True
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp-*"):
        tmp.unlink()  # left by an interrupted run
    header = {"dataset": listing.dataset, "split": split, "fingerprint": fingerprint, "options": asdict(opts)}
    atomic_write(out / ".parts" / "plan.json", _json_bytes(header))
    # A repair: the intact shards' records first, then the manifest goes (an interrupted repair is
    # an unfinished run, finished by the same command); only the damaged shards are written again.
    for name, record in intact.items():
        atomic_write(out / ".parts" / f"{name}.json", _json_bytes(record))
    (out / "manifest.json").unlink(missing_ok=True)
    records = {n: _done_record(out, n) for n in names}
    jobs = [
        {"out": str(out), "name": n, "opts": asdict(opts), "classes": listing.classes, "files": files}
        for n, files in zip(names, plan, strict=True)
        if records[n] is None
    ]
    for record in run_jobs(jobs, sum(len(j["files"]) for j in jobs), workers, desc=split):
        records[Path(record["file"]).stem] = record
    shards = [records[n] for n in names]
    _check_classes_readable(listing.splits[split], split, shards, out)
    rejected = [(path, "", reason) for path, reason in listing.missing.get(split, [])]
    rejected += [(r["source"], r["wnid"], r["reason"]) for s in shards for r in s["rejected"]]
    rejected.sort()
    atomic_write(
        out / "rejected.jsonl",
        "".join(json.dumps({"source": p, "wnid": w, "reason": r}) + "\n" for p, w, r in rejected).encode(),
    )
    manifest = {
        **{k: header[k] for k in ("dataset", "split")},
        **listing.info.get(split, {}),  # what an evaluation set's split is: variant, label space, corruption
        "format": FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_rejected": len(rejected),
        "classes": listing.classes,
        "class_names": [listing.names.get(w, w) for w in listing.classes],
        "shards": [{k: s[k] for k in ("file", "index", "num_samples", "bytes", "sha256")} for s in shards],
        "options": asdict(opts),
        "source": {"layout": listing.layout, "path": listing.src},
        "fingerprint": fingerprint,
        "created_by": f"imagenet-ddp {__version__}",
    }
    atomic_write(out / "manifest.json", _json_bytes(manifest))
    for part in (out / ".parts").iterdir():
        part.unlink()
    (out / ".parts").rmdir()
    total = sum(s["bytes"] for s in shards)
    repaired = tuple(sorted(set(names) - set(intact))) if intact or repairing else ()
    return SplitResult(
        split, out, manifest["num_samples"], len(rejected), total, time.time() - start, False, repaired
    )


def damaged_shards(out: Path, manifest: dict, workers: int = 1) -> dict[str, str]:
    """{shard name: what is wrong} for the shards of a complete split whose tar is missing, of
    another size or sha256 than the manifest says, or whose index is missing. Sizes first (free),
    then the hashes, `workers` files at a time."""
    from concurrent.futures import ThreadPoolExecutor

    wrong, to_hash = {}, []
    for entry in manifest["shards"]:
        name, tar = Path(entry["file"]).stem, out / entry["file"]
        try:
            size = tar.stat().st_size
        except OSError:
            wrong[name] = "missing"
            continue
        if size != entry["bytes"]:
            wrong[name] = f"{size} bytes, not {entry['bytes']}"
        elif not (out / entry["index"]).is_file():
            wrong[name] = f"its index {entry['index']} is missing"
        else:
            to_hash.append((name, tar, entry["sha256"]))
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL
        for (name, _, expected), digest in zip(
            to_hash, pool.map(lambda t: file_sha256(t[1]), to_hash), strict=True
        ):
            if digest != expected:
                wrong[name] = "its sha256 differs from the manifest's"
    return wrong


def _intact_records(out: Path, manifest: dict, plan: dict[str, list], damaged: dict) -> dict[str, dict]:
    """write_shard's records of the shards that are fine, rebuilt from the manifest and rejected.jsonl
    (each rejection belongs to the shard whose planned files hold its source)."""
    try:
        lines = (out / "rejected.jsonl").read_text().splitlines()
        rejected = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return {}  # no trustworthy record of the rejections: every shard is written again
    records = {}
    for entry in manifest["shards"]:
        name = Path(entry["file"]).stem
        if name in damaged or name not in plan:
            continue
        sources = {f.path for f in plan[name]}
        mine = [r for r in rejected if r.get("wnid") and r["source"] in sources]
        records[name] = {**{k: entry[k] for k in ("file", "index", "num_samples", "bytes", "sha256")}}
        records[name]["rejected"] = mine
    return records


_counter = None


def default_signals() -> None:
    """In a forked pool worker: SIGTERM and SIGINT back to their defaults. A handler the parent set (a
    training run's save-and-stop) would otherwise keep the worker alive when the pool terminates it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _init_worker(counter) -> None:
    global _counter
    default_signals()
    _counter = counter


def _count(n: int) -> None:
    with _counter.get_lock():
        _counter.value += n


def _write_shard_counted(job: dict) -> dict:
    return write_shard(job, _count)


def run_jobs(jobs: list[dict], total: int, workers: int, desc: str = "") -> list[dict]:
    """write_shard over `jobs` in `workers` processes, one progress bar counting images."""
    import multiprocessing as mp

    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None)
    try:
        if workers <= 1 or len(jobs) <= 1:
            return [write_shard(job, bar.update) for job in jobs]
        counter = mp.get_context("fork").Value("q", 0)
        with mp.get_context("fork").Pool(workers, _init_worker, (counter,)) as pool:
            pending = [pool.apply_async(_write_shard_counted, (job,)) for job in jobs]
            while not all(p.ready() for p in pending):
                for p in pending:
                    if p.ready() and not p.successful():
                        p.get()  # fail fast: re-raises the worker's error; finished shards are kept
                time.sleep(0.2)
                bar.update(counter.value - bar.n)
            records = [p.get() for p in pending]  # re-raises a worker's error
            bar.update(counter.value - bar.n)
            return records
    finally:
        bar.close()
