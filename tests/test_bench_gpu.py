"""python -m imagenet_ddp.bench gpu: its refusal without a GPU, and its CPU part run for real.

python -m pytest tests/test_bench_gpu.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench(*args: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "imagenet_ddp.bench", "gpu", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = bench("--out", str(tmp_path), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and out.stdout == ""
    assert (
        out.stderr == "bench gpu: no CUDA device here (torch sees none); use --device cpu for the CPU part\n"
    )


def test_on_cpu_the_checks_that_apply_pass_and_the_report_is_json(tmp_path):
    out = bench(
        "--device", "cpu", "--size", "32", "--out", str(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report) == {"device", "torch", "checks"}
    checks = report["checks"]
    assert list(checks) == ["deterministic", "no_host_sync", "rng_state", "dali_mixed"]
    assert checks["deterministic"]["status"] == "pass"
    assert "{'resnet18': True, 'efficientnet_b0': True}" in checks["deterministic"]["detail"]
    assert checks["rng_state"]["status"] == "pass"
    assert checks["no_host_sync"]["status"] == checks["dali_mixed"]["status"] == "n/a"
    assert [line.split()[0] for line in out.stdout.splitlines()[:4]] == list(checks)
