"""Evaluate a model on a suite of packed splits: ImageNet val (with ReaL labels), V2, Sketch, R, A, C.

    python predict.py --checkpoint runs/r50/best.pt --evaluate shards/imagenet/val \
        shards/imagenet-v2/matched-frequency shards/imagenet-r/test shards/imagenet-c
    torchrun --standalone --nproc_per_node=8 predict.py --checkpoint runs/r50/best.pt --suite suite.txt
    train_ddp.py ... data.extra_eval='[shards/imagenet-v2/matched-frequency]' data.extra_eval_every=10

One function scores one split (`score_split`), the same for predict.py and for training's extra
evaluations. Classes are matched by wnid: a split's class i counts as the model's class with the same
wnid, images of classes the model does not know are left out (a Tiny ImageNet model on ImageNet val:
the images of its 200 classes), and the logits of classes the split does not have are never predicted
(ImageNet-R and -A: the model's 1000 restricted to their 200, as their papers score them). ReaL top-1
(Beyer et al. 2020) counts the images whose ReaL set is not empty; a prediction is right when it is in
the set. ImageNet-C's mCE divides each corruption's error summed over severities by AlexNet's
(Hendrycks & Dietterich 2019; the figures ship in anchors_data/imagenet-c-alexnet.json) and averages.

Ranks: each rank scores its own samples (the eval loaders give every sample to exactly one rank, in
manifest order: rank r holds samples [N*r//W, N*(r+1)//W)), which also tells each sample's position
for its ReaL set; one all-reduce per split sums the counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imagenet_ddp.dist import all_reduce_sum, broadcast_buffers
from imagenet_ddp.errors import UserError

ALEXNET = Path(__file__).with_name("anchors_data") / "imagenet-c-alexnet.json"
_C_FOLDER = re.compile(r"^(?P<corruption>[a-z_]+)-(?P<severity>[1-5])$")


@dataclass(frozen=True)
class SplitPlan:
    """How one split is scored against one model's classes."""

    dir: Path
    name: str  # shown in tables and metric keys: "<parent folder>/<split folder>"
    num_samples: int  # in the split (all ranks)
    label_map: torch.Tensor  # split class index -> model class index, -1 where the model lacks the class
    keep: torch.Tensor | None  # model classes whose logits count; None: all of them
    real: list[list[int]] | None  # per sample in manifest order, its ReaL set as model class indices
    num_classes: int  # the split's classes the model knows
    corruption: str | None = None  # ImageNet-C
    severity: int | None = None


def find_splits(paths: list[str | Path]) -> list[Path]:
    """Each path a split (holds manifest.json), or a folder of splits (ImageNet-C's
    `<corruption>-<severity>/` folders): replaced by them, sorted. UserError for anything else."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "manifest.json").is_file():
            found.append(path)
            continue
        inner = sorted(p.parent for p in path.glob("*/manifest.json")) if path.is_dir() else []
        if not inner:
            what = "no such folder" if not path.exists() else "holds no manifest.json, nor folders that do"
            raise UserError(f"{path}: {what}; give split folders made by make_shards.py (e.g. shards/x/val)")
        found += inner
    return list(dict.fromkeys(found))


def read_suite(path: str | Path) -> list[str]:
    """A suite file: one split folder per line; blank lines and # comments are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"--suite {path}: cannot read it ({e.strerror or e})") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    splits = [line for line in lines if line]
    if not splits:
        raise UserError(f"--suite {path} lists no split folders (one per line)")
    return splits


def plan_split(split_dir: str | Path, model_classes: list[str]) -> SplitPlan:
    """The plan of `split_dir` for a model with `model_classes` (wnids); UserError when they share none."""
    split_dir = Path(split_dir)
    try:
        manifest = json.loads((split_dir / "manifest.json").read_text())
        classes, num_samples = list(manifest["classes"]), int(manifest["num_samples"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{split_dir / 'manifest.json'} is not a shard manifest ({type(e).__name__}: {e})"
        ) from None
    position = {wnid: i for i, wnid in enumerate(model_classes)}
    label_map = torch.tensor([position.get(wnid, -1) for wnid in classes], dtype=torch.long)
    known = int((label_map >= 0).sum())
    if known == 0:
        close = ", ".join(classes[:3]) + (" ..." if len(classes) > 3 else "")
        raise UserError(
            f"{split_dir}: none of its {len(classes)} classes ({close}) is one of the model's "
            f"{len(model_classes)} ({', '.join(model_classes[:3])} ...): nothing to score"
        )
    keep = torch.zeros(len(model_classes), dtype=torch.bool)
    keep[label_map[label_map >= 0]] = True
    real = _real_labels(split_dir, label_map)
    corruption, severity = manifest.get("corruption"), manifest.get("severity")
    match = _C_FOLDER.match(split_dir.name)
    if corruption is None and match and manifest.get("dataset", "").startswith("imagenet-c"):
        corruption, severity = match["corruption"], int(match["severity"])
    return SplitPlan(
        split_dir,
        f"{split_dir.parent.name}/{split_dir.name}",
        num_samples,
        label_map,
        None if bool(keep.all()) else keep,
        real,
        known,
        corruption,
        None if severity is None else int(severity),
    )


def _real_labels(split_dir: Path, label_map: torch.Tensor) -> list[list[int]] | None:
    from imagenet_ddp.evalsets import read_real_labels

    sets = read_real_labels(split_dir)
    if sets is None:
        return None
    mapped = label_map.tolist()
    # A class the model does not know cannot be predicted: kept out, so an empty set stays
    # distinguishable from a set of unknown classes (those images count, and are missed).
    return [[mapped[c] for c in s if mapped[c] >= 0] if s else [] for s in sets]


def real_of(split_dir: str | Path, rank: int = 0, world_size: int = 1) -> dict | None:
    """engine.evaluate's `real` for a split whose classes are the model's (training's val): its ReaL
    sets and this rank's first sample; None when it has no ReaL labels."""
    from imagenet_ddp.data.plan import rank_range
    from imagenet_ddp.evalsets import read_real_labels

    if not (Path(split_dir) / "manifest.json").is_file():
        return None  # synthetic data
    sets = read_real_labels(split_dir)
    return None if sets is None else {"sets": sets, "first": rank_range(len(sets), rank, world_size)[0]}


def split_loader(data_cfg, split_dir: Path, *, rank: int, world_size: int, device):
    """The eval loader of one split folder, with the loaders' settings of `data_cfg`."""
    from imagenet_ddp.data import build_loader

    cfg = dataclasses.replace(data_cfg, root=str(split_dir.parent))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*more shards shuffle better")  # a remark about training only
        warnings.filterwarnings("ignore", ".*readers share files")  # small evaluation sets: expected
        return build_loader(cfg, split_dir.name, rank=rank, world_size=world_size, device=device, train=False)


@torch.no_grad()
def score_split(model: nn.Module, loader, plan: SplitPlan, state, rank: int = 0, world_size: int = 1) -> dict:
    """top-1, top-5, loss and (with ReaL labels) ReaL top-1 of `model` over the split, summed over
    ranks. `state` gives device, amp_dtype, channels_last and eval_flip, as for engine.evaluate."""
    from imagenet_ddp.checkpoint import unwrap
    from imagenet_ddp.data.plan import rank_range

    model = unwrap(model)
    was_training = model.training
    broadcast_buffers(model)  # every rank scores rank 0's BatchNorm statistics, the saved ones
    model.eval()
    device = state.device
    label_map = plan.label_map.to(device)
    keep = plan.keep.to(device) if plan.keep is not None else None
    first, _ = rank_range(plan.num_samples, rank, world_size)
    seen = 0
    # loss, top-1, top-5, images counted, ReaL hits, ReaL images
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for images, labels in loader:
        valid = labels >= 0  # padding of the last batch carries a negative label
        logits = _logits(model, images, state)[valid]
        labels = label_map[labels[valid]]
        if keep is not None:
            logits = logits.masked_fill(~keep, -math.inf)
        known = labels >= 0
        logits, labels = logits[known], labels[known]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(1).sum()
        totals[3] += len(labels)
        if plan.real is not None:  # reading back the predictions: a sync per batch, evaluation only
            real_valid = int(valid.sum())
            positions = torch.arange(first + seen, first + seen + real_valid)[known.cpu()]
            seen += real_valid
            real_hits = real_count = 0
            for position, predicted in zip(positions.tolist(), top[:, 0].tolist(), strict=True):
                real = plan.real[position]
                real_count += bool(real)
                real_hits += predicted in real
            totals[4] += real_hits
            totals[5] += real_count
    all_reduce_sum(totals)
    model.train(was_training)
    loss, top1, top5, count, real_hits, real_count = totals.tolist()
    n = max(count, 1)
    result = {
        "dataset": plan.name,
        "split": str(plan.dir),
        "images": int(count),
        "split_images": plan.num_samples,
        "classes": plan.num_classes,
        "top1": top1 / n,
        "top5": top5 / n,
        "loss": loss / n,
    }
    if plan.real is not None:
        result.update(real_top1=real_hits / max(real_count, 1), real_images=int(real_count))
    if plan.corruption is not None:
        result.update(corruption=plan.corruption, severity=plan.severity)
    return result


def _logits(model: nn.Module, images: torch.Tensor, state) -> torch.Tensor:
    if state.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = state.amp_dtype or torch.bfloat16
    with torch.autocast(state.device.type, dtype=dtype, enabled=state.amp_dtype is not None):
        logits = model(images).float()
        if getattr(state, "eval_flip", False):  # as engine.evaluate: the mirror's logits averaged in
            logits = (logits + model(images.flip(3)).float()) / 2
    return logits


def evaluate_splits(
    model: nn.Module, classes: list[str], splits: list[Path], data_cfg, state, rank=0, world_size=1
) -> list[dict]:
    """score_split over each of `splits` (plans checked before any is read), one loader at a time."""
    plans = [plan_split(split, classes) for split in splits]
    results = []
    for plan in plans:
        with split_loader(
            data_cfg, plan.dir, rank=rank, world_size=world_size, device=state.device
        ) as loader:
            results.append(score_split(model, loader, plan, state, rank, world_size))
    return results


def alexnet_errors() -> dict[str, float]:
    """AlexNet's ImageNet-C top-1 error per corruption, averaged over the 5 severities."""
    return json.loads(ALEXNET.read_text())["errors"]


def corruption_errors(results: list[dict]) -> dict | None:
    """ImageNet-C's summary of the results that carry a corruption: CE per corruption (its error over
    the severities evaluated, relative to AlexNet's) and their mean, mCE; None when there are none."""
    by_corruption: dict[str, list[float]] = {}
    for r in results:
        if r.get("corruption") is not None:
            by_corruption.setdefault(r["corruption"], []).append(1 - r["top1"])
    if not by_corruption:
        return None
    alexnet = alexnet_errors()
    unknown = sorted(set(by_corruption) - set(alexnet))
    if unknown:
        raise UserError(
            f"ImageNet-C corruption {unknown[0]!r} has no AlexNet error: known are {', '.join(alexnet)}"
        )
    # sum_s E_model / sum_s E_AlexNet, with AlexNet's per-severity errors known only as their mean.
    ce = {c: sum(errors) / len(errors) / alexnet[c] for c, errors in sorted(by_corruption.items())}
    return {
        "mce": sum(ce.values()) / len(ce),
        "corruptions": len(ce),
        "of": len(alexnet),
        "severities": {c: len(e) for c, e in sorted(by_corruption.items())},
        "ce": ce,
    }


def metric_keys(results: list[dict]) -> dict:
    """Flat metrics for metrics.jsonl and W&B: eval/<dataset>/top1, top5, real_top1; eval/<set>/mce."""
    flat = {}
    for r in results:
        flat[f"eval/{r['dataset']}/top1"] = r["top1"]
        flat[f"eval/{r['dataset']}/top5"] = r["top5"]
        if "real_top1" in r:
            flat[f"eval/{r['dataset']}/real_top1"] = r["real_top1"]
    c = corruption_errors(results)
    if c is not None:
        parent = next(r["dataset"].split("/")[0] for r in results if r.get("corruption"))
        flat[f"eval/{parent}/mce"] = c["mce"]
    return flat


def format_table(results: list[dict], corruptions: dict | None) -> str:
    """One row per split (ImageNet-C's splits: one row), for people."""
    header = ["dataset", "images", "top-1", "top-5", "ReaL top-1", "mCE"]
    rows = []
    for r in results:
        if r.get("corruption") is not None:
            continue
        counted = f"{r['images']}" + (f" of {r['split_images']}" if r["images"] != r["split_images"] else "")
        real = f"{r['real_top1']:.2%} ({r['real_images']})" if "real_top1" in r else "-"
        rows.append([r["dataset"], counted, f"{r['top1']:.2%}", f"{r['top5']:.2%}", real, "-"])
    if corruptions is not None:
        c_results = [r for r in results if r.get("corruption") is not None]
        images = sum(r["images"] for r in c_results)
        top1 = sum(r["top1"] * r["images"] for r in c_results) / max(images, 1)
        top5 = sum(r["top5"] * r["images"] for r in c_results) / max(images, 1)
        parent = c_results[0]["dataset"].split("/")[0]
        share = f" ({corruptions['corruptions']} of {corruptions['of']} corruptions)"
        name = f"{parent}: {len(c_results)} splits" + (
            share if corruptions["corruptions"] < corruptions["of"] else ""
        )
        rows.append([name, str(images), f"{top1:.2%}", f"{top5:.2%}", "-", f"{corruptions['mce']:.2%}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]]) + "\n"


class OnnxModule(nn.Module):
    """An exported model (predict.py --model) as a module of the loaders' normalized images: they are
    turned back into the uint8 pixels the ONNX graph takes (exact: the normalization is affine and
    its float32 error is far below half a level)."""

    def __init__(self, session):
        super().__init__()
        from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD

        self.session = session
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("scale", (std * 255).float(), persistent=False)
        self.register_buffer("mean", (mean * 255).float(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float().cpu() * self.scale + self.mean).round().clamp(0, 255).to(torch.uint8)
        [logits] = self.session.run(["logits"], {"images": pixels.contiguous().numpy()})
        return torch.from_numpy(logits).to(images.device)


def evaluate_suite(clf, splits: list[Path], *, backend="torch", batch_size=64, workers=2, env=None) -> dict:
    """predict.py --evaluate: a Classifier's (or an OnnxClassifier's) results on `splits`, with the
    loaders of training set to its eval transform; `env` (dist.DistEnv) for a torchrun run."""
    from imagenet_ddp.data import DataConfig

    rank, world_size = (env.rank, env.world_size) if env is not None else (0, 1)
    onnx = hasattr(clf, "session")
    model = OnnxModule(clf.session) if onnx else clf.model
    data_cfg = DataConfig(
        backend=backend,
        eval_size=clf.crop,
        eval_resize_size=clf.resize,
        interpolation=clf.interpolation.value,
        batch_size=batch_size,
        workers=workers,
        channels_last=clf.channels_last,
    )
    results = evaluate_splits(model, clf.classes, splits, data_cfg, clf, rank, world_size)
    return {
        "runtime": getattr(clf, "runtime", f"torch {torch.__version__}"),
        "backend": backend,
        "precision": clf.precision,
        "world_size": world_size,
        "model_classes": len(clf.classes),
        "splits": results,
        "imagenet_c": corruption_errors(results),
    }


def save_results(report: dict, source: str | Path) -> Path | None:
    """`report` as JSON next to the checkpoint or model it evaluated (best.pt -> best.eval.json);
    None, with a warning, when that folder cannot be written."""
    import os
    import sys
    import time

    path = Path(source).with_suffix(".eval.json")
    record = {"source": str(source), "time": round(time.time(), 3), **report}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(
            f"predict.py: warning: cannot write {path} ({e.strerror or e}): results only printed",
            file=sys.stderr,
        )
        return None
    return path
