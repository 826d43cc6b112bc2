"""What `python -m imagenet_ddp.bench gpu` measures (gpu.py plans the runs and keeps to the budget).

    python -m imagenet_ddp.bench gpu --minutes 8 --out runs/bench-gpu

Training is the project's own step (state.make_state and engine.train_step: fused SGD with Nesterov momentum,
label smoothing, the one AMP path, channels_last, torch.compile), fed four ways:
- synthetic: one batch reused on the device, no loading at all: the upper bound;
- torch, device decode (data.decode_device=cuda): the workers read JPEG bytes, the main process
  decodes the batch with nvJPEG and crops on the GPU (on a CPU device: the CPU stand-in);
- torch, worker decode (data.decode_device=cpu): libjpeg-turbo in the DataLoader workers;
- dali: the dali backend ("mixed" nvJPEG on a GPU), when DALI can be imported.
The torch feed with device decode also runs with data.auto_augment=ta_wide (TrivialAugmentWide in
the decode thread). The real feeds read shards written here first: JPEGs from imagenet_ddp.synth
(500x375, quality 90, ~75 KB: an ImageNet photo's weight) packed by shards.pack_split.

When the clock starts (the warm-up rule): a real loader prepares batches ahead of the training, up
to `prepared_ahead` of them (the DataLoader's workers x prefetch_factor, the device decoder's queue
of gpu_decode.PREFETCH and the batch it is finishing, DALI's prefetch queue). Those are made before
the clock starts, so a short timed stretch would read up to (timed + ahead) / timed of the steady
rate. So a loader row skips W = max(WARMUP, ahead) batches (worker start-up, pipeline fill), then
times at least --hold x W batches (HOLD = 11 by default): what was ready when the clock started is
under 10% of the timed work (the tests lower --hold to keep CPU runs short; the report says it). The timed batches run on across passes where one pass is too short (--images): each new
pass's start-up (fresh workers) is then inside the clock, which costs a little, never flatters.
Synthetic rows skip WARMUP steps (first-call allocations, cuDNN's choice of kernels). Each row's
JSON says `warmup_batches` (W), `prepared_ahead`, `steps` (the timed batches) and `passes`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imagenet_ddp.bench.gpu_jpegs import IMAGE, cores, decode_cpu, decode_nvjpeg, sync, write_shards
from imagenet_ddp.data import jpeg

WARMUP = 3  # steps before the clock starts, at least (first-call set-up, cuDNN's kernel choice)
HOLD = 11  # --hold's default: a loader row times >= HOLD x its skipped batches, those held ready < 10% of it
TORCH_PREFETCH_FACTOR = 4  # the torch backend's DataLoader(prefetch_factor=...): for estimates only
MIN_STEPS, MAX_STEPS = 5, 400  # timed steps of a measurement without --steps
GFLOPS = {"resnet18": 1.8, "resnet34": 3.7, "resnet50": 4.1, "resnet101": 7.8}  # per 224 px image, forward
FEEDS = ("synthetic", "torch-device", "torch-workers", "dali")


@dataclass(frozen=True)
class Train:
    model: str
    size: int
    batch_size: int
    precision: str = "bf16"
    compile: bool = False
    feed: str = "synthetic"
    auto_augment: str = "none"  # data.auto_augment of a real feed

    @property
    def state_key(self) -> tuple:
        return (self.model, self.size, self.batch_size, self.precision, self.compile)

    @property
    def id(self) -> str:
        how = "compiled" if self.compile else "eager"
        policy = "" if self.auto_augment == "none" else f" {self.auto_augment}"
        return (
            f"train {self.model} {self.size}px b{self.batch_size} {self.precision} {how} {self.feed}{policy}"
        )


@dataclass(frozen=True)
class Decode:
    decoder: str  # nvjpeg | cpu
    batch_size: int

    @property
    def id(self) -> str:
        return f"decode {self.decoder} b{self.batch_size}"


@dataclass(frozen=True)
class Ddp:
    """DistributedDataParallel on one process: the wrapper's own cost (its hooks and gradient buckets,
    an all-reduce with no peer), not scaling, which needs two GPUs or more."""

    model: str
    size: int
    batch_size: int

    @property
    def id(self) -> str:
        return f"ddp overhead {self.model} {self.size}px b{self.batch_size} bf16 eager synthetic 1 process"


class Costs:
    """Seconds each part of a measurement takes, as seen so far in this run (guesses before that)."""

    def __init__(self, device: torch.device):
        gpu = device.type == "cuda"
        # Train seconds per GFLOP of one image's forward (GFLOPS), the slowest seen of each model:
        # an estimate too high skips a measurement, one too low overruns the budget.
        self.rates: dict[str, float] = {}
        self.rate_default = 1 / 2800 / 4.1 if gpu else 0.3 / 4.1  # guesses: ResNet-50 at 224 px
        self.setup = 4.0 if gpu else 2.0  # model build, move and the first (cuDNN-tuning) step
        self.compile: dict[str, float] = {}  # model: seconds of its first compiled step, the worst seen
        self.compile_default = 60.0  # GPU machine: ~1 min per model and size; this CPU: 26-39 s (ResNet-18)
        self.loader_start = 4.0 if gpu else 3.0  # a real loader's start-up, before its first batch
        self.ddp_start = 25.0 if gpu else 20.0  # torchrun, imports, process group, DDP, first steps

    def step(self, model: str, size: int, batch_size: int) -> float:
        rate = self.rates.get(model, max(self.rates.values(), default=self.rate_default))
        return rate * GFLOPS.get(model, 4.1) * (size / 224) ** 2 * batch_size

    def saw_step(self, t: Train, seconds: float) -> None:
        rate = seconds / (GFLOPS.get(t.model, 4.1) * (t.size / 224) ** 2 * t.batch_size)
        self.rates[t.model] = max(rate, self.rates.get(t.model, 0.0))

    def compile_s(self, model: str) -> float:
        return self.compile.get(model, max(self.compile.values(), default=self.compile_default))


class Throughput:
    """Runs one measurement at a time; keeps the last training state for the next row of the same
    configuration (the feeds of one model share its compile), and the generated shards."""

    def __init__(self, device: torch.device, opts, tmp: Path):
        self.device, self.opts, self.tmp = device, opts, tmp
        self.costs = Costs(device)
        self.cores = getattr(opts, "cores", None) or cores()  # generating the shards (--estimate: assumed)
        self.shards: Path | None = None
        self.jpegs: list[bytes] = []  # some of the generated files, for the decode rows
        self.shards_info: dict = {}
        self._key, self._state = None, None
        self._shards_assumed = False

    # -- estimates ----------------------------------------------------------------------------------
    def timed_steps(self, step_s: float, skipped: int = 0) -> int:
        """--steps, or the steps of --slice seconds; a loader row's at least --hold x its `skipped`."""
        steps = self.opts.steps or int(min(MAX_STEPS, max(MIN_STEPS, self.opts.slice / step_s)))
        return max(steps, self.opts.hold * skipped)

    def estimate(self, item) -> float:
        c = self.costs
        if isinstance(item, Decode):
            return self.prepare_estimate() + 2 + self.opts.slice
        if isinstance(item, Ddp):
            step = c.step(item.model, item.size, item.batch_size)
            return c.ddp_start + (WARMUP + self.timed_steps(step)) * step
        step = c.step(item.model, item.size, item.batch_size)
        skip = warmup_batches(ahead_estimate(item.feed, self.opts.workers))
        seconds = (skip + self.timed_steps(step, skip if item.feed != "synthetic" else 0)) * step
        if item.state_key != self._key:
            seconds += c.setup + (c.compile_s(item.model) if item.compile else 0)
        if item.feed != "synthetic":
            seconds += c.loader_start + self.prepare_estimate()
        return seconds

    def prepare_estimate(self) -> float:
        if self.shards is not None or self._shards_assumed or self.shards_info.get("error"):
            return 0.0
        return 2 + self.opts.images * 0.006 / self.cores  # ~4 ms to draw and encode, ~2 ms to pack

    def assume(self, item) -> None:
        """For an estimate of a whole plan without running it: what running `item` leaves behind
        (its model's state, the shards), so that the next items' estimates count them once."""
        if isinstance(item, Train):
            self._key = item.state_key  # no state: an estimating Throughput never runs
        elif isinstance(item, Ddp) or getattr(item, "name", None) == "sync_audit":
            self._key = None  # each frees the state for its own model
        if (
            getattr(item, "feed", "synthetic") != "synthetic"
            or isinstance(item, Decode)
            or (getattr(item, "name", None) == "sync_audit")
        ):
            self._shards_assumed = True

    # -- measurements -------------------------------------------------------------------------------
    def not_here(self, item) -> str | None:
        """Why `item` cannot be measured on this device or install; None when it can."""
        gpu = self.device.type == "cuda"
        if isinstance(item, Train) and item.precision == "fp16" and not gpu:
            return "fp16 with GradScaler needs a GPU (train.precision=fp16 is refused on CPU)"
        if (
            isinstance(item, Train)
            and item.feed == "dali"
            and importlib.util.find_spec("nvidia.dali") is None
        ):
            return "DALI is not installed here"
        if isinstance(item, Decode) and item.decoder == "nvjpeg" and not gpu:
            return "nvJPEG needs a CUDA device"
        return None

    def run(self, item) -> dict:
        """The row's measured fields."""
        if isinstance(item, Decode):
            return self._decode(item)
        if isinstance(item, Ddp):
            return self._ddp(item)
        return self._train(item)

    def _train(self, t: Train) -> dict:
        if t.feed != "synthetic":
            self.prepare()
        reset_peak(self.device)
        new = t.state_key != self._key
        start = time.perf_counter()
        state = self._state_for(t)
        loader = self._loader(t)
        ahead = prepared_ahead(loader)
        skip = warmup_batches(ahead)
        try:
            steps_for = lambda step_s: self.timed_steps(step_s, skip if ahead else 0)  # noqa: E731
            measured = train_rate(state, loader, self.device, skip, steps_for)
        finally:
            loader.close()
        before_clock = measured["first_s"] - skip * measured["step_s"]  # start-up, compile or cuDNN set-up
        if t.feed == "synthetic":
            self.costs.saw_step(t, measured["step_s"])
        else:
            self.costs.loader_start = max(self.costs.loader_start, before_clock)
        compile_s = None
        if new:
            if t.compile:
                compile_s = round(max(0.0, before_clock), 1)
                self.costs.compile[t.model] = max(self.costs.compile.get(t.model, 0.0), compile_s)
            else:
                self.costs.setup = max(self.costs.setup, time.perf_counter() - start - measured["timed_s"])
        detail = (
            f"{measured['steps']} timed steps after {skip} skipped, over {measured['passes']} loader pass(es)"
        )
        if ahead:
            detail += f" (the loader holds up to {ahead} batches prepared: {ahead_words(loader)})"
        if t.feed == "torch-device":
            detail += "; nvJPEG" if self.device.type == "cuda" else "; CPU stand-in for nvJPEG"
        return {
            "img_per_s": round(measured["images"] / measured["timed_s"], 1),
            "steps": measured["steps"],
            "warmup_batches": skip,
            "prepared_ahead": ahead,
            "passes": measured["passes"],
            "compile_s": compile_s,
            "peak_mem_gib": peak(self.device),
            "detail": detail,
        }

    def _state_for(self, t: Train):
        if t.state_key != self._key:
            self.free()
            self._state, self._key = build_state(t, self.device), t.state_key
        return self._state

    def free(self) -> None:
        self._key, self._state = None, None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _loader(self, t: Train):
        from imagenet_ddp.data import DataConfig, build_loader

        backend = "torch" if t.feed.startswith("torch") else t.feed
        cfg = DataConfig(
            root=str(self.shards or self.tmp / "none"),
            backend=backend,
            image_size=t.size,
            batch_size=t.batch_size,
            workers=self.opts.workers,
            channels_last=True,
            shuffle_buffer=256,
            decode_device="cuda" if t.feed == "torch-device" else "cpu",
            auto_augment=t.auto_augment,
        )
        return build_loader(cfg, "train", device=self.device)

    def prepare(self) -> Path:
        """Shards of --images generated JPEGs in tmp/shards (once); raises what stopped them."""
        if self.shards_info.get("error"):
            raise RuntimeError(f"no shards: {self.shards_info['error']}")
        if self.shards is not None:
            return self.shards
        start = time.perf_counter()
        try:
            self.shards = write_shards(self.tmp, self.opts.images, self.jpegs)
        except Exception as e:
            self.shards_info = {"error": one_line(e)}
            raise
        sizes = [len(j) for j in self.jpegs]
        self.shards_info = {
            "images": self.opts.images,
            "width_height": list(IMAGE),
            "mean_kb": round(sum(sizes) / len(sizes) / 1000, 1),
            "seconds": round(time.perf_counter() - start, 1),
        }
        return self.shards

    def _decode(self, d: Decode) -> dict:
        self.prepare()
        count = self.opts.steps * d.batch_size if self.opts.steps else None
        if d.decoder == "nvjpeg":
            rate, images = decode_nvjpeg(self.jpegs, d.batch_size, self.device, self.opts.slice, count)
            detail = f"{jpeg.backend()[0]} decode_jpeg(list of {d.batch_size}, device=cuda)"
        else:
            rate, images = decode_cpu(self.jpegs, cores(), self.opts.slice, count)
            detail = f"{jpeg.backend()[0]} decode_jpeg on the CPU (libjpeg-turbo), {cores()} processes"
        return {"img_per_s": round(rate, 1), "steps": images // d.batch_size, "detail": detail}

    def _ddp(self, d: Ddp) -> dict:
        self.free()  # its own process needs the GPU's memory
        out = self.tmp / "ddp.json"
        step = self.costs.step(d.model, d.size, d.batch_size)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        cmd += ["-m", "imagenet_ddp.bench.gpu_ddp", "--device", self.device.type, "--model", d.model]
        cmd += ["--size", str(d.size), "--batch-size", str(d.batch_size), "--out", str(out)]
        cmd += ["--steps", str(self.timed_steps(step))]
        repo = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.Popen(
            cmd,
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # torchrun and its worker go together if the budget ends them
        )
        try:
            log, _ = proc.communicate()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode != 0:
            tail = [line for line in log.splitlines() if line.strip()][-3:]
            raise RuntimeError(f"torchrun exited {proc.returncode}: {' | '.join(tail)}")
        result = json.loads(out.read_text())
        return {
            "img_per_s": result["img_per_s"],
            "steps": result["steps"],
            "warmup_batches": result["warmup_batches"],
            "prepared_ahead": 0,
            "passes": result["passes"],
            "peak_mem_gib": result["peak_mem_gib"],
            "detail": f"torchrun, 1 process, DistributedDataParallel over {result['backend']}"
            + (f" (NCCL {result['nccl']})" if result.get("nccl") else "")
            + ": the wrapper's overhead (an all-reduce with no peer), not scaling (2+ GPUs)",
            "feed": "synthetic",
        }


def build_state(t: Train, device: torch.device):
    """state.make_state for `t` on one process, as train_ddp.py builds it."""
    from imagenet_ddp.config import load_config, resolve
    from imagenet_ddp.dist import DistEnv
    from imagenet_ddp.models import build_model
    from imagenet_ddp.state import make_state, seed_everything

    if t.compile:
        torch._dynamo.reset()  # a fresh cache: ResNets share forward's code, recompiles would pile up
    seed_everything(0, 0, deterministic=False)  # cudnn.benchmark on
    overrides = [
        f"model.name={t.model}",
        f"train.batch_size={t.batch_size}",
        f"train.precision={t.precision}",
    ]
    overrides += ["train.channels_last=true", f"train.compile={str(t.compile).lower()}"]
    cfg = resolve(load_config(None, overrides), 1, device.type, 1000)
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=device)
    return make_state(build_model(t.model, num_classes=1000), cfg, env)


def train_rate(state, loader, device, skip: int, steps_for) -> dict:
    """Train steps fed by `loader`: `skip` batches untimed, then the clock runs (across passes where
    one is too short) until steps_for(seconds per step, from the first two timed) steps are done.
    Returns images and seconds timed, the steps, the passes and the time until the clock started."""
    from imagenet_ddp.engine import train_step

    images = steps = passes = seen = 0
    t0 = first = target = None
    start = time.perf_counter()
    while True:
        loader.set_epoch(passes)
        passes += 1
        for x, y in loader:
            train_step(state, [(x, y)])
            seen += 1
            if t0 is None:
                if seen == skip:  # the next batch is fetched on the clock
                    sync(device)
                    t0 = time.perf_counter()
                    first = t0 - start
                continue
            steps, images = steps + 1, images + len(y)
            if target is None and steps == 2:  # two steps timed (synced): how many to time
                sync(device)
                target = max(2, steps_for((time.perf_counter() - t0) / 2))
            if target is not None and steps >= target:
                break
        if target is not None and steps >= target:
            break
        loader.end_pass()  # on the clock once it runs: a new pass's start-up is the loader's cost
    sync(device)
    timed = time.perf_counter() - t0
    loader.end_pass()
    return {
        "images": images,
        "timed_s": timed,
        "steps": steps,
        "passes": passes,
        "first_s": first,
        "step_s": timed / steps,
    }


def prepared_ahead(loader) -> int:
    """Batches `loader` can hold prepared before the training asks for them: the torch backend's
    DataLoader workers x prefetch_factor (+ the device decoder's queue and the batch it finishes),
    DALI's prefetch queue; 0 for synthetic data (one batch, reused)."""
    cfg = getattr(loader, "cfg", None)
    if cfg is None or cfg.backend == "synthetic":
        return 0
    if cfg.backend == "dali":
        return cfg.dali_prefetch_queue_depth
    workers, factor, queued = _torch_ahead(loader)
    return workers * factor + queued


def _torch_ahead(loader) -> tuple[int, int, int]:
    data = loader._loader  # the DataLoader: what it was built with, not a copy of the numbers
    decoder = getattr(loader, "decoder", None)
    queued = decoder.prefetch + 1 if decoder is not None and decoder.prefetch else 0
    return data.num_workers, data.prefetch_factor or 0, queued


def ahead_words(loader) -> str:
    if loader.cfg.backend == "dali":
        return "DALI's prefetch queue"
    workers, factor, queued = _torch_ahead(loader)
    words = f"{workers} worker{'s' if workers != 1 else ''} x prefetch {factor}"
    return words + (f" + the decode thread's queue of {queued - 1} and 1 in hand" if queued else "")


def ahead_estimate(feed: str, workers: int) -> int:
    """prepared_ahead of a feed's loader, before it is built (for the budget)."""
    from imagenet_ddp.data.gpu_decode import PREFETCH

    if feed == "synthetic":
        return 0
    if feed == "dali":
        return 2  # data.dali_prefetch_queue_depth's default
    return workers * TORCH_PREFETCH_FACTOR + (PREFETCH + 1 if feed == "torch-device" else 0)


def warmup_batches(ahead: int) -> int:
    """Batches skipped before the clock starts."""
    return max(WARMUP, ahead)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()
