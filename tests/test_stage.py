"""Node-local staging (data.stage_dir, imagenet_ddp/data/stage.py) on real shards made by make_shards.py.

    python -m pytest tests/test_stage.py

The staged copies are checked against the shared ones with hashlib and filecmp; the loaders (torch
backend) must give the batches they give from the shared copy, with the shared tars moved away.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from imagenet_ddp.data import DataConfig, build_loader
from imagenet_ddp.data.shardset import open_split
from imagenet_ddp.data.stage import needed_shards, split_dir, stage_node, stage_root, use_staged
from imagenet_ddp.errors import UserError
from tests import fixtures
from tests.needs import needs

ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH, EPOCHS = 16, 2, 2


def tiny_shards(root: Path, per_class: int, val_per_class: int, shard_size: int) -> Path:
    """A 4-class shard set of 16-32 px images packed by make_shards.py into root/shards."""
    fx = fixtures.make_folder(
        root / "src",
        num_classes=4,
        per_class=per_class,
        val_per_class=val_per_class,
        bad=False,
        side_range=(16, 32),
    )
    cmd = [sys.executable, "make_shards.py", "folder", "--src", str(fx.src), "--out", str(root / "shards")]
    subprocess.run(
        cmd + ["--shard-size", str(shard_size), "--workers", "1"], cwd=ROOT, check=True, capture_output=True
    )
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """train: 8 shards of 4 samples; val: 2 of 4."""
    return tiny_shards(tmp_path_factory.mktemp("stage-data"), 8, 2, 4)


@pytest.fixture(scope="module")
def shards_256(tmp_path_factory) -> Path:
    """train: 8 shards of 32 samples (repeated augmentation's epoch needs 256); val: 2 of 4."""
    return tiny_shards(tmp_path_factory.mktemp("stage-data-256"), 64, 2, 32)


@pytest.fixture
def shared(shards, tmp_path) -> Path:
    """A private copy of the shard set, free to damage."""
    return Path(shutil.copytree(shards, tmp_path / "shared"))


def config(root: Path, stage_dir: Path | str | None = None, **kw) -> DataConfig:
    return DataConfig(
        root=str(root),
        backend="torch",
        image_size=SIZE,
        eval_size=SIZE,
        batch_size=BATCH,
        workers=0,
        stage_dir=None if stage_dir is None else str(stage_dir),
        **kw,
    )


def batches(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """Every image of EPOCHS train passes and one val pass of `rank`."""
    out = []
    for split, epochs in (("train", range(EPOCHS)), ("val", range(1))):
        with build_loader(cfg, split, rank=rank, world_size=world_size) as loader:
            for epoch in epochs:
                loader.set_epoch(epoch)
                out += [x.clone() for x, _ in loader]
    return out


def hide(root: Path, keep: set[str] = frozenset()) -> None:
    """Move the shared tars away (all but `keep`): a loader that opens one fails."""
    for tar in root.glob("*/*.tar"):
        if tar.name not in keep:
            tar.rename(tar.with_suffix(".gone"))


def staged_tars(stage: Path) -> dict[str, Path]:
    return {p.name: p for p in stage.glob("*/*/*.tar")}


def test_staged_copies_equal_the_shared_ones_and_the_loaders_read_them(shared, tmp_path):
    stage = tmp_path / "stage"
    expected = batches(config(shared))
    report = stage_node(config(shared, stage), [0], 1, 0, range(EPOCHS))
    assert (report.copied, report.reused, report.left, report.warning) == (10, 0, 0, "")
    assert report.copied_bytes == sum(p.stat().st_size for p in shared.glob("*/*.tar"))
    copies = staged_tars(stage)
    assert len(copies) == 10
    for split in ("train", "val"):
        manifest = json.loads((shared / split / "manifest.json").read_text())
        for entry in manifest["shards"]:
            copy = copies[entry["file"]]
            assert copy.parent == split_dir(stage, open_split(shared, split))
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == entry["sha256"]
            assert filecmp.cmp(copy, shared / split / entry["file"], shallow=False)
            assert filecmp.cmp(copy.with_suffix(".idx"), shared / split / entry["index"], shallow=False)
    print(f"\n{report.line('here')}")

    hide(shared)
    got = batches(config(shared, stage))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(UserError, match="missing shard file"):  # negative control: the shared copy is gone
        batches(config(shared))


@pytest.mark.parametrize("repeats", [1, 2])
def test_a_node_stages_what_its_ranks_read_and_no_more(request, tmp_path, repeats):
    source = request.getfixturevalue("shards" if repeats == 1 else "shards_256")
    shared = Path(shutil.copytree(source, tmp_path / "shared"))
    stage, world, cfg = tmp_path / "stage", 4, {"repeated_aug": repeats}
    expected = {rank: batches(config(shared, **cfg), rank, world) for rank in (0, 1, 2, 3)}
    report = stage_node(config(shared, stage, **cfg), [0, 1], world, 0, range(EPOCHS))
    staged = set(staged_tars(stage))
    assert 0 < report.copied == len(staged) < 10  # ranks 2 and 3 read other shards too

    for tar in shared.glob("*/*.tar"):  # the shared shards not staged: zeros, as large as the manifest says
        if tar.name not in staged:
            tar.write_bytes(bytes(tar.stat().st_size))
    for rank in (0, 1):
        got = batches(config(shared, stage, **cfg), rank, world)
        assert all(torch.equal(a, b) for a, b in zip(got, expected[rank], strict=True))
    with pytest.raises(UserError):  # another node's ranks read some of the zeroed shards
        for rank in (2, 3):
            batches(config(shared, stage, **cfg), rank, world)


def test_a_second_run_reuses_the_copies_and_a_damaged_one_is_copied_again(shared, tmp_path):
    stage = tmp_path / "stage"
    stage_node(config(shared, stage), [0], 1, 0, range(EPOCHS))
    before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in staged_tars(stage).items()}

    again = stage_node(config(shared, stage), [0], 1, 0, range(EPOCHS))
    assert (again.copied, again.reused) == (0, 10)
    assert {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in staged_tars(stage).items()} == before

    damaged = sorted(staged_tars(stage).values())[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))  # same size, another sha256
    split = open_split(shared, damaged.parent.name)
    mapped = {s.path.name: s.path for s in use_staged(split, str(stage)).shards}
    assert mapped[damaged.name] == shared / split.split / damaged.name  # not read from the damaged copy

    third = stage_node(config(shared, stage), [0], 1, 0, range(EPOCHS))
    assert (third.copied, third.reused) == (1, 9)
    assert filecmp.cmp(damaged, shared / split.split / damaged.name, shallow=False)


def test_a_resumed_run_stages_the_epochs_left_again_on_another_node_and_reuses_on_the_same(shared, tmp_path):
    world, cfg_a, cfg_b = 4, config(shared, tmp_path / "node-a"), config(shared, tmp_path / "node-b")
    whole = stage_node(cfg_a, [0, 1], world, 0, range(0, 4))  # the first job, on node a: epochs 0-3
    assert whole.copied > 0
    # Requeued after epoch 1 and resumed on node b (the checkpoint's epoch is 2): only epochs 2-3 there.
    other = stage_node(cfg_b, [0, 1], world, 0, range(2, 4))
    train = open_split(shared, "train")
    sizes = [s.num_samples for s in train.shards]
    left = needed_shards(cfg_b, sizes, [0, 1], world, 0, range(2, 4), True)
    first = needed_shards(cfg_b, sizes, [0, 1], world, 0, range(0, 2), True)
    val = needed_shards(
        cfg_b, [s.num_samples for s in open_split(shared, "val").shards], [0, 1], world, 0, range(1), False
    )
    assert {n for n, p in staged_tars(tmp_path / "node-b").items() if p.parent.name == "train"} == {
        train.shards[i].path.name for i in left
    }
    assert set(left) != set(first) and (other.copied, other.reused) == (len(left) + len(val), 0)
    # Resumed on node a instead: everything is there already.
    again = stage_node(cfg_a, [0, 1], world, 0, range(2, 4))
    assert (again.copied, again.reused) == (0, other.copied)


@pytest.fixture
def small_disk(request):
    """A tmpfs too small for the shards (size), or one whose file slots run out (inodes: ENOSPC on create)."""
    needs("tmpfs")
    where = Path(tempfile.mkdtemp(prefix="stage-tmpfs-"))
    option = {"size": "size=64k", "inodes": "nr_inodes=9"}[request.param]
    subprocess.run(["mount", "-t", "tmpfs", "-o", option, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


@pytest.mark.parametrize("small_disk", ["size", "inodes"], indirect=True)
def test_a_full_stage_disk_falls_back_to_the_shared_copy_with_one_warning(shared, small_disk):
    expected = batches(config(shared))
    report = stage_node(config(shared, small_disk), [0], 1, 0, range(EPOCHS))
    assert report.left > 0 and report.copied > 0 and report.copied + report.left == 10
    assert report.warning.startswith("warning: data.stage_dir") and "\n" not in report.warning
    assert f"{report.left} of 10 shards" in report.warning and str(shared) in report.warning
    print(f"\n{report.warning}")
    assert not list(small_disk.glob("**/.*.tmp"))  # no partial copy left behind
    got = batches(config(shared, small_disk))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # What was staged is read from there: hide the shared copies of those.
    hide(shared, keep={p.name for p in shared.glob("*/*.tar")} - set(staged_tars(small_disk)))
    got = batches(config(shared, small_disk))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_stage_dir_variables_are_expanded_on_the_node(monkeypatch, tmp_path):
    monkeypatch.setenv("STAGE_TEST_TMP", str(tmp_path))
    assert stage_root("$STAGE_TEST_TMP/shards") == tmp_path / "shards"
    monkeypatch.delenv("STAGE_TEST_TMP")
    with pytest.raises(UserError, match="STAGE_TEST_TMP is not set on this node"):
        stage_root("${STAGE_TEST_TMP}/shards")


def test_a_damaged_shared_shard_is_refused_while_staging(shared, tmp_path):
    tar = sorted((shared / "train").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[-1024] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {tar} differs from its manifest"):
        stage_node(config(shared, tmp_path / "stage"), [0], 1, 0, range(EPOCHS))
    assert not list((tmp_path / "stage").glob(f"**/*{tar.name}*"))  # nor a partial copy of it


# ---------------------------------------------------------------------------- on a SLURM cluster


PER_NODE = 2  # processes per node: the first copies, the other waits


@pytest.mark.slow
def test_a_slurm_job_stages_once_per_node_into_each_node_folder(two_node_cluster, shards, tmp_path):
    cluster = two_node_cluster
    # One node-local folder per node, at the same path on every node, as $SLURM_TMPDIR would be.
    stage_dir, per_node = (
        f"{cluster.local_scratch}/stage",
        {n.name: n.scratch / "stage" for n in cluster.nodes},
    )
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job, _ = cluster.sbatch(
        f"--nodes={len(per_node)}",
        "--cpus-per-task=2",
        "--gpus-per-node=0",
        "--mem=2G",
        "--time=10",
        f"--output={log}",
        "slurm/train.sbatch",
        "configs/demo.yaml",
        f"data.root={shards}",
        f"data.stage_dir={stage_dir}",
        "data.backend=torch",
        "data.workers=0",
        "train.epochs=1",
        f"train.batch_size={BATCH}",
        "logging.wandb=false",
        f"run.dir={run_dir}",
        env={"PYTHON": sys.executable, "NPROC_PER_NODE": str(PER_NODE)},
        cwd=ROOT,
    )
    record = cluster.wait_job(job, timeout=240)
    text = log.read_text(errors="replace") if log.exists() else "(no output file)"
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text
    world, split = len(per_node) * PER_NODE, open_split(shards, "train")
    sha = {s.path.name: s.sha256 for name in ("train", "val") for s in open_split(shards, name).shards}
    staged = []
    for node, folder in per_node.items():
        # One line per node (its first process copies, the other waits), naming the node's folder.
        [line] = [x for x in text.splitlines() if x.startswith(f"staged on {node}:")]
        copies = list(folder.glob("*/*/*.tar"))
        assert f"({len(copies)} shards)" in line and line.endswith(f"to {stage_dir}"), line
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() == sha[p.name] for p in copies)
        staged.append(frozenset(p.name for p in copies if p.parent.name == "train"))
    # Each node holds what its ranks read, and not the other's (which node got which ranks is torchrun's).
    sizes = [s.num_samples for s in split.shards]
    expected = [
        frozenset(
            split.shards[j].path.name
            for j in needed_shards(config(shards), sizes, ranks, world, 0, range(1), True)
        )
        for ranks in ([r + n * PER_NODE for r in range(PER_NODE)] for n in range(len(per_node)))
    ]
    assert sorted(staged, key=sorted) == sorted(expected, key=sorted) and len(set(staged)) == 2, staged
    assert "done: val top-1" in text, text
    print("\n" + "\n".join(x for x in text.splitlines() if x.startswith("staged on ")))
