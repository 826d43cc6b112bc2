"""The DDP overhead row of `python -m imagenet_ddp.bench gpu`: one torchrun worker's DistributedDataParallel
steps.

    python -m torch.distributed.run --standalone --nproc_per_node=1 -m imagenet_ddp.bench.gpu_ddp \
        --device cuda --model resnet50 --size 224 --batch-size 256 --steps 20 --out ddp.json

nccl on CUDA, gloo on CPU. One process runs the whole NCCL path (the process group, DDP's gradient
buckets all-reduced in the backward), but its all-reduce has no peer and moves nothing: its images/s
against the same step without DDP is the wrapper's own overhead, not scaling (which needs two GPUs
or more). The result goes to --out as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from imagenet_ddp.bench.gpu_throughput import WARMUP, Train, build_state, peak, reset_peak, train_rate


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def main(argv=None) -> int:
    """One torchrun worker: DistributedDataParallel train steps over nccl (CUDA) or gloo (CPU)."""
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        from imagenet_ddp.data import DataConfig, build_loader

        state = build_state(Train(args.model, args.size, args.batch_size), device)
        # make_state wraps in DDP from two processes on; here the one process is wrapped all the same.
        ids = [device.index] if device.type == "cuda" else None
        state.model = torch.nn.parallel.DistributedDataParallel(state.model, device_ids=ids)
        cfg = DataConfig(
            backend="synthetic", root=args.out + ".none", image_size=args.size, batch_size=args.batch_size
        )
        with build_loader(cfg, "train", device=device) as loader:
            reset_peak(device)
            measured = train_rate(state, loader, device, WARMUP, lambda s: args.steps)
        result = {
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "nccl": _nccl_version() if backend == "nccl" else None,
            "img_per_s": round(measured["images"] / measured["timed_s"], 1),
            "steps": measured["steps"],
            "warmup_batches": WARMUP,  # synthetic data: nothing prepared ahead
            "passes": measured["passes"],
            "peak_mem_gib": peak(device),
        }
        Path(args.out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
