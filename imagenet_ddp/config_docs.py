"""The configuration reference, docs/config.md, generated from the schema in config.py.

    python -m imagenet_ddp.config_docs > docs/config.md      # regenerate after changing the schema
    python -m imagenet_ddp.config_docs --check docs/config.md   # exit 1 when the file is out of date

One source: each key's type and default come from the dataclasses, its meaning from the comment
written beside the field (on the field's own lines, else the comment block just above it),
and its range from the start-up checks' own messages ("optim.momentum must be in [0, 1)"), so the
reference changes when the code does. A key without a comment is an error here and in the tests.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import tokenize
import types
import typing
from functools import cache
from pathlib import Path
from typing import Literal

from imagenet_ddp import config
from imagenet_ddp.data import DataConfig as LoaderConfig

SECTIONS = ("data", "model", "train", "optim", "run", "logging", "derived")
# The data section is built from the loaders' DataConfig (config._data_section): its comments are there.
_SOURCE_CLASS = {"data": LoaderConfig}
_CHECKED_MODULES = (config, sys.modules[LoaderConfig.__module__])
_KEY = r"(?:data|model|train|optim|run|logging)\.\w+"
_RULE = re.compile(
    rf"(?P<keys>{_KEY}(?: and {_KEY})*) (?:must be|is a (?:probability|share|bin)) "
    r"(?P<rule>in [\[(][^\])]*[\])]|>= ?-?[\d.]+|> ?-?[\d.]+|at least \d+|0 or more|0 \(off\) or more)"
)

HEADER = """\
# Configuration reference

Every key of a recipe YAML (`configs/*.yaml`) and of a `section.key=value` override on the
`train_ddp.py` command line. Unknown keys and values of the wrong type are refused at start-up, with
the closest valid key. The `derived` section is computed at start-up from the others and written to
the run folder's `config.yaml`; it cannot be set.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml \\
        train.epochs=40 optim.lr=0.5 run.dir=runs/r50-40ep

This page is generated from the schema (`imagenet_ddp/config.py`, and `imagenet_ddp/data/__init__.py`
for the `data` section): edit the comments there and run
`python -m imagenet_ddp.config_docs > docs/config.md`. "Allowed" lists the choices, or the range the
start-up checks enforce; other rules between keys are in [training and config](training.md).
"""


def _section_class(section: str) -> type:
    return _SOURCE_CLASS.get(section) or typing.get_type_hints(config.Config)[section]


@cache
def _comments(path: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def descriptions(cls: type) -> dict[str, str]:
    """Field name -> its comment: the one on the field's own lines, else the block just above it."""
    path = inspect.getsourcefile(cls)
    source = Path(path).read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = _comments(path)
    node = next(
        n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__
    )
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        # A field with its own comment is described by it; a block above it then speaks for a group.
        out[stmt.target.id] = " ".join(c for c in beside or above if c)
    return out


@cache
def rules() -> dict[str, str]:
    """'section.key' -> the range its start-up check states, read from the checks' messages."""
    out: dict[str, str] = {}
    for module in _CHECKED_MODULES:
        text = Path(inspect.getsourcefile(module)).read_text(encoding="utf-8")

        def constant(m: re.Match, module=module) -> str:
            value = getattr(module, m.group(1), None)
            return str(value) if isinstance(value, int | float) else m.group(0)

        text = re.sub(r"\{([A-Z_]+)\}", constant, text)  # f-string placeholders of module constants
        for m in _RULE.finditer(text):
            if "{" in m.group("rule"):  # a bound computed elsewhere: the meaning says it
                continue
            for key in m.group("keys").split(" and "):
                out.setdefault(key, m.group("rule"))
    return out


def _type(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is Literal:
        return type(args[0]).__name__
    if origin is list:
        return f"list[{_type(args[0])}]"
    return tp.__name__


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return repr(value)


def _allowed(tp, dotted: str) -> str:
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    choices = [c for t in options if typing.get_origin(t) is Literal for c in typing.get_args(t)]
    if choices:
        return ", ".join(_value(c) for c in choices)
    return rules().get(dotted, "")


def keys() -> list[dict[str, str]]:
    """One row per key of every section: section, key, type, default, allowed, meaning."""
    rows = []
    for section in SECTIONS:
        cls = typing.get_type_hints(config.Config)[section]
        hints, meaning = typing.get_type_hints(cls), descriptions(_section_class(section))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append(
                dict(
                    section=section,
                    key=f.name,
                    type=_type(hints[f.name]),
                    default="computed" if section == "derived" else _value(default),
                    allowed=_allowed(hints[f.name], f"{section}.{f.name}"),
                    meaning=meaning.get(f.name, ""),
                )
            )
    return rows


def undescribed() -> list[str]:
    return [f"{r['section']}.{r['key']}" for r in keys() if not r["meaning"]]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def render() -> str:
    rows = keys()
    out = [HEADER]
    for section in SECTIONS:
        doc = (_section_class(section).__doc__ or "").strip() if section == "derived" else ""
        out += [f"## {section}", ""] + ([doc, ""] if doc else [])
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for r in rows:
            if r["section"] == section:
                cells = [
                    f"`{section}.{r['key']}`",
                    r["type"],
                    f"`{r['default']}`",
                    r["allowed"],
                    r["meaning"],
                ]
                out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagenet_ddp.config_docs", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check", metavar="PATH", help="exit 1 when PATH differs from the generated reference"
    )
    args = parser.parse_args(argv)
    missing = undescribed()
    if missing:
        print(
            f"{parser.prog}: error: keys without a comment in the schema: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 1
    text = render()
    if args.check:
        path = Path(args.check)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date: run python -m imagenet_ddp.config_docs > {path}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
