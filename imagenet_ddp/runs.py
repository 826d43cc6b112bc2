"""Compare training runs from their folders alone (config.yaml, metrics.jsonl, status.json): no W&B
account, no network, works on a cluster's login node.

    python -m imagenet_ddp.runs compare runs/a runs/b runs/c                  # a table
    python -m imagenet_ddp.runs compare runs/* --format csv                   # or json
    python -m imagenet_ddp.runs compare runs/* --out report.html --anchor ffcv-rn50   # or a .png
    python -m imagenet_ddp.runs list runs/                                    # every run below runs/

The table has one row per run: its name, recipe, the config keys whose values differ between the
runs (only those), epochs done/total, best and final val top-1/top-5, the wall-clock hours to reach
--target top-1, images/s, device-hours (training time x world size) and status: finished, running,
stopped (for a requeue) or crashed. A folder that is not a run, or a damaged metrics line, gets one
line on stderr and the other runs are compared. --anchor overlays a published recipe's (epochs,
top-1) and (minutes, top-1) points, shipped with their sources in anchors_data/anchors.json.
Exit status: 0, or 2 when no folder given is a run.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imagenet_ddp.config import recipe_name
from imagenet_ddp.errors import ArgumentParser, UserError

ANCHORS = Path(__file__).with_name("anchors_data") / "anchors.json"
# Keys that say where a run lives or logs, not what it trains: never "a difference" between runs.
NOT_COMPARED = ("run.dir", "run.name", "run.resume", "logging.", "derived.recipe", "derived.overrides")
STALE_S = 3600  # a "running" run whose status has not moved for this long is shown as "running?"


@dataclass
class Run:
    dir: Path
    name: str
    recipe: str
    config: dict  # flattened: {"train.epochs": 90, ...}
    metrics: list[dict]
    state: str
    notes: list[str] = field(default_factory=list)
    hours: float = 0.0  # wall-clock hours of all sessions (status.json), a cut-short epoch included

    @property
    def epochs(self) -> int:
        return int(self.config.get("train.epochs", 0))

    def best(self, key: str) -> float | None:
        values = [m[key] for m in self.metrics if key in m]
        return max(values) if values else None

    def final(self, key: str) -> float | None:
        values = [m[key] for m in self.metrics if key in m]
        return values[-1] if values else None

    def hours_to(self, top1: float) -> float | None:
        for m, hours in zip(self.metrics, self.record_hours(), strict=True):
            if m.get("val_top1", -1) >= top1:
                return hours
        return None

    def record_hours(self) -> list[float]:
        """Wall-clock hours at each record (runs from before `hours` was logged: training time)."""
        hours, out = 0.0, []
        for m in self.metrics:
            hours = m.get("hours", hours + m.get("epoch_seconds", 0.0) / 3600)
            out.append(hours)
        return out

    @property
    def images_per_sec(self) -> float | None:
        rates = sorted(m["images_per_sec"] for m in self.metrics if "images_per_sec" in m)
        return rates[len(rates) // 2] if rates else None

    @property
    def device_hours(self) -> float:
        """Hours x devices, each stretch at the world size it ran with; the time after the last
        record (a stopped or running epoch) at the current one."""
        world = int(self.config.get("derived.world_size", 1))
        total = previous = 0.0
        for m, hours in zip(self.metrics, self.record_hours(), strict=True):
            total += (hours - previous) * int(m.get("world_size", world))
            previous = hours
        return total + max(0.0, self.hours - previous) * world


# metrics.jsonl values that compare and list compute with: a line where one is not a number is skipped.
_NUMERIC = ("step", "val_top1", "val_top5", "val_top1_ema", "val_top5_ema", "train_loss", "hours")


def _changes(path: Path, notes: list[str]) -> dict:
    """Settings changed on resume (train_ddp.py appends them to config-changes.jsonl): the newest
    value of each, over config.yaml's original."""
    newest: dict = {}
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines() if path.is_file() else []
    except OSError:
        lines = []
    for number, line in enumerate(lines, 1):
        try:
            newest.update({k: v["to"] for k, v in json.loads(line)["changes"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            notes.append(f"{path}: line {number} is damaged: ignored")
    return newest


def read_run(folder: str | Path) -> Run:
    """A run folder, or UserError saying in one line why it is not one."""
    folder = Path(folder)
    config_path = folder / "config.yaml"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if not config_path.is_file():
        raise UserError(f"{folder}: not a run folder (no config.yaml; train_ddp.py writes one in run.dir)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
        flat = {f"{s}.{k}": v for s, values in config.items() for k, v in (values or {}).items()}
    except (yaml.YAMLError, AttributeError, OSError, ValueError) as e:
        raise UserError(f"{config_path}: not a config written by train_ddp.py ({type(e).__name__})") from None
    notes, metrics = [], []
    flat.update(_changes(folder / "config-changes.jsonl", notes))
    path = folder / "metrics.jsonl"
    try:  # a stray byte spoils one line, not the file
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines() if path.is_file() else []
    except OSError as e:
        lines, _ = [], notes.append(f"{path}: cannot read it ({e.strerror}): ignored")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            wrong = [k for k in _NUMERIC if k in record and not isinstance(record[k], int | float)]
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int) or wrong:
                raise ValueError(f"{', '.join(wrong) or 'epoch'} is not a number")
            metrics.append(record)
        except (ValueError, TypeError, AttributeError) as e:
            # A kill mid-write cuts the last line short; anything else is damage.
            cut = (
                isinstance(e, json.JSONDecodeError)
                and number == len(lines)
                and not line.rstrip().endswith("}")
            )
            reason = f" ({e})" if "not a number" in str(e) else ""
            notes.append(
                f"{path}: {'its last line is truncated' if cut else f'line {number} is damaged'}{reason}: ignored"
            )
    derived = config.get("derived") or {}
    recipe = recipe_name(derived["recipe"]) if "recipe" in derived else "?"  # "?": written before it was kept
    name = (config.get("run") or {}).get("name") or folder.name
    try:
        status = json.loads((folder / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    if not isinstance(status, dict) or not isinstance(status.get("hours", 0.0), int | float):
        notes.append(f"{folder / 'status.json'}: not one train_ddp.py wrote: ignored")
        status = {}
    hours = float(status.get("hours") or 0.0)
    return Run(folder, name, recipe, flat, metrics, _state(status, metrics, flat), notes, hours)


def _state(status: dict, metrics: list[dict], config: dict) -> str:
    state = status.get("state")
    done = metrics[-1]["epoch"] if metrics else 0
    if state is None:  # a run made before status.json: its metrics alone tell whether it ended
        return "finished" if done >= int(config.get("train.epochs", 0)) else "unknown"
    if state == "running" and time.time() - status.get("updated", 0) > STALE_S:
        return "running?"  # or killed without a word (SIGKILL, a node lost)
    return state


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config})
    compared = [k for k in keys if not k.startswith(NOT_COMPARED)]
    if len(runs) < 2:
        return []
    return [k for k in compared if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


_EVAL_COLUMNS = {"/top1": "top-1", "/real_top1": "ReaL top-1", "/mce": "mCE"}


def eval_columns(runs: list[Run]) -> list[tuple[str, str]]:
    """(metrics key, column) of val's ReaL top-1 and of the extra evaluation sets any run logged
    (data.extra_eval): their top-1, ReaL top-1 and ImageNet-C mCE, e.g. ("eval/imagenet-r/val/top1",
    "imagenet-r/val top-1")."""
    keys = sorted({k for r in runs for m in r.metrics for k in m if k.startswith("eval/")})
    real = (
        [("val_real_top1", "final ReaL top-1")]
        if any(r.best("val_real_top1") is not None for r in runs)
        else []
    )
    return real + [
        (k, f"{k[5:].removesuffix(end)} {name}")
        for k in keys
        for end, name in _EVAL_COLUMNS.items()
        if k.endswith(end)
    ]


def rows(runs: list[Run], target: float) -> tuple[list[str], list[list]]:
    keys, evals = differing_keys(runs), eval_columns(runs)
    header = ["run", "recipe", *keys, "epochs", "best top-1", "final top-1", "best top-5", "final top-5"]
    header += [column for _, column in evals]
    header += [f"hours to {target:.1%}", "img/s", "device-hours", "status"]
    table = []
    for r in runs:
        done = r.metrics[-1]["epoch"] if r.metrics else 0
        table.append(
            [r.name, r.recipe, *(r.config.get(k) for k in keys), f"{done}/{r.epochs}"]
            + [r.best("val_top1"), r.final("val_top1"), r.best("val_top5"), r.final("val_top5")]
            + [r.final(key) for key, _ in evals]
            + [r.hours_to(target), r.images_per_sec, r.device_hours, r.state]
        )
    return header, table


def _cell(value, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and ("top-" in column or column.endswith("mCE")):
        return f"{value:.2%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(header: list[str], table: list[list]) -> str:
    cells = [header] + [[_cell(v, h) for v, h in zip(row, header, strict=True)] for row in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]]) + "\n"


def load_anchor(name: str) -> dict:
    anchors = json.loads(ANCHORS.read_text())
    if name not in anchors:
        raise UserError(f"--anchor {name}: unknown; known: {', '.join(anchors)}")
    return anchors[name]


def published_suite(anchor: dict) -> str | None:
    """The anchor's published figures beyond val (ReaL, ImageNet-V2, -Sketch, -R, -A), one line."""
    suite = anchor.get("suite")
    if not suite:
        return None
    figures = ", ".join(f"{name} {value:.2%}" for name, value in suite["top1"].items())
    figures += "".join(f", {missing.split(':')[0]} not found" for missing in suite.get("not_found", []))
    sources = suite["source"]
    if "mce" in suite:
        figures += f"; ImageNet-C mCE {suite['mce']:.1%}"
        sources += f"; mCE: {suite['mce_source']}"
    return f"published top-1 of {anchor['title']}: {figures} ({sources})"


def plot(runs: list[Run], anchor: dict | None):
    """A matplotlib figure: val top-1 against epoch and against wall-clock hours, train loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time, loss) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for r in runs:
        epochs = [m["epoch"] for m in r.metrics if "val_top1" in m]
        top1 = [100 * m["val_top1"] for m in r.metrics if "val_top1" in m]
        hours = [h for m, h in zip(r.metrics, r.record_hours(), strict=True) if "val_top1" in m]
        label = f"{r.name} ({r.state})"
        by_epoch.plot(epochs, top1, marker="o", markersize=3, label=label)
        by_time.plot(hours, top1, marker="o", markersize=3, label=label)
        loss.plot(
            [m["epoch"] for m in r.metrics],
            [m["train_loss"] for m in r.metrics],
            marker="o",
            markersize=3,
            label=label,
        )
    if anchor:
        for p in anchor["points"]:  # a published figure without a schedule: a level to reach
            if "epochs" not in p:
                by_epoch.axhline(100 * p["top1"], color="k", linestyle=":", label=anchor["title"])
        points = [p for p in anchor["points"] if "epochs" in p]
        by_epoch.plot(
            [p["epochs"] for p in points], [100 * p["top1"] for p in points], "k*--", label=anchor["title"]
        )
        timed = [p for p in points if "minutes" in p]
        if timed:
            by_time.plot(
                [p["minutes"] / 60 for p in timed],
                [100 * p["top1"] for p in timed],
                "k*--",
                label=anchor["title"],
            )
    for ax, (x, y) in zip(
        (by_epoch, by_time, loss),
        (
            ("epoch", "val top-1 (%)"),
            ("wall-clock hours (all sessions)", "val top-1 (%)"),
            ("epoch", "train loss"),
        ),
        strict=True,
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=8)
    return fig


def write_report(path: Path, runs: list[Run], header, table, anchor: dict | None, notes: list[str]) -> None:
    """A .png of the plots, or one self-contained .html with the table and the plots."""
    fig = plot(runs, anchor)
    if path.suffix.lower() == ".png":
        fig.savefig(path, dpi=110)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    image = base64.b64encode(buf.getvalue()).decode()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_cell(v, h))}</td>" for v, h in zip(row, header, strict=True))
        + "</tr>"
        for row in table
    )
    source = (
        f"<p>Anchor: {html.escape(anchor['title'])} ({html.escape(anchor['source'])})</p>" if anchor else ""
    )
    if anchor and published_suite(anchor):
        source += f"<p id='suite'>{html.escape(published_suite(anchor))}</p>"
    remarks = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>imagenet-ddp runs</title><style>"
        "body{font:14px sans-serif;margin:1.5em} table{border-collapse:collapse} "
        "td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left} th{background:#eee} img{max-width:100%}"
        f"</style></head><body><h1>Runs compared</h1><table id='runs'><tr>{head}</tr>{body}</table>{source}"
        f"<ul>{remarks}</ul><img id='plot' alt='val top-1 and train loss' src='data:image/png;base64,{image}'>"
        "</body></html>\n"
    )


def compare(args) -> int:
    runs, notes = [], []
    for folder in args.runs:
        try:
            run = read_run(folder)
        except UserError as e:
            notes.append(str(e))
            continue
        notes += run.notes
        runs.append(run)
    if not runs:  # one line, with the first reason
        more = f" (and {len(notes) - 1} more)" if len(notes) > 1 else ""
        raise UserError(f"none of the folders given is a run: {notes[0]}{more}")
    for note in notes:
        print(f"runs: {note}", file=sys.stderr)
    anchor = load_anchor(args.anchor) if args.anchor else None
    best = [r.best("val_top1") for r in runs if r.best("val_top1") is not None]
    target = args.target if args.target is not None else (math.floor(100 * min(best)) / 100 if best else 0.5)
    header, table = rows(runs, target)
    if args.format == "json":
        print(json.dumps([dict(zip(header, row, strict=True)) for row in table]))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerows([header, *table])
    else:
        print(format_table(header, table), end="")
        if anchor and published_suite(anchor):
            print(published_suite(anchor))
    if args.out:
        try:
            write_report(Path(args.out), runs, header, table, anchor, notes)
        except OSError as e:
            raise UserError(f"cannot write {args.out}: {e.strerror or e}") from None
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def list_runs(args) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    found = sorted(
        p.parent
        for p in root.rglob("config.yaml")
        if (p.parent / "metrics.jsonl").exists() or (p.parent / "status.json").exists()
    )
    for folder in found:
        try:
            run = read_run(folder)
        except UserError as e:
            print(f"runs: warning: {e}: skipped", file=sys.stderr)
            continue
        for note in run.notes:
            print(f"runs: warning: {note}", file=sys.stderr)
        done = run.metrics[-1]["epoch"] if run.metrics else 0
        best = run.best("val_top1")
        print(f"{folder}  {run.state}  epoch {done}/{run.epochs}  best top-1 {_cell(best, 'top-1')}")
        offline = sorted((folder / "wandb").glob("offline-run-*"))
        if offline:
            print(f"    wandb sync {' '.join(str(p) for p in offline)}")
    if not found:
        print(f"no run folders below {root}")
    return 0


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="python -m imagenet_ddp.runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="a table (and plots) of runs")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--format", choices=("table", "csv", "json"), default="table")
    c.add_argument("--out", help="report.html (table and plots) or plots.png")
    c.add_argument(
        "--anchor", help=f"overlay a published recipe: {', '.join(json.loads(ANCHORS.read_text()))}"
    )
    c.add_argument(
        "--target", type=float, help="val top-1 (0-1) for the hours-to column (default: the lowest best)"
    )
    ls = sub.add_parser("list", help="every run folder below DIR")
    ls.add_argument("dir", nargs="?", default="runs")
    args = p.parse_args(argv)
    if args.command == "compare" and args.out and Path(args.out).suffix.lower() not in (".html", ".png"):
        p.error("--out must end in .html or .png")
    if args.command == "compare" and args.out and not Path(args.out).resolve().parent.is_dir():
        p.error(f"--out {args.out}: folder {Path(args.out).parent} does not exist")
    if args.command == "compare" and args.target is not None and not 0 < args.target <= 1:
        p.error(f"--target {args.target}: a val top-1 is a fraction in (0, 1], e.g. 0.75")
    try:
        return compare(args) if args.command == "compare" else list_runs(args)
    except UserError as e:
        print(f"runs: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # a bug: the traceback follows this line
        print(f"runs: unexpected error while running runs {args.command} (traceback below)", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
