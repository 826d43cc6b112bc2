"""Comparing runs: W&B offline run files read back through W&B's own record schema, and
`python -m imagenet_ddp.runs compare/list` on three real short runs (finished, resumed after SIGTERM,
crashed mid-epoch), with the HTML report opened in headless Chromium.

python -m pytest tests/test_runs.py -q
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenet_ddp.checkpoint import load
from imagenet_ddp.runs import main as runs_main
from imagenet_ddp.runs import read_run
from tests.test_train import make_tiny_shards, small_run
from tests.test_train_ddp import environment

REPO = Path(__file__).resolve().parent.parent


def wandb_records(path: Path) -> list:
    """The records of a .wandb file, parsed with W&B's protobuf schema (wandb_internal_pb2.Record).
    The file is a LevelDB-style log: a 7-byte ':W&B' header, then 32 KiB blocks of records, each
    with a 7-byte header (crc32, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
        else:
            break
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def key(item) -> str:
    """A config, history or summary item's name (W&B stores it as `key` or as `nested_key` parts)."""
    return item.key or "/".join(item.nested_key)


def run_file(run_dir: Path, index: int = 0) -> Path:
    return sorted((run_dir / "wandb").glob("offline-run-*"))[index].glob("run-*.wandb").__next__()


def train(args: list[str], home: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train_ddp.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=environment(home), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> dict[str, Path]:
    """finished; stopped by SIGTERM mid-epoch and resumed; crashed mid-epoch (a JPEG damaged after its
    first epoch). All log to W&B offline."""
    root = tmp_path_factory.mktemp("runs")
    shards = make_tiny_shards(root / "data")
    common = ("train.epochs=2", "logging.wandb=true", "logging.log_every=1", "run.poll_every=1")
    runs = {name: root / name for name in ("finished", "resumed", "crashed")}
    done = train(small_run(shards, runs["finished"], *common, "logging.wandb_checkpoints=true"), root)
    assert done.returncode == 0, done.stderr
    resumed = small_run(shards, runs["resumed"], *common, "optim.lr=0.05")
    proc = subprocess.Popen(
        [sys.executable, "train_ddp.py", *resumed],
        cwd=REPO,
        env=environment(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "epoch 2/2 step 15:" in line:  # mid-way through the second epoch
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 75
    again = train(resumed, root)
    assert again.returncode == 0, again.stderr
    damaged = root / "damaged"
    shutil.copytree(shards, damaged)
    crashed = small_run(damaged, runs["crashed"], *common, "train.label_smoothing=0.0")
    first = train([*crashed, "train.epochs=1"], root)
    assert first.returncode == 0, first.stderr
    tar = sorted((damaged / "train").glob("*.tar"))[0]
    with open(tar, "r+b") as f:  # the first JPEG's start garbled in place: the shard keeps its size
        f.seek(512)
        f.write(b"\x00" * 16)
    broken = train(crashed, root)
    assert broken.returncode == 2 and "cannot decode its JPEG" in broken.stderr, broken.stderr
    return runs


def test_the_wandb_run_file_holds_the_flat_config_what_the_run_found_and_the_epoch_metrics(three_runs):
    records = wandb_records(run_file(three_runs["finished"]))
    [run] = [r.run for r in records if r.HasField("run")]
    config = {key(item): json.loads(item.value_json) for item in run.config.update}
    # The recipe (none: the defaults) and the overrides that change the experiment.
    assert run.display_name.startswith("defaults data.root=") and "train.epochs=2" in run.display_name
    assert "run.dir" not in run.display_name and run.job_type == "train" and "resnet18" in run.tags
    assert config["train.epochs"] == 2 and config["derived.global_batch_size"] == 8
    assert config["data.train_samples"] == 96 and config["data.num_classes"] == 4
    assert len(config["data.manifest_sha256"]) == 64 and config["env.device"]
    history = [
        {key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")
    ]
    epochs = [h for h in history if "epoch/val_top1" in h]
    assert [h["epoch/epoch"] for h in epochs] == [1, 2] and [h["epoch/images_seen"] for h in epochs] == [
        96,
        192,
    ]
    metrics = {r.metric.name or r.metric.glob_name: r.metric for r in records if r.HasField("metric")}
    assert metrics["epoch/*"].step_metric == "epoch/epoch"
    assert "epoch/val_top1" in metrics and {"epoch/images_seen", "epoch/hours"} <= set(metrics)
    summary = {
        key(i): json.loads(i.value_json) for r in records if r.HasField("summary") for i in r.summary.update
    }
    assert summary["best/val_top1"] == max(h["epoch/val_top1"] for h in epochs)
    assert summary["final/val_top1"] == epochs[-1]["epoch/val_top1"]
    [artifact] = [r.artifact for r in records if r.HasField("artifact")]  # logging.wandb_checkpoints=true
    assert artifact.type == "model" and artifact.name == f"model-{run.run_id}"


def test_a_run_stopped_and_resumed_continues_the_same_wandb_run_without_duplicated_steps(three_runs):
    stopped, finished = (wandb_records(run_file(three_runs["resumed"], i)) for i in (0, 1))
    ids = {r.run.run_id for records in (stopped, finished) for r in records if r.HasField("run")}
    assert len(ids) == 1 and ids == {load(three_runs["resumed"] / "last.pt")["wandb_run_id"]}
    [run] = [r.run for r in stopped if r.HasField("run")]
    assert "optim.lr=0.05" in run.display_name and "optim.lr=0.1 " not in run.display_name  # the last one
    before = [r.history.step.num for r in stopped if r.HasField("history")]
    after = [r.history.step.num for r in finished if r.HasField("history")]
    assert before == sorted(set(before)) and after == sorted(set(after)) and min(after) > max(before)
    epoch_steps = [
        r.history.step.num
        for records in (stopped, finished)
        for r in records
        if r.HasField("history") and any(key(i) == "epoch/val_top1" for i in r.history.item)
    ]
    assert epoch_steps == [12, 24]


def compare(capsys, *args) -> tuple[int, str, str]:
    code = runs_main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_names_exactly_the_keys_that_differ_and_each_runs_status(three_runs, capsys):
    code, out, err = compare(capsys, *three_runs.values(), "--format", "json")
    assert code == 0 and err == ""
    rows = {r["run"]: r for r in json.loads(out)}
    assert set(rows) == {"finished", "resumed", "crashed"}
    keys = set(next(iter(rows.values()))) - {"run", "recipe", "epochs", "best top-1", "final top-1"}
    keys -= {"best top-5", "final top-5", "img/s", "device-hours", "status"} | {
        k for k in keys if k.startswith("hours to")
    }
    assert keys == {"optim.lr", "derived.lr", "train.label_smoothing", "data.root"}
    assert {r: rows[r]["status"] for r in rows} == {
        "finished": "finished",
        "resumed": "finished",
        "crashed": "crashed",
    }
    assert rows["resumed"]["epochs"] == "2/2" and rows["crashed"]["epochs"] == "1/2"
    assert rows["finished"]["best top-1"] == max(
        json.loads(line)["val_top1"]
        for line in (three_runs["finished"] / "metrics.jsonl").read_text().splitlines()
    )
    resumed = read_run(three_runs["resumed"])  # stopped mid-epoch, then finished: its clock and counts
    assert [m["images_seen"] for m in resumed.metrics] == [96, 192]
    assert (
        resumed.hours > sum(m["epoch_seconds"] for m in resumed.metrics) / 3600
    )  # + validation, the cut epoch
    assert resumed.record_hours()[-1] <= resumed.hours == pytest.approx(resumed.device_hours)  # one process
    assert rows["resumed"]["hours to 28.0%"] is None or rows["resumed"]["hours to 28.0%"] <= resumed.hours
    code, out, _ = compare(capsys, *three_runs.values())
    assert out.splitlines()[0].split()[:4] == ["run", "recipe", "data.root", "derived.lr"]


def test_bad_folders_and_truncated_metrics_get_one_line_each_and_the_rest_is_compared(
    three_runs, tmp_path, capsys
):
    copy = tmp_path / "truncated"
    shutil.copytree(three_runs["finished"], copy, ignore=shutil.ignore_patterns("wandb", "*.pt"))
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_to')
    code, out, err = compare(capsys, copy, tmp_path / "nothing", three_runs["crashed"], "--format", "csv")
    assert code == 0
    assert err.splitlines() == [
        f"runs: {copy / 'metrics.jsonl'}: its last line is truncated: ignored",
        f"runs: {tmp_path / 'nothing'}: no such folder",
    ]
    assert [line.split(",")[0] for line in out.splitlines()] == ["run", "truncated", "crashed"]
    code, _, err = compare(capsys, tmp_path)
    assert (
        code == 2
        and err.count("\n") == 1
        and err.startswith("runs: error: none of the folders given is a run")
    )


def test_the_png_and_the_html_report_in_a_real_browser(three_runs, tmp_path, capsys, browser):
    from selenium.webdriver.common.by import By

    code, _, _ = compare(
        capsys, *three_runs.values(), "--out", tmp_path / "plots.png", "--anchor", "ffcv-rn18"
    )
    image = np.asarray(Image.open(tmp_path / "plots.png").convert("L"), dtype=np.float32)
    assert code == 0 and image.shape[1] > 1000 and image.std() > 10  # decodes, and is not blank
    code, _, _ = compare(capsys, *three_runs.values(), "--out", tmp_path / "report.html")
    assert code == 0
    browser.set_window_size(1400, 1000)
    browser.get((tmp_path / "report.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[1:]] == [
        "finished",
        "resumed",
        "crashed",
    ]
    assert browser.execute_script("return document.getElementById('plot').naturalWidth") > 1000
    browser.save_screenshot(str(tmp_path / "report.png"))
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=np.float32)
    assert shot.std() > 10


def test_list_shows_every_run_with_its_status_and_the_command_that_uploads_it(three_runs, capsys):
    assert runs_main(["list", str(three_runs["finished"].parent)]) == 0
    out = capsys.readouterr().out
    assert f"{three_runs['crashed']}  crashed  epoch 1/2" in out
    assert f"{three_runs['finished']}  finished  epoch 2/2  best top-1" in out
    assert f"    wandb sync {sorted((three_runs['finished'] / 'wandb').glob('offline-run-*'))[0]}" in out
