"""Sweeps: one training run per line of override lines (or per point of a grid), as a SLURM job array.

    python -m imagenet_ddp.sweep lines sweeps/lr.yaml              # a grid file's runs, one line each
    sbatch --array=0-2 slurm/sweep.sbatch configs/demo.yaml sweeps/lr.txt train.epochs=1
    python -m imagenet_ddp.runs compare runs/lr/*

A sweep file is either
- override lines (any name but .yaml/.yml): one run per line, its `section.key=value` overrides
  separated by spaces (shell quoting for values with spaces); `#` starts a comment; blank lines do
  not count. Task i of the array runs the i-th line (0-based);
- a grid (.yaml/.yml): a mapping of `section.key` to a list of values (a single value: the same for
  every run); the runs are every combination, the first key varying slowest.

`task` prints the overrides that array task i trains with, one per line (slurm/sweep.sbatch passes
them to train.sbatch): the sweep's shared overrides, then the line's, then
run.dir=<run.dir>/<sweep>/<i>-<short name> (run.dir among the shared overrides, else runs) and
logging.wandb_group=<sweep> unless the line sets them. The config is checked first: a bad line is a
one-line error naming the file and line, exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

from imagenet_ddp.errors import ArgumentParser, UserError

DEFAULT_PARENT = "runs"
SHORT_MAX = 48  # characters of the short name in a run folder's name


def read_lines(path: str | Path) -> list[tuple[int, list[str], str]]:
    """(line number, overrides, what is wrong with them or "") of each run of the sweep file `path`.

    A malformed line is returned with its error, not raised: it fails its own array task only."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read sweep file {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix in (".yaml", ".yml"):
        return [(0, overrides, "") for overrides in grid_lines(text, path)]
    runs = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            words, error = shlex.split(line, comments=True), ""
        except ValueError as e:
            words, error = [line.strip()], f"{e} in {line.strip()!r}"
        bad = [w for w in words if "=" not in w or "." not in w.split("=", 1)[0]]
        if bad and not error:
            error = f"{bad[0]!r} is not section.key=value (e.g. optim.lr=0.2)"
        if words:
            runs.append((number, words, error))
    if not runs:
        raise UserError(f"sweep file {path} lists no runs (one line of section.key=value overrides per run)")
    return runs


def grid_lines(text: str, path: Path) -> list[list[str]]:
    """Every combination of a grid's values, the first key varying slowest."""
    try:
        grid = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(grid, dict) or not grid:
        raise UserError(
            f"{path}: a grid is a mapping of section.key to a list of values, e.g. optim.lr: [0.1, 0.2]"
        )
    keys, choices = [], []
    for key, values in grid.items():
        if not isinstance(key, str) or "." not in key:
            raise UserError(f"{path}: {key!r} is not a section.key (e.g. optim.lr)")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{path}: {key} has no values")
        keys.append(key)
        choices.append(values)
    return [
        [f"{k}={_text(v)}" for k, v in zip(keys, point, strict=True)] for point in itertools.product(*choices)
    ]


def _text(value) -> str:
    """A YAML value as an override's text (the config parses it back as YAML)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # null, true/false, numbers and lists read back the same in YAML


def short_name(overrides: list[str]) -> str:
    """A folder-safe name from the overrides: `optim.lr=0.2 train.epochs=1` -> lr0.2-epochs1."""
    parts = [f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}{o.split('=', 1)[1]}" for o in overrides]
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts)).strip("_-.")
    return name[:SHORT_MAX].rstrip("_-.") or "run"


def task_overrides(
    path: str | Path, index: int, shared: list[str], sweep: str, recipe: str | None = None
) -> list[str]:
    """The overrides array task `index` trains with, checked against the recipe's config."""
    runs = read_lines(path)
    if not 0 <= index < len(runs):
        raise UserError(
            f"array task {index} of a sweep of {len(runs)} runs ({path}): submit with --array=0-{len(runs) - 1}"
        )
    number, line, error = runs[index]
    where = f"{path}:{number}" if number else f"{path} (run {index})"
    if error:
        raise UserError(f"{where}: {error}")
    keys = {o.split("=", 1)[0] for o in line}
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in shared}
    parent = given.get("run.dir", DEFAULT_PARENT)
    extra = [] if "run.dir" in keys else [f"run.dir={Path(parent) / sweep / f'{index}-{short_name(line)}'}"]
    extra += [] if "logging.wandb_group" in keys else [f"logging.wandb_group={sweep}"]
    overrides = [*shared, *line, *extra]
    from imagenet_ddp.config import load_config, validate

    try:
        validate(load_config(recipe, overrides))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return overrides


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="python -m imagenet_ddp.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("lines", help="the sweep's runs, one line of overrides each")
    ls.add_argument("file")
    t = sub.add_parser("task", help="the overrides of array task INDEX, one per line (options first)")
    t.add_argument("--recipe", help="the recipe the runs start from (checked with their overrides)")
    t.add_argument("--name", help="the sweep's name (default: the file's name without its extension)")
    t.add_argument("file")
    t.add_argument("index", help="the array task id (SLURM_ARRAY_TASK_ID)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value", help="shared by every run")
    args = p.parse_args(argv)
    try:
        if args.command == "lines":
            runs = read_lines(args.file)
            for number, _, error in runs:
                if error:
                    raise UserError(f"{args.file}:{number}: {error}")
            print("\n".join(shlex.join(line) for _, line, _ in runs))
            return 0
        if not args.index.isdigit():
            raise UserError(
                f"no array task id ({args.index!r}): submit slurm/sweep.sbatch as an array job, e.g. --array=0-2"
            )
        sweep = args.name or Path(args.file).stem
        print("\n".join(task_overrides(args.file, int(args.index), args.overrides, sweep, args.recipe)))
    except UserError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
