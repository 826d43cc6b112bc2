"""Benchmarks: each runs its baseline in the same process and prints the ratio.

python -m imagenet_ddp.bench shards      # make_shards vs GNU tar
python -m imagenet_ddp.bench loaders     # DALI / torch loaders vs ImageFolder + PIL, per augmentation policy
python -m imagenet_ddp.bench models      # ResNet-50 train step with and without BlurPool, drop path
python -m imagenet_ddp.bench predict     # predict.py on torch vs onnxruntime
python -m imagenet_ddp.bench gpu         # the GPU path in one run (needs CUDA)
python -m imagenet_ddp.bench soak        # resident memory over hundreds of epochs, per backend
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a benchmark's report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
