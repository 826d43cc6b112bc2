"""What `python -m imagenet_ddp.bench gpu` measures (gpu.py plans the runs and keeps to the budget).

    python -m imagenet_ddp.bench gpu --minutes 8 --out runs/bench-gpu

Training is the project's own step (state.make_state and engine.train_step: fused SGD with Nesterov momentum,
label smoothing, the one AMP path, channels_last, torch.compile), fed four ways:
- synthetic: one batch reused on the device, no loading at all: the upper bound;
- torch, device decode (data.decode_device=cuda): the workers read JPEG bytes, the main process
  decodes the batch with nvJPEG and crops on the GPU (on a CPU device: the CPU stand-in);
- torch, worker decode (data.decode_device=cpu): libjpeg-turbo in the DataLoader workers;
- dali: the dali backend ("mixed" nvJPEG on a GPU), when DALI can be imported.
The real feeds read shards written here first: JPEGs from imagenet_ddp.synth (500x375, quality 90,
~75 KB: an ImageNet photo's weight) packed by shards.pack_split. Each loader pass skips its first
WARMUP batches (worker start-up, pipeline fill) before the clock starts: a 1.28M-image epoch pays
that once per 5,000 steps, these short passes would pay it every few seconds.
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

WARMUP = 3  # steps (batches of each loader pass) before the clock starts
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

    @property
    def state_key(self) -> tuple:
        return (self.model, self.size, self.batch_size, self.precision, self.compile)

    @property
    def id(self) -> str:
        how = "compiled" if self.compile else "eager"
        return f"train {self.model} {self.size}px b{self.batch_size} {self.precision} {how} {self.feed}"


@dataclass(frozen=True)
class Decode:
    decoder: str  # nvjpeg | cpu
    batch_size: int

    @property
    def id(self) -> str:
        return f"decode {self.decoder} b{self.batch_size}"


@dataclass(frozen=True)
class Ddp:
    model: str
    size: int
    batch_size: int

    @property
    def id(self) -> str:
        return f"ddp {self.model} {self.size}px b{self.batch_size} bf16 eager synthetic"


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
        self.loader_start = 4.0 if gpu else 3.0  # a real loader's first WARMUP batches
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
        self.shards: Path | None = None
        self.jpegs: list[bytes] = []  # some of the generated files, for the decode rows
        self.shards_info: dict = {}
        self._key, self._state = None, None

    # -- estimates ----------------------------------------------------------------------------------
    def timed_steps(self, step_s: float) -> int:
        if self.opts.steps:
            return self.opts.steps
        return int(min(MAX_STEPS, max(MIN_STEPS, self.opts.slice / step_s)))

    def estimate(self, item) -> float:
        c = self.costs
        if isinstance(item, Decode):
            return self._prepare_estimate() + 2 + self.opts.slice
        if isinstance(item, Ddp):
            step = c.step(item.model, item.size, item.batch_size)
            return c.ddp_start + (WARMUP + self.timed_steps(step)) * step
        step = c.step(item.model, item.size, item.batch_size)
        seconds = (WARMUP + self.timed_steps(step)) * step
        if item.state_key != self._key:
            seconds += c.setup + (c.compile_s(item.model) if item.compile else 0)
        if item.feed != "synthetic":
            seconds += c.loader_start + self._prepare_estimate()
        return seconds

    def _prepare_estimate(self) -> float:
        if self.shards is not None or self.shards_info.get("error"):
            return 0.0
        return 2 + self.opts.images * 0.006 / cores()  # ~4 ms to draw and encode, ~2 ms to pack

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
        try:
            measured = train_rate(state, loader, self.device, WARMUP, self.timed_steps, self.opts.slice)
        finally:
            loader.close()
        if t.feed == "synthetic":
            self.costs.saw_step(t, measured["step_s"])
        else:
            self.costs.loader_start = max(self.costs.loader_start, measured["first_s"])
        compile_s = None
        if new:
            extra = measured["first_s"] - WARMUP * measured["step_s"]
            if t.compile:
                compile_s = round(max(0.0, extra), 1)
                self.costs.compile[t.model] = max(self.costs.compile.get(t.model, 0.0), compile_s)
            else:
                self.costs.setup = max(self.costs.setup, time.perf_counter() - start - measured["timed_s"])
        detail = f"{measured['steps']} timed steps over {measured['passes']} loader pass(es)"
        if t.feed == "torch-device":
            detail += "; nvJPEG" if self.device.type == "cuda" else "; CPU stand-in for nvJPEG"
        return {
            "img_per_s": round(measured["images"] / measured["timed_s"], 1),
            "steps": measured["steps"],
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
            "peak_mem_gib": result["peak_mem_gib"],
            "detail": f"torchrun, 1 process, DistributedDataParallel over {result['backend']}"
            + (f" (NCCL {result['nccl']})" if result.get("nccl") else ""),
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


def train_rate(state, loader, device, warmup: int, steps_for, slice_s: float) -> dict:
    """Train steps fed by `loader` until the timed steps are done; each pass's first `warmup` batches
    are not timed. Returns images and seconds timed, the steps, and the first pass's warm-up time."""
    from imagenet_ddp.engine import train_step

    images = steps = passes = 0
    timed = first = 0.0
    target, epoch, step_s = None, 0, None
    start = time.perf_counter()
    while target is None or steps < target:
        if len(loader) <= warmup:
            raise RuntimeError(f"a pass has {len(loader)} batches, not more than the {warmup} of warm-up")
        loader.set_epoch(epoch)
        passes, epoch = passes + 1, epoch + 1
        for i, (x, y) in enumerate(loader):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
                if passes == 1:
                    first = t0 - start
            train_step(state, [(x, y)])
            if i < warmup:
                continue
            steps, images = steps + 1, images + len(y)
            if target is None and steps == 2:  # one step timed (synced): how many fit the slice
                sync(device)
                step_s = (time.perf_counter() - t0) / 2
                target = max(2, steps_for(step_s))
            if target is not None and steps >= target:
                break
        sync(device)
        timed += time.perf_counter() - t0
        loader.end_pass()
    return {
        "images": images,
        "timed_s": timed,
        "steps": steps,
        "passes": passes,
        "first_s": first,
        "step_s": timed / steps,
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()
