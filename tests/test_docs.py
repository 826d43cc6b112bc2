"""The docs cannot drift: their runnable commands run, and their links lead somewhere.

A fenced ```bash block preceded by the line `<!-- runnable -->` is run here, command by command,
in the order of PAGES, in one scratch folder that holds links to the repository's scripts and
recipes (so `runs/`, `shards/`, `data/` are the scratch folder's). Small sizes: after the command
that writes the demo digits, each class is cut to a few images, so that packing, one epoch of
training and predicting take seconds. W&B is off (WANDB_MODE=disabled).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages whose runnable blocks build on each other, in the order a user would run them.
PAGES = [
    "README.md",
    "docs/data.md",
    "docs/training.md",
    "docs/comparing-runs.md",
    "docs/predict.md",
    "docs/architecture.md",
]
LINKED = ("configs", "slurm", "docs", "make_shards.py", "train_ddp.py", "predict.py")
KEEP = {"train": 4, "val": 2, "test": 1}  # images per class after the demo data is written
MARK = "<!-- runnable -->"


def runnable_blocks(page: Path) -> list[tuple[int, str]]:
    """(line, command) for each command of each marked ```bash block; `\\` continuations joined."""
    lines, out = page.read_text(encoding="utf-8").splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", (
            f"{page}:{i + 1}: {MARK} before a non-bash block"
        )
        j, command, start = i + 2, "", i + 3
        while lines[j].strip() != "```":
            text = re.sub(r"\s+#.*$", "", lines[j]) if not lines[j].lstrip().startswith("#") else ""
            command += text.rstrip()
            if command.endswith("\\"):
                command = command[:-1] + " "
            elif command.strip():
                out.append((start, command.strip()))
                command, start = "", j + 2
            else:
                start = j + 2
            j += 1
    return out


COMMANDS = [(page, line, cmd) for page in PAGES for line, cmd in runnable_blocks(ROOT / page)]


def _cut_demo_data(folder: Path) -> None:
    for split, keep in KEEP.items():
        for cls in sorted((folder / split).iterdir()):
            for extra in sorted(cls.iterdir())[keep:]:
                extra.unlink()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (ws / name).symlink_to(ROOT / name)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return ws, env


def test_the_docs_have_runnable_commands():
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize("page,line,command", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_a_runnable_command_runs(workspace, page, line, command):
    ws, env = workspace
    done = subprocess.run(
        ["bash", "-c", command], cwd=ws, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{page}:{line}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if "imagenet_ddp.demo_data" in command:
        _cut_demo_data(ws / re.search(r"--out\s+(\S+)", command).group(1))


def _links(page: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line) + re.findall(r'src="([^"]+)"', line):
            if not re.match(r"[a-z]+:|#", target):
                out.append((n, target))
    return out


def _anchors(page: Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    out, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))]
)
def test_every_relative_link_points_to_a_file(page):
    path, missing = ROOT / page, []
    for n, target in _links(path):
        file, _, anchor = target.partition("#")
        linked = path.parent / file
        if not linked.exists():
            missing.append(f"{page}:{n}: {target}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            missing.append(f"{page}:{n}: {target} (no such heading)")
    assert not missing, "\n".join(missing)


def test_the_docs_pages_are_reachable_from_the_readme():
    readme = {(ROOT / t.split("#")[0]).resolve() for _, t in _links(ROOT / "README.md")}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_docs_speak_to_users_not_to_the_tracker():
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    found = [
        f"{p.name}: {m}"
        for p in pages
        for m in re.findall(r"(?i)\bissue #\d+", p.read_text(encoding="utf-8"))
    ]
    assert not found, f"internal issue numbers in the docs: {found}"
