"""python -m imagenet_ddp.bench gpu: its refusal without a GPU, its CPU run for real (training fed by
every loader, CPU decode, torchrun DDP over gloo, the checks), its JSON and table, and its budget.

python -m pytest tests/test_bench_gpu.py -q
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagenet_ddp.bench import gpu
from imagenet_ddp.bench.gpu_report import ROW_KEYS

REPO = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--models", "resnet18", "--sizes", "32", "--batch-sizes", "4", "--images", "64"]
REPORT_KEYS = {
    "device", "device_type", "torch", "torchvision", "cuda", "cudnn", "python", "cpu_cores", "budget_s",
    "elapsed_s", "settings", "shards", "checks", "rows", "goals", "markdown",
}  # fmt: skip


def bench(*args: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "imagenet_ddp.bench", "gpu", *args]
    env = env or {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def planned_ids(args: list[str]) -> list[str]:
    return [item.id for item in gpu.plan(gpu._parse(args)) if not isinstance(item, gpu.Check)]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = bench("--out", str(tmp_path), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and out.stdout == ""
    assert (
        out.stderr == "bench gpu: no CUDA device here (torch sees none); use --device cpu for the CPU part\n"
    )
    assert not (tmp_path / "gpu.json").exists()


def test_on_cpu_at_tiny_sizes_every_measurement_that_applies_runs_and_the_report_says_so(tmp_path):
    args = [*TINY, "--steps", "2", "--compile", "off", "--minutes", "10", "--out", str(tmp_path)]
    out = bench(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report) == REPORT_KEYS and report["device_type"] == "cpu" and report["cuda"] is None
    assert report["shards"]["images"] == 64 and report["shards"]["mean_kb"] > 20

    rows = {r["id"]: r for r in report["rows"]}
    assert list(rows) == planned_ids(args)  # one row per measurement, in the plan's order
    for r in rows.values():
        assert tuple(r) == ROW_KEYS
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["reason"] is None and r["img_per_s"] > 0 and isinstance(r["steps"], int), r
        else:
            assert isinstance(r["reason"], str) and r["reason"] and r["img_per_s"] is None, r
        assert isinstance(r["estimate_s"], float) and isinstance(r["wall_s"], float)
        assert r["peak_mem_gib"] is None  # GPU memory only

    head = "train resnet18 32px b4 bf16 eager"
    for feed in ("synthetic", "torch-device", "torch-workers"):
        assert rows[f"{head} {feed}"]["status"] == "ok", rows[f"{head} {feed}"]
        assert rows[f"{head} {feed}"]["steps"] == 2
    for feed in ("torch-device", "torch-workers"):
        assert rows[f"{head} {feed}"]["ratio_to"] == f"{head} synthetic"
    assert "CPU stand-in" in rows[f"{head} torch-device"]["detail"]
    dali = rows[f"{head} dali"]
    if importlib.util.find_spec("nvidia.dali"):
        assert dali["status"] == "ok", dali
    else:
        assert dali["reason"] == "DALI is not installed here"
    assert rows["train resnet18 32px b4 fp16 eager synthetic"]["reason"].startswith(
        "fp16 with GradScaler needs a GPU"
    )
    assert rows["decode nvjpeg b4"]["reason"] == "nvJPEG needs a CUDA device"
    assert rows["decode cpu b4"]["status"] == "ok" and "libjpeg-turbo" in rows["decode cpu b4"]["detail"]
    ddp = rows["ddp resnet18 32px b4 bf16 eager synthetic"]  # torchrun, one process, gloo
    assert ddp["status"] == "ok" and "over gloo" in ddp["detail"] and ddp["ratio_to"] == f"{head} synthetic"

    checks = report["checks"]
    assert list(checks) == ["deterministic", "no_host_sync", "rng_state", "dali_mixed"]
    assert checks["deterministic"]["status"] == checks["rng_state"]["status"] == "pass"
    assert "{'resnet18': True, 'efficientnet_b0': True}" in checks["deterministic"]["detail"]
    assert checks["no_host_sync"]["status"] == checks["dali_mixed"]["status"] == "n/a"
    assert [g["met"] for g in report["goals"]] == [None, None]  # judged on a GPU only

    table = report["markdown"]
    assert out.stdout.rstrip().endswith(table)
    assert "| model | px | batch | precision | compile | fed by | img/s | vs synthetic | peak GiB |" in table
    assert "| resnet18 | 32 | 4 | bf16 | off | torch, CPU workers |" in table
    assert "| resnet18 | 32 | 4 | bf16 | off | synthetic under DDP (1 process) |" in table
    assert "- skipped (2, reasons in gpu.json): decode nvjpeg b4 (nvJPEG needs a CUDA device)" in table


def test_what_does_not_fit_the_budget_is_skipped_with_its_reason(tmp_path):
    args = [*TINY, "--minutes", "0.05", "--out", str(tmp_path)]  # 3 s, less than the 5 s kept in reserve
    out = bench(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["id"] for r in report["rows"]] == planned_ids(args)
    assert any(r["compile"] for r in report["rows"])  # --compile both by default
    for r in report["rows"]:
        assert r["status"] == "skipped" and r["img_per_s"] is None
        assert r["reason"].startswith("needs ~") or "GPU" in r["reason"] or "CUDA" in r["reason"], r
    assert all(c["status"] == "skipped" for c in report["checks"].values())
    assert "- skipped (" in out.stdout and "(budget)" in out.stdout


def test_a_measurement_still_running_at_the_budget_end_or_its_own_cap_is_stopped():
    for budget, cap in ((gpu.Budget(0.5), math.inf), (gpu.Budget(60), 0.5)):
        start = time.monotonic()
        with pytest.raises(gpu.BudgetSpent), budget.deadline(cap):
            while True:  # Python code: the alarm's handler runs between its bytecodes
                pass
        assert 0.4 < time.monotonic() - start < 3
