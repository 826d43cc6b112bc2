"""The report of `python -m imagenet_ddp.bench gpu`: DIR/gpu.json and the README's markdown table.

    python -m imagenet_ddp.bench gpu --out runs/bench-gpu     # writes runs/bench-gpu/gpu.json

gpu.json: the machine and versions, the settings, the generated shards, `checks` (name: status,
detail), `rows` (one per measurement, every row with the keys of ROW_KEYS: None where they do not
apply; status ok, skipped or failed, with `reason` for the last two), `goals` (the issue's targets,
`met` None where not judged) and `markdown`, the table printed at the end.

A row: `kind` train, decode or ddp; what was measured (model, size, batch_size, precision, compile,
feed; decoder for decode rows); `img_per_s` over `steps` timed steps (decode: batches' worth of
images); `ratio` of img_per_s to row `ratio_to` (a feed or DDP against synthetic data on the same
model, nvJPEG against the CPU); `compile_s` on the row that compiled; `peak_mem_gib`
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
    "id", "kind", "model", "size", "batch_size", "precision", "compile", "feed", "decoder",
    "status", "reason", "img_per_s", "ratio", "ratio_to", "steps", "compile_s", "peak_mem_gib",
    "estimate_s", "wall_s", "detail",
)  # fmt: skip
GOAL_IMG_PER_S, GOAL_FRACTION = 3000, 0.90  # the issue's goals for ResNet-50 fed by nvJPEG, on one H100


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


def goals(rows: list[dict], device: torch.device) -> list[dict]:
    """The issue's goals for ResNet-50 at 224 px in bf16 fed by the torch backend's nvJPEG path."""
    fed = [
        r
        for r in rows
        if r["status"] == "ok" and r["kind"] == "train" and r["feed"] == "torch-device"
        and (r["model"], r["size"], r["precision"]) == ("resnet50", 224, "bf16")
    ]  # fmt: skip
    best = max(fed, key=lambda r: r["img_per_s"], default=None)
    judge = device.type == "cuda" and best is not None
    rate, ratio = (best["img_per_s"], best["ratio"]) if best else (None, None)
    what = "ResNet-50 224 px bf16 channels_last fed by the torch backend with nvJPEG"
    return [
        {"goal": f"{what}: img/s", "target": GOAL_IMG_PER_S, "value": rate, "row": best and best["id"],
         "met": rate >= GOAL_IMG_PER_S if judge else None},
        {"goal": f"{what}: fraction of synthetic", "target": GOAL_FRACTION, "value": ratio,
         "row": best and best["id"], "met": ratio >= GOAL_FRACTION if judge and ratio is not None else None},
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
        feed = names[r["feed"]] + (" under DDP (1 process)" if r["kind"] == "ddp" else "")
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
    lines += [f"- failed: {r['id']}: {r['reason']}" for r in rows if r["status"] == "failed"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines.append(f"- skipped ({len(skipped)}, reasons in gpu.json): " + "; ".join(map(_short, skipped)))
    lines.append("- checks: " + ", ".join(f"{name} {c['status']}" for name, c in report["checks"].items()))
    for g in report["goals"]:
        met = {True: "met", False: "NOT met", None: "not judged (needs the GPU and the row)"}[g["met"]]
        value = "not measured" if g["value"] is None else _num(g["value"], 2 if g["value"] < 10 else 0)
        lines.append(f"- goal: {g['goal']} >= {g['target']}: {value}, {met}")
    return "\n".join(lines)


def _short(r: dict) -> str:
    return r["id"].removeprefix("train ") + (" (budget)" if "budget" in r["reason"] else f" ({r['reason']})")


def _num(x, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}"
