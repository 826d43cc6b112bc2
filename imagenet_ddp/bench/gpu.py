"""The checks of the GPU path that no CPU can make, in one command for a machine with a GPU.

    python -m imagenet_ddp.bench gpu [--out DIR]            # needs CUDA; exits 2 with one line without
    python -m imagenet_ddp.bench gpu --device cpu --size 32  # the same checks where they apply, on CPU

Each check prints one line (pass, FAIL or n/a with why) and all go to DIR/gpu.json:

- deterministic: train.deterministic=true runs 3 steps of ResNet-18 and EfficientNet-B0 twice from
  the same seed; the weights must be bitwise equal, and the ops torch warns have no deterministic
  kernel are listed (AdaptiveAvgPool2d's backward is replaced by a mean: models.deterministic_pooling);
- no_host_sync: train steps in bf16, fp16 (GradScaler) and fp32, a NaN batch among them, under
  `torch.cuda.set_sync_debug_mode("error")`: any host sync in the step raises;
- rng_state: a checkpoint's RNG state holds this GPU's state only and restores it;
- dali_mixed: the DALI train and eval graphs with nvJPEG ("mixed", NVIDIA's preallocation hints,
  libjpeg upsampling) yield one batch each on torch's stream, when DALI is installed.

Exit status 0 when no check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the checks that apply there)")
    p.add_argument("--size", type=int, default=64, help="image side of the training checks")
    p.add_argument("--out", default="runs/bench-gpu", help="folder for gpu.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench gpu: no CUDA device here (torch sees none); use --device cpu for the CPU part",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    checks = {}
    for name, check in CHECKS.items():
        try:
            status, detail = check(device, args.size)
        except Exception as e:  # a check that crashes has failed; the others still run
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        checks[name] = {"status": status, "detail": detail}
        print(f"{name:<14} {status:<5} {detail}", flush=True)
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "checks": checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'gpu.json'}")
    return 1 if any(c["status"] == "FAIL" for c in checks.values()) else 0


def _state(name: str, device: torch.device, size: int, precision: str, deterministic: bool):
    from imagenet_ddp.config import load_config, resolve
    from imagenet_ddp.dist import DistEnv
    from imagenet_ddp.engine import make_state, seed_everything
    from imagenet_ddp.models import build_model

    seed_everything(0, 0, deterministic)
    overrides = [f"train.precision={precision}", f"train.deterministic={str(deterministic).lower()}"]
    overrides += ["train.ema_decay=0.9", "train.channels_last=true", f"model.name={name}"]
    cfg = resolve(load_config(None, overrides), 1, device.type, 8)
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=device)
    return make_state(build_model(name, num_classes=10), cfg, env)


def _batches(device: torch.device, size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 3, size, size, generator=g).to(device),
            torch.randint(0, 10, (8,), generator=g).to(device),
        )
        for _ in range(count)
    ]


def check_deterministic(device, size):
    from imagenet_ddp.checkpoint import weights_digest
    from imagenet_ddp.engine import train_step

    warned, digests = set(), {}
    for name in ("resnet18", "efficientnet_b0"):
        runs = []
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = _state(name, device, size, "fp32" if device.type == "cpu" else "bf16", True)
                for batch in _batches(device, size, 3):
                    train_step(state, [batch])
            warned |= {
                str(w.message).split(" does not have a deterministic")[0]
                for w in caught
                if "deterministic" in str(w.message)
            }
            runs.append(weights_digest(state.model))
        digests[name] = runs[0] == runs[1]
    torch.use_deterministic_algorithms(False)
    same = all(digests.values())
    detail = (
        f"bitwise equal reruns: {digests}; ops without a deterministic kernel: {sorted(warned) or 'none'}"
    )
    return ("pass" if same else "FAIL"), detail


def check_no_host_sync(device, size):
    if device.type != "cuda":
        return "n/a", "host syncs exist on CUDA only (tests/test_train.py counts Python-side reads on CPU)"
    from imagenet_ddp.engine import train_step

    nan = (
        torch.full((8, 3, size, size), math.nan, device=device),
        torch.zeros(8, dtype=torch.long, device=device),
    )
    for precision in ("bf16", "fp16", "fp32"):
        state = _state("resnet18", device, size, precision, False)
        batches = _batches(device, size, 2)
        train_step(state, [batches[0]])  # first-call allocations and cuDNN set-up may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in (batches[1], nan, batches[0]):
                train_step(state, [batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return "pass", "train_step in bf16, fp16 (GradScaler) and fp32, a NaN batch skipped: no host sync"


def check_rng_state(device, size):
    from imagenet_ddp.checkpoint import rng_state, set_rng_state

    state = rng_state(device)
    if device.type != "cuda":
        return ("pass" if state["cuda"] is None else "FAIL"), "CPU: no CUDA state saved"
    expected = torch.rand(4, device=device)
    torch.rand(100, device=device)
    set_rng_state(state, device)
    again = torch.rand(4, device=device)
    ok = isinstance(state["cuda"], torch.Tensor) and torch.equal(expected, again)
    return ("pass" if ok else "FAIL"), "one device's state saved and restored"


def check_dali_mixed(device, size):
    if device.type != "cuda":
        return "n/a", "nvJPEG needs a GPU (tests/test_loaders.py checks the hints against DALI's schema)"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "n/a", "DALI is not installed here"
    import make_shards  # the CLI at the repository's top (python -m runs from there)
    from imagenet_ddp.data import DataConfig, build_loader
    from imagenet_ddp.demo_data import write_digits

    with tempfile.TemporaryDirectory() as tmp:
        write_digits(Path(tmp) / "src")
        assert (
            make_shards.main(["folder", "--src", f"{tmp}/src", "--out", f"{tmp}/shards", "--workers", "2"])
            == 0
        )
        cfg = DataConfig(
            root=str(Path(tmp) / "shards"), backend="dali", image_size=size, eval_size=size, batch_size=32
        )
        shapes = []
        for split in ("train", "val"):
            with build_loader(cfg, split, device=device) as loader:
                images, labels = next(iter(loader))
                shapes.append(tuple(images.shape))
    return "pass", f"train and val batches from nvJPEG: {shapes}"


CHECKS = {
    "deterministic": check_deterministic,
    "no_host_sync": check_no_host_sync,
    "rng_state": check_rng_state,
    "dali_mixed": check_dali_mixed,
}


if __name__ == "__main__":
    sys.exit(main())
