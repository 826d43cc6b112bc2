"""Checkpoints: atomic writes, rotation, auto-resume, loading with weights_only=True.

    python train_ddp.py --config configs/demo.yaml run.dir=runs/demo    # run twice: the second resumes

A run folder holds
    step-00001234.pt   one file per save (the newest `run.keep_last` are kept)
    last.pt            the newest save (a hard link to the newest step file, or a copy)
    best.pt            the save with the highest val top-1 so far

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so `torch.load(path,
weights_only=True)` reads it and predict.py needs nothing else:

    format          "imagenet-ddp-checkpoint/1"
    architecture    build_model(**architecture) rebuilds the network (name, num_classes, small_input, ...)
    model           state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    ema             state_dict of the EMA weights (same keys as model), or None
    classes         class index -> wnid (or folder name);  class_names: class index -> English name
    preprocess      evaluation transform: {"resize", "crop", "mean", "std", "interpolation"}
    metrics         the last epoch's metrics.jsonl record (val_top1, ...), or None before the first epoch
    step            optimizer steps done;  epoch: the epoch in progress (0-based);  batch_in_epoch: loader
                    batches of it consumed (0 at an epoch boundary)
    optimizer, scaler, best_val_top1, nonfinite_streak, wandb_run_id, world_size
    config          the resolved config (a dict: config_from_dict(ckpt["config"]) rebuilds it)
    ranks           per rank: {"rng": RNG states, "epoch_totals": [loss sum, correct, samples],
                    "loader": the train loader's state_dict (DALI: its reader checkpoint, ~500 bytes),
                    "host": the hostname it ran on}
    weights_sha256  per rank: sha256 of the parameters (all equal: the replicas agree)
    init_from       where the starting weights came from ({"source", "sha256", "head", "head_rows_loaded"}),
                    or None for random initialisation
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from imagenet_ddp.errors import UserError

FORMAT = "imagenet-ddp-checkpoint/1"
_STEP_FILE = re.compile(r"step-(\d{8,})\.pt$")


def inference_info(
    architecture: dict,
    classes: list[str],
    class_names: list[str],
    resize: int,
    crop: int,
    flip: bool = False,
    interpolation: str = "bilinear",
) -> dict:
    """The part of a checkpoint predict.py needs besides the weights: the checkpoint contract."""
    from imagenet_ddp.data.presets import IMAGENET_MEAN, IMAGENET_STD

    return {
        "format": FORMAT,
        "architecture": architecture,
        "classes": list(classes),
        "class_names": list(class_names),
        "preprocess": {
            "resize": resize,  # shorter side, resized with `interpolation` and antialiasing
            "crop": crop,  # then a centre crop of crop x crop
            "mean": list(IMAGENET_MEAN),  # of RGB values scaled to [0, 1]
            "std": list(IMAGENET_STD),
            "interpolation": interpolation,  # bilinear or bicubic: the run's data.interpolation
            "flip": flip,  # validation averaged the logits of the image and its mirror (train.eval_flip)
        },
    }


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read."""


class NonFiniteWeightsError(UserError):
    """Weights with NaN/Inf: saving them would replace a usable checkpoint with garbage."""


def nonfinite_tensors(weights: dict) -> list[str]:
    """Names of the floating-point tensors of a state_dict that hold a NaN or an infinity."""
    return [
        name
        for name, t in weights.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers: what is saved and evaluated."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


class _WriteErrors:
    """A file for torch.save that remembers the OSError of a failed write. torch.save reports a full
    disk as a RuntimeError about stream positions ("unexpected pos 768 vs 662"), not as the OSError."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename: `path` is the old or the new file,
    never a partial one. On failure (disk full) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = None
    try:
        with open(tmp, "wb") as file:
            f = _WriteErrors(file)
            torch.save(obj, f)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = e if isinstance(e, OSError) else f.error if f is not None else None
        if error is not None:
            raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}") from None
        raise
    _fsync_dir(path.parent)


def _link_atomic(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src`, replacing it atomically (copy where links are refused)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write checkpoint {dst}: {e.strerror or e}") from None
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load(path: str | Path) -> dict:
    """A checkpoint on the CPU, read with weights_only=True (no code runs while loading)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... on damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an imagenet-ddp checkpoint (format {FORMAT})")
    return ckpt


class CheckpointDir:
    """The checkpoints of one run folder. Every rank reads them; only a `writer` (rank 0) writes."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2, writer: bool = True):
        self.dir = Path(run_dir)
        self.keep_last = keep_last
        self.writer = writer

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def step_files(self) -> list[Path]:
        """Step checkpoints, newest first."""
        found = [(int(m.group(1)), p) for p in self.dir.glob("step-*.pt") if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, ckpt: dict, is_best: bool = False) -> Path | None:
        """Write `ckpt` as the newest checkpoint (and best.pt); drop step files beyond keep_last."""
        if not self.writer:
            return None
        for key in ("model", "ema"):
            bad = nonfinite_tensors(ckpt.get(key) or {})
            if bad:
                raise NonFiniteWeightsError(
                    f"{len(bad)} of {len(ckpt[key])} tensors of the {key} weights hold NaN/Inf at step "
                    f"{ckpt.get('step')} (first: {bad[0]}): not saved, {self.last.name} and "
                    f"{self.best.name} are kept. Lower optim.lr, set train.grad_clip, or use bf16/fp32"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        # A writer killed in the middle of a save (SIGKILL, power loss) leaves its temporary file:
        # the run folder has one writer, so any such file is a dead one's (a checkpoint's size each).
        for partial in self.dir.glob(".*.pt.tmp-*"):
            partial.unlink(missing_ok=True)
        if self.keep_last == 0:
            save_atomic(ckpt, self.last)
            written = self.last
        else:
            written = self.dir / f"step-{ckpt['step']:08d}.pt"
            save_atomic(ckpt, written)
            _link_atomic(written, self.last)
        if is_best:
            _link_atomic(written, self.best)
        for old in self.step_files()[self.keep_last :]:
            old.unlink(missing_ok=True)
        return written

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads: last.pt, else the step files newest first (with a warning
        for each damaged one). None when the folder has none."""
        candidates = ([self.last] if self.last.exists() else []) + self.step_files()
        for path in candidates:
            try:
                return load(path), path
            except CheckpointError as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__  # one line
                print(f"warning: {first}; trying an older checkpoint", file=sys.stderr, flush=True)
        if candidates:
            raise CheckpointError(f"no readable checkpoint in {self.dir} (tried {len(candidates)})")
        return None


def weights_digest(model: nn.Module) -> str:
    """sha256 of the parameters: equal on every rank while DDP keeps the replicas in step. (Buffers are
    left out: BatchNorm statistics are rank 0's at each forward, then updated with the local batch.)"""
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())  # flatten: any layout
    return h.hexdigest()


def rng_state(device: torch.device) -> dict:
    """This process's RNG states in weights_only-loadable types: the CPU's, and its own GPU's only (a
    rank restored where it sees fewer GPUs, as under `srun --gpus-per-task=1`, still finds its own)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # older checkpoints: every visible GPU's state
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss_np))


def describe(ckpt: dict) -> str:
    """One line for the console: where training resumes."""
    val = (ckpt.get("metrics") or {}).get("val_top1")
    at = f"epoch {ckpt['epoch']} batch {ckpt['batch_in_epoch']}"
    return f"step {ckpt['step']} ({at}{f', val top-1 {val:.2%}' if val is not None else ''})"
