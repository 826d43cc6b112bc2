"""The report of `python -m imagenet_ddp.bench gpu`: DIR/gpu.json and the README's markdown table.

    python -m imagenet_ddp.bench gpu --out runs/bench-gpu     # writes runs/bench-gpu/gpu.json

gpu.json: the machine and versions, the settings, the generated shards, `checks` (name: status,
detail; sync_audit also `syncs`, the lines of those found), `rows` (one per measurement, every row with the keys of ROW_KEYS: None where they do not
apply; status ok, skipped or failed, with `reason` for the last two), `goals` (the issue's targets,
`met` None where not judged) and `markdown`, the table printed at the end.

A row: `kind` train, decode or ddp (DistributedDataParallel on one process: the wrapper's overhead,
not scaling); what was measured (model, size, batch_size, precision, compile, feed, auto_augment;
decoder for decode rows); `img_per_s` over `steps` timed steps, one batch each (decode: batches'
worth of images), after `warmup_batches` untimed, over `passes` loader passes; `prepared_ahead`,
the batches the loader could hold ready when the clock started (a loader row times at least
--hold = 11x its warm-up: gpu_throughput.py's warm-up rule); `ratio` of img_per_s to row `ratio_to` (a feed or
DDP against synthetic data on the same model, nvJPEG against the CPU); `compile_s` on the row that compiled; `peak_mem_gib`
(torch.cuda.max_memory_allocated, None on CPU); `estimate_s` (what the scheduler expected) and
`wall_s` (what it took); `detail`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from imagenet_ddp.bench import cpu_name

ROW_KEYS = (
    "id", "kind", "model", "size", "batch_size", "precision", "compile", "feed", "auto_augment",
    "decoder", "status", "reason", "img_per_s", "ratio", "ratio_to", "steps", "warmup_batches",
    "prepared_ahead", "passes", "compile_s", "peak_mem_gib", "estimate_s", "wall_s", "detail",
)  # fmt: skip
# The goals for ResNet-50 at 224 px bf16 channels_last fed by device decode (nvJPEG), on one H100.
GOAL_IMG_PER_S, GOAL_FRACTION, GOAL_FRACTION_TA_WIDE = 3000, 0.90, 0.80


def header(args, device: torch.device) -> dict:
    import torchvision

    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "budget_s": round(args.minutes * 60, 1),
        "elapsed_s": 0.0,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "device", "minutes")},
        "shards": {},
        "checks": {},
        "rows": [],
        "goals": [],
        "markdown": "",
    }


def write(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def compare(rows: list[dict]) -> None:
    """Each real feed against synthetic data on the same model, the DDP step against the plain one,
    nvJPEG against the CPU decoder: `ratio` of img/s to row `ratio_to`."""
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["kind"] == "train" and r["feed"] != "synthetic" or r["kind"] == "ddp":
            how = "compiled" if r["compile"] else "eager"
            base = f"train {r['model']} {r['size']}px b{r['batch_size']} {r['precision']} {how} synthetic"
        elif r["kind"] == "decode" and r["decoder"] == "nvjpeg":
            base = f"decode cpu b{r['batch_size']}"
        else:
            continue
        if r["id"] in ok and base in ok:
            r["ratio"], r["ratio_to"] = round(r["img_per_s"] / ok[base]["img_per_s"], 3), base


def goals(rows: list[dict], checks: dict, device: torch.device) -> list[dict]:
    """The targets for ResNet-50 at 224 px in bf16 (channels_last) fed by the torch backend's device
    decode: img/s and its fraction of synthetic data, the fraction with ta_wide, and no host sync in
    the audit. `met` is judged on a GPU only (None elsewhere, or without the row)."""
    gpu = device.type == "cuda"

    def best(policy: str):
        fed = [
            r
            for r in rows
            if r["status"] == "ok" and r["kind"] == "train" and r["feed"] == "torch-device"
            and r["auto_augment"] == policy and (r["model"], r["size"], r["precision"]) == ("resnet50", 224, "bf16")
        ]  # fmt: skip
        return max(fed, key=lambda r: r["img_per_s"], default=None)

    def goal(what: str, target, row, key: str) -> dict:
        value = row[key] if row else None
        met = value >= target if gpu and value is not None else None
        return {"goal": what, "target": target, "value": value, "row": row and row["id"], "met": met}

    plain, ta_wide = best("none"), best("ta_wide")
    what = "ResNet-50 224 px bf16 channels_last fed by the torch backend with nvJPEG"
    audit = checks.get("sync_audit", {})
    syncs = audit.get("syncs")
    return [
        goal(f"{what}: img/s", GOAL_IMG_PER_S, plain, "img_per_s"),
        goal(f"{what}: fraction of synthetic", GOAL_FRACTION, plain, "ratio"),
        goal(f"{what} and ta_wide: fraction of synthetic", GOAL_FRACTION_TA_WIDE, ta_wide, "ratio"),
        {"goal": "host syncs in the sync audit (the V2 recipe's step)", "target": 0,
         "value": None if syncs is None else len(syncs), "row": "check sync_audit" if audit else None,
         "met": len(syncs) == 0 if gpu and syncs is not None else None},
    ]  # fmt: skip


FEED_NAMES = {
    "synthetic": "synthetic",
    "torch-device": "torch, nvJPEG",
    "torch-workers": "torch, CPU workers",
    "dali": "DALI",
}


def markdown(report: dict) -> str:
    """The README's tables: training rows measured (failed ones say so), decoders; then what was
    skipped, the checks and the goals."""
    names = dict(FEED_NAMES)
    if report["device_type"] == "cpu":
        names["torch-device"] = "torch, CPU stand-in decode"
    rows, shards = report["rows"], report["shards"]
    lines = [
        f"**{report['device']}**, torch {report['torch']}, torchvision {report['torchvision']}"
        + (f", CUDA {report['cuda']}" if report["cuda"] else "")
        + f", {report['cpu_cores']} CPU cores; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget."
    ]
    if shards.get("images"):
        w, h = shards["width_height"]
        lines[0] += (
            f" Loaders read {shards['images']} generated JPEGs ({w}x{h}, {shards['mean_kb']} KB average)."
        )
    train = [r for r in rows if r["kind"] in ("train", "ddp") and r["status"] != "skipped"]
    if train:
        lines += [
            "",
            "| model | px | batch | precision | compile | fed by | img/s | vs synthetic | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for r in train:
        feed = names[r["feed"]] + (
            f" + {r['auto_augment']}" if r["auto_augment"] not in (None, "none") else ""
        )
        if r["kind"] == "ddp":
            feed += ", DDP on 1 process: wrapper overhead, not scaling"
        rate = _num(r["img_per_s"]) if r["status"] == "ok" else "failed"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch_size']} | {r['precision']} | "
            f"{'on' if r['compile'] else 'off'} | {feed} | {rate} | {_ratio(r['ratio'])} | "
            f"{_num(r['peak_mem_gib'], 1)} |"
        )
    decode = [r for r in rows if r["kind"] == "decode" and r["status"] == "ok"]
    if decode:
        lines += ["", "| decoder | batch | img/s | vs CPU |", "|---|---|---|---|"]
    for r in decode:
        lines.append(f"| {r['detail']} | {r['batch_size']} | {_num(r['img_per_s'])} | {_ratio(r['ratio'])} |")
    lines.append("")
    hold = report["settings"].get("hold")
    if hold and any(r["prepared_ahead"] for r in train):
        lines.append(
            "- loader rows: the clock starts after the batches the loader can hold prepared (workers x"
            f" prefetch, the decode queue) and runs over at least {hold}x as many"
            + (": those are under 10% of it" if hold > 10 else f": those are up to {1 / hold:.0%} of it")
        )
    lines += [f"- failed: {r['id']}: {r['reason']}" for r in rows if r["status"] == "failed"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines.append(f"- skipped ({len(skipped)}, reasons in gpu.json): " + "; ".join(map(_short, skipped)))
    lines.append("- checks: " + ", ".join(f"{name} {c['status']}" for name, c in report["checks"].items()))
    for g in report["goals"]:
        met = {True: "met", False: "NOT met", None: "not judged (needs the GPU and the row)"}[g["met"]]
        small = isinstance(g["value"], float) and g["value"] < 10
        value = "not measured" if g["value"] is None else _num(g["value"], 2 if small else 0)
        sign = "==" if g["target"] == 0 else ">="
        lines.append(f"- goal: {g['goal']} {sign} {g['target']}: {value}, {met}")
    return "\n".join(lines)


def _short(r: dict) -> str:
    return r["id"].removeprefix("train ") + (" (budget)" if "budget" in r["reason"] else f" ({r['reason']})")


def _num(x, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}"
