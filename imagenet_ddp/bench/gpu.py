"""The GPU path in one command: ResNet training images/s fed by each loader, nvJPEG, fp16, NCCL DDP,
peak memory, and the checks no CPU can make, all within a time budget.

    python -m imagenet_ddp.bench gpu [--minutes 8] [--out DIR]      # needs CUDA; exits 2 with one line without
    python -m imagenet_ddp.bench gpu --plan quick --out DIR          # 5 minutes: the headline figures
    python -m imagenet_ddp.bench gpu --plan quick --estimate         # its schedule and estimates; runs nothing
    python -m imagenet_ddp.bench gpu --device cpu --models resnet18 --sizes 32 --batch-sizes 4 --steps 2 \
        --images 64 --compile off --minutes 5                        # the same measurements where they apply

--plan quick (5 minutes on one H100, ~2 of them estimated): ResNet-50 at 224 px, batch 256, bf16
channels_last, eager, fed by synthetic data, then by the torch backend with device decode
(data.decode_device=cuda, 4 workers: the project's data.workers) without and with
data.auto_augment=ta_wide, each row with its peak memory; then the sync_audit check. Needs torch,
torchvision and timm only (no DALI, TorchCodec, webdataset or W&B). Its goals lines say whether
the targets were met: >= 3,000 img/s and >= 0.9 of synthetic fed by device decode, >= 0.8 of
synthetic with ta_wide, no host sync in the audit.

Measured (gpu_throughput.py says how), in this order of priority:
- ResNet-50 and ResNet-18 train steps (bf16 autocast, channels_last) at --sizes and --batch-sizes,
  torch.compile off and on, fed by synthetic data (the upper bound), by the torch backend from shards
  generated here (device decode: nvJPEG; and worker decode) and by the dali backend when importable;
- nvJPEG batched decode (TorchCodec's decode_jpeg on CUDA, torchvision.io's where it is missing) against libjpeg-turbo on all cores;
- fp16 steps with GradScaler; one DistributedDataParallel step under torchrun (nccl; gloo on CPU);
- peak GPU memory of each (torch.cuda.max_memory_allocated);
- loader rows time at least 11x the batches their loader can hold prepared when the clock starts
  (gpu_throughput.py: the warm-up rule); the DDP row is one process: the wrapper's overhead, not scaling;
- the checks: sync_audit (bench/sync_audit.audit_recipe: the torchvision V2 recipe's loader next(),
  batch augmentation and train_step at this run's first model, size and batch, fed by device decode
  from the generated shards: no host sync, CUDA's sync debug mode on a GPU, the stand-in on a CPU);
  deterministic (train.deterministic=true runs 3 steps of ResNet-18 and EfficientNet-B0
  twice from the same seed: bitwise equal weights, and the ops without a deterministic kernel);
  no_host_sync (bf16, fp16, fp32 steps and a NaN batch under set_sync_debug_mode("error")); rng_state
  (a checkpoint holds and restores this GPU's RNG state); dali_mixed (DALI's nvJPEG graphs, when
  installed).

The budget: each measurement's cost is estimated from what this run has measured so far (step times,
compile times, loader start-up); one that does not fit in what is left is skipped with that reason,
and a measurement still running when the budget ends is stopped (SIGALRM) and recorded as such;
one running past 4x its estimate (a hung loader, say) is stopped and failed, and the rest go on.
Each measurement times --slice seconds of steps (or --steps steps). DIR/gpu.json is rewritten after
each row: every row has the same keys (ROW_KEYS), skipped ones their reason; then a README-ready
markdown table is printed (and kept in the JSON). Exit status: 2 without a GPU, 1 when a check or a
measurement failed, else 0.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from imagenet_ddp.bench import gpu_throughput as tp
from imagenet_ddp.bench.gpu_report import ROW_KEYS, compare, goals, header, markdown, write

RESERVE_S = 5.0  # of the budget, for the report and the temporary shards' removal
CAP_FACTOR, CAP_MIN_S = 4, 90  # a measurement is stopped after 4x its estimate (at least 90 s)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.estimate:
        return estimate(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench gpu: no CUDA device here (torch sees none); use --device cpu for the CPU part",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    budget = Budget(args.minutes * 60 - RESERVE_S)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = header(args, device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        bench = tp.Throughput(device, args, Path(tmp))
        for item in plan(args):
            row = _measure(item, bench, budget, args, report["checks"])
            if row is not None:
                report["rows"].append(row)
            report["shards"] = bench.shards_info
            report["elapsed_s"] = round(budget.elapsed(), 1)
            write(out / "gpu.json", report)
        bench.free()
    compare(report["rows"])
    report["goals"] = goals(report["rows"], report["checks"], device)
    report["markdown"] = markdown(report)
    report["elapsed_s"] = round(budget.elapsed(), 1)
    write(out / "gpu.json", report)
    print(f"wrote {out / 'gpu.json'}\n\n{report['markdown']}")
    failed = any(c["status"] == "FAIL" for c in report["checks"].values())
    return 1 if failed or any(r["status"] == "failed" for r in report["rows"]) else 0


def _parse(argv):
    def names(text):
        return [t for t in text.split(",") if t]

    def ints(text):
        return [int(t) for t in text.split(",") if t]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=list(PLANS), default="full", help="full (default) or quick")
    p.add_argument("--estimate", action="store_true", help="print the plan's estimates only (no CUDA needed)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (what applies there)")
    p.add_argument("--minutes", type=float, help="the whole run's budget (full: 8, quick: 5)")
    p.add_argument("--out", default="runs/bench-gpu", help="folder for gpu.json")
    p.add_argument("--models", type=names, help="the first is the headline (full: resnet50,resnet18)")
    p.add_argument("--sizes", type=ints, help="train crop sides; the first: headline (full: 224,176,160)")
    p.add_argument(
        "--batch-sizes", type=ints, help="per step; every model and size at the first (full: 256,128,512)"
    )
    p.add_argument("--compile", choices=["both", "off", "on"], help="torch.compile (full: both, quick: off)")
    p.add_argument("--slice", type=float, default=3.0, help="seconds of timed steps per measurement")
    p.add_argument("--steps", type=int, default=0, help="timed steps per measurement instead of --slice")
    p.add_argument(
        "--images",
        type=int,
        default=0,
        help="JPEGs generated for the loader feeds (0: one pass holds the warm-up rule)",
    )
    p.add_argument("--workers", type=int, help="loader workers (full: cores - 1, quick: 4)")
    p.add_argument(
        "--hold",
        type=int,
        default=tp.HOLD,
        help=f"loader rows time at least this many times the batches they skip (default {tp.HOLD}: < 10%%)",
    )
    p.add_argument("--check-size", type=int, default=64, help="image side of the checks' train steps")
    p.add_argument("--cores", type=int, help="--estimate: the GPU machine's CPU cores (default: this one's)")
    args = p.parse_args(argv)
    for name, value in PLANS[args.plan].items():
        if getattr(args, name) is None:
            setattr(args, name, value() if callable(value) else value)
    if not args.images:
        args.images = auto_images(args)
    return args


PLANS = {  # each plan's settings where the command line leaves them
    "full": {
        "minutes": 8.0,
        "models": ["resnet50", "resnet18"],
        "sizes": [224, 176, 160],
        "batch_sizes": [256, 128, 512],
        "compile": "both",
        "workers": lambda: max(1, len(os.sched_getaffinity(0)) - 1),
    },
    # The device-decode path's workers only read JPEG bytes: the project's default data.workers
    # keeps up, and the prefetched batches (the warm-up) stay few.
    "quick": {
        "minutes": 5.0,
        "models": ["resnet50"],
        "sizes": [224],
        "batch_sizes": [256],
        "compile": "off",
        "workers": 4,
    },
}
MAX_AUTO_IMAGES = 65536  # ~5 GB of JPEGs; past it a loader row's timed batches span passes


def auto_images(args) -> int:
    """JPEGs enough that one pass of the device-decode feed at the first batch size holds its
    skipped batches and --hold times as many timed (no worker restart on the clock), within 64 Ki."""
    skip = tp.warmup_batches(tp.ahead_estimate("torch-device", args.workers))
    return min(MAX_AUTO_IMAGES, args.batch_sizes[0] * (args.hold + 1) * skip)


@dataclass(frozen=True)
class Check:
    name: str

    @property
    def id(self) -> str:
        return f"check {self.name}"


def plan(args) -> list:
    """Every measurement, the most wanted first: the budget drops from the end."""
    m, s, b = args.models[0], args.sizes[0], args.batch_sizes[0]
    if args.plan == "quick":
        first = args.compile == "on"
        return [
            tp.Train(m, s, b, compile=first),
            tp.Train(m, s, b, compile=first, feed="torch-device"),
            tp.Train(m, s, b, compile=first, feed="torch-device", auto_augment="ta_wide"),
            Check("sync_audit"),
        ]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    first, rest = compiles[0], compiles[1:]
    others = [(model, size) for model in args.models for size in args.sizes if (model, size) != (m, s)]
    items = [tp.Train(m, s, b, compile=first, feed=feed) for feed in tp.FEEDS]
    items += [tp.Train(m, s, b, compile=first, feed="torch-device", auto_augment="ta_wide")]
    items += [tp.Decode("nvjpeg", b), tp.Decode("cpu", b), tp.Train(m, s, b, "fp16", first)]
    items += [tp.Ddp(m, s, b), *(Check(name) for name in CHECKS)]
    items += [tp.Train(m, s, b, compile=c, feed=f) for c in rest for f in ("synthetic", "torch-device")]
    for model, size in others:  # every model and size at the first batch size, and its loader's rate
        items += [tp.Train(model, size, b, compile=first, feed=f) for f in ("synthetic", "torch-device")]
    items += [tp.Train(model, s, b, compile=c) for c in rest for model in args.models[1:]]
    items += [
        tp.Train(model, s, batch, compile=first) for model in args.models for batch in args.batch_sizes[1:]
    ]
    items += [tp.Train(model, size, b, compile=c) for c in rest for model, size in others if size != s]
    sizes = [(model, size) for model in args.models for size in args.sizes[1:]]
    items += [
        tp.Train(model, size, batch, compile=first) for model, size in sizes for batch in args.batch_sizes[1:]
    ]
    items += [tp.Train(m, s, batch, compile=c) for c in rest for batch in args.batch_sizes[1:]]
    seen = set()
    return [i for i in items if not (i.id in seen or seen.add(i.id))]


class BudgetSpent(BaseException):
    """Raised by SIGALRM when the budget ends; a BaseException, so no `except Exception` holds it."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start, self.spent = seconds, time.monotonic(), False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    @contextmanager
    def deadline(self, cap: float = math.inf):
        """Interrupts the block with BudgetSpent when the budget ends, or after `cap` seconds."""

        def ring(signum, frame):
            raise BudgetSpent

        previous = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, min(cap, self.left())))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


CHECK_COST = {  # seconds, guesses; the sync audit's shards are counted apart
    "cuda": {"deterministic": 20, "no_host_sync": 15, "sync_audit": 30},
    "cpu": {"deterministic": 45, "sync_audit": 15},
}


def estimate_of(item, bench: tp.Throughput) -> float:
    if not isinstance(item, Check):
        return bench.estimate(item)
    shards = bench.prepare_estimate() if item.name == "sync_audit" else 0.0
    return CHECK_COST[bench.device.type].get(item.name, 3) + shards


def estimate(args) -> int:
    """--estimate: the plan's items and what the budget logic expects each to take on --device,
    from the Costs guesses (nothing runs, so nothing is learnt on the way); exit 0."""
    device = torch.device(args.device)
    bench = tp.Throughput(device, args, Path(tempfile.gettempdir()))
    budget, total = args.minutes * 60 - RESERVE_S, 0.0
    print(
        f"bench gpu --plan {args.plan} on {device.type}: estimates from the guesses, before any measurement"
    )
    for item in plan(args):
        why = None if isinstance(item, Check) else bench.not_here(item)
        est = 0.0 if why else estimate_of(item, bench)
        if why or total + est > budget:  # as _measure decides: skipped, and nothing spent
            print(f"{item.id:<64} ~{est:5.0f} s  skipped: {why or 'does not fit what is left'}")
            continue
        bench.assume(item)
        total += est
        print(f"{item.id:<64} ~{est:5.0f} s  (total ~{total:4.0f} s)")
    print(
        f"total ~{total:.0f} s of {budget:.0f} s ({args.minutes:g} minutes less {RESERVE_S:.0f} s kept);"
        f" the shards: {args.images} JPEGs on {bench.cores} cores"
    )
    return 0


def _measure(item, bench: tp.Throughput, budget: Budget, args, checks: dict) -> dict | None:
    """Run `item` if it fits the budget: its row (None for a check, which goes into `checks`)."""
    est = estimate_of(item, bench)
    left, start = budget.left(), time.monotonic()
    status, reason, result, extra = "ok", None, {}, []
    if not isinstance(item, Check) and bench.not_here(item):
        status, reason = "skipped", bench.not_here(item)
    elif budget.spent:
        status, reason = "skipped", "the budget ended during an earlier measurement"
    elif est > left:
        status, reason = "skipped", f"needs ~{est:.0f} s, {max(0.0, left):.0f} s of the budget left"
    else:
        try:
            with budget.deadline(cap=max(CAP_MIN_S, CAP_FACTOR * est)):
                if isinstance(item, Check):
                    try:
                        status, reason, *extra = CHECKS[item.name](bench, args)
                    finally:  # the deterministic check's settings would slow the measurements after it
                        torch.use_deterministic_algorithms(False)
                        torch.backends.cudnn.benchmark = True
                else:
                    result = bench.run(item)
        except BudgetSpent:
            bench.free()
            took = time.monotonic() - start
            if budget.left() > 1:  # its own cap: a hung loader or compile does not take the whole budget
                status, reason = (
                    "failed",
                    f"stopped after {took:.0f} s, {CAP_FACTOR}x its estimate of {est:.0f} s",
                )
            else:
                budget.spent = True
                status, reason = (
                    "skipped",
                    f"stopped when the budget ended, after {took:.0f} s (estimated {est:.0f} s)",
                )
        except Exception as e:  # a measurement that crashes has failed; the others still run
            status, reason = ("FAIL" if isinstance(item, Check) else "failed"), tp.one_line(e)
    wall = time.monotonic() - start
    if isinstance(item, Check):
        status = {"ok": "pass", "failed": "FAIL"}.get(status, status)
        checks[item.name] = {"status": status, "detail": reason, **(extra[0] if extra else {})}
        print(f"{item.id:<64} {status:<7} {reason}", flush=True)
        return None
    row = dict.fromkeys(ROW_KEYS)
    row.update({k: v for k, v in vars(item).items() if k in ROW_KEYS})
    row.update(id=item.id, kind=type(item).__name__.lower(), status=status, reason=reason)
    row.update(result, estimate_s=round(est, 1), wall_s=round(wall, 1))
    if isinstance(item, tp.Ddp):
        row.update(precision="bf16", compile=False)
    rate = f"{row['img_per_s']:,.0f} img/s" if row["img_per_s"] is not None else ""
    note = row["reason"] or row["detail"] or ""
    print(f"{item.id:<64} {status:<7} {rate:>13}  {wall:4.0f} s (est. {est:.0f})  {note}", flush=True)
    return row


def _state(name: str, device: torch.device, size: int, precision: str, deterministic: bool):
    from imagenet_ddp.config import load_config, resolve
    from imagenet_ddp.dist import DistEnv
    from imagenet_ddp.models import build_model
    from imagenet_ddp.state import make_state, seed_everything

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


def check_deterministic(bench, args):
    device, size = bench.device, args.check_size
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


def check_no_host_sync(bench, args):
    device, size = bench.device, args.check_size
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


def check_rng_state(bench, args):
    device = bench.device
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


def check_dali_mixed(bench, args):
    device, size = bench.device, args.check_size
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


RECIPE = Path(__file__).resolve().parents[2] / "configs" / "torchvision_resnet50_v2.yaml"


def check_sync_audit(bench, args):
    """sync_audit.audit_recipe on the torchvision V2 recipe (TrivialAugmentWide, random erasing,
    MixUp/CutMix, label smoothing, EMA, channels_last) at this run's first model, size and batch,
    fed by the torch backend's device decode from the generated shards: pass with no host sync in
    the training thread from the loader's next() to the optimizer step; the syncs listed if any."""
    from imagenet_ddp.bench.sync_audit import audit_recipe

    if not RECIPE.is_file():
        return "FAIL", f"{RECIPE} is missing (run from a checkout of the repository)", {"syncs": None}
    shards = bench.prepare()
    bench.free()  # the recipe builds its own model
    size, batch, model = args.sizes[0], args.batch_sizes[0], args.models[0]
    overrides = [
        f"data.root={shards}",
        "data.backend=torch",
        "data.decode_device=cuda",  # nvJPEG on a GPU, its CPU stand-in here
        "data.workers=2",
        f"data.image_size={size}",
        f"data.eval_size={size}",
        f"data.eval_resize_size={size}",
        "data.random_erase=1.0",  # every image erased: each audited step runs the erasing code
        f"train.batch_size={batch}",
        f"model.name={model}",
    ]
    steps = 2
    syncs = audit_recipe(str(RECIPE), overrides, bench.device, steps)
    how = "CUDA's sync debug mode" if bench.device.type == "cuda" else "the CPU stand-in"
    what = (
        f"{RECIPE.name} ({model}, {size} px, batch {batch}, random_erase 1.0, device decode), {steps} steps"
    )
    if not syncs:
        return "pass", f"{what}: no host sync ({how})", {"syncs": []}
    return "FAIL", f"{what}: {len(syncs)} host sync(s) ({how}): " + "; ".join(syncs), {"syncs": syncs}


CHECKS = {
    "sync_audit": check_sync_audit,
    "deterministic": check_deterministic,
    "no_host_sync": check_no_host_sync,
    "rng_state": check_rng_state,
    "dali_mixed": check_dali_mixed,
}


if __name__ == "__main__":
    sys.exit(main())
