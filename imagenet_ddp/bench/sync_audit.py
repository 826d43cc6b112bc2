"""The host-sync audit: does a training step make the host wait for the device?

    with no_host_syncs(device) as audit:
        images, labels = next(batches)                       # the loader's next()
        train_step(state, [(images, labels)])                # batch augmentation, forward, backward, step
    audit.syncs   # [] when none; else one line per sync: what it was and where

    audit_recipe("configs/torchvision_resnet50_v2.yaml", overrides, device)   # the same, for a recipe

On a CUDA device, torch's own detector: set_sync_debug_mode("warn") reports every synchronizing
CUDA call (a blocking copy, .item(), nonzero, a stream or device synchronize); the audit keeps those
made by the thread that opened it (the training thread), not those of a loader's decode thread,
whose waits are its own. `bench gpu` runs it on the GPU.

On a CPU device there is no device to wait for; a stand-in watches for what would be a sync on a
GPU, through a TorchFunctionMode (thread-local: the training thread only). Tensors are "host" when
this thread made them from Python data without naming a device (torch.tensor(x), torch.rand(1): the
draws of torchvision's transforms), when declared so (Audit.on_host: the batch augmentation's
transforms, whose state is on the CPU on a GPU run too), or computed from host tensors alone; every
other tensor, the loader's batch, the model's weights, anything made with device=..., is a "device"
tensor. Flagged:
- a device tensor read on the host: .item(), float(), int(), bool(), .tolist(), .numpy(), .cpu(),
  nonzero, equal, unique, masked_select;
- a host tensor with elements (not a 0-dim scalar, which CUDA kernels take as a number) combined
  with a device tensor: on a GPU, a blocking copy into the device (or an error), e.g. torchvision's
  RandomErasing filling a box from its CPU value tensor; a 0-dim one copied into a device tensor;
- a tensor made on the device from host data (torch.tensor(data, device=...)), or a host tensor
  moved to the device without non_blocking=True: a copy from pageable memory, which waits.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
import warnings
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_READS = {
    "item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero",
    "equal", "unique", "masked_select", "argwhere", "__format__", "__repr__",
}  # fmt: skip
_FROM_DATA = {"tensor", "as_tensor", "new_tensor", "asarray"}  # the constructors that take device=
_INTO = {"__setitem__", "copy_", "index_put_", "index_put", "masked_scatter_"}


@dataclass
class Audit:
    device: torch.device
    syncs: list[str] = field(default_factory=list)
    host: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # the stand-in's host tensors

    def saw(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "sync_audit" not in f.filename]
        ours = [f for f in frames if "/torch/" not in f.filename] or frames  # the innermost not in torch
        where = f"{'/'.join(ours[-1].filename.rsplit('/', 2)[-2:])}:{ours[-1].lineno}" if ours else "?"
        self.syncs.append(f"{what} at {where}")

    def on_host(self, *objects) -> None:
        """Declare the tensors held by `objects` (and what they hold) host tensors: state made before
        the audit on the CPU also on a GPU run, such as torchvision's transforms' (MixUp's Beta
        distribution, RandomErasing's log ratios). Only the CPU stand-in needs it."""
        seen, todo = set(), list(objects)
        while todo:
            obj = todo.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                self.host[obj] = True
            elif isinstance(obj, dict):
                todo.extend(obj.values())
            elif isinstance(obj, (list, tuple)):
                todo.extend(obj)
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                todo.extend(vars(obj).values())


@contextlib.contextmanager
def no_host_syncs(device: torch.device):
    """Collect what would make the host wait for `device` in this thread (see the module docstring)."""
    audit = Audit(torch.device(device))
    if audit.device.type == "cuda":
        with _cuda_audit(audit):
            yield audit
    else:
        with _StandIn(audit):
            yield audit


@contextlib.contextmanager
def _cuda_audit(audit: Audit):
    torch.cuda.synchronize(audit.device)  # what was queued before is not the audited code's
    me, show = threading.get_ident(), warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message) and threading.get_ident() == me:
            audit.saw(str(message).splitlines()[0])
        elif "synchronizing" not in str(message):
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", ".*synchronizing", UserWarning)
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


class _StandIn(TorchFunctionMode):
    def __init__(self, audit: Audit):
        super().__init__()
        self.audit = audit
        self.host = audit.host  # tensors made on the host by this thread, or declared so

    def _is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device_in = [t for t in tensors if not self._is_host(t)]
        host_in = [t for t in tensors if self._is_host(t)]
        if name in _READS and device_in:
            self.audit.saw(f"{name}() of a device tensor")
        if device_in and any(t.dim() > 0 or name in _INTO for t in host_in):
            self.audit.saw(f"{name}() with a host tensor into a device one (a blocking copy on a GPU)")
        if name in _FROM_DATA and "device" in kwargs and not tensors:
            self.audit.saw(f"torch.{name}(data, device=...): a copy from pageable host memory")
        # On a CPU, .to(device) names the host too: any device named is taken as the audited one
        # (code that reads a tensor back uses .cpu(), .tolist() or .item(), all flagged above).
        moving = name == "cuda" or (name == "to" and _names_device(args[1:], kwargs))
        if moving and host_in and not kwargs.get("non_blocking", False):
            self.audit.saw(f"{name}() of a host tensor to the device without non_blocking")
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if moving:
            for t in outputs:  # moved to the device (on a CPU, the same tensor object)
                self.host.pop(t, None)
        elif not device_in and "device" not in kwargs:  # made from host data or host tensors alone
            for t in outputs:
                self.host[t] = True
        return out


def _names_device(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, (str, torch.device))


def audit_recipe(recipe: str, overrides: list[str], device: torch.device, steps: int = 2) -> list[str]:
    """The syncs of `steps` training steps of a recipe on one process: the train loader's next(),
    batch augmentation and train_step, after one step unaudited (first-call set-up may sync)."""
    from imagenet_ddp.config import load_config, loader_config, resolve
    from imagenet_ddp.data import build_loader
    from imagenet_ddp.dist import DistEnv
    from imagenet_ddp.engine import train_step
    from imagenet_ddp.models import architecture, build_model
    from imagenet_ddp.state import make_state

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device(device))
    # One process: a recipe's repeated augmentation (copies on k ranks) is left out; it changes which
    # samples a rank reads, not what a step does with them.
    cfg = load_config(recipe, [*overrides, "data.repeated_aug=1"])
    with build_loader(loader_config(cfg), "train", rank=0, world_size=1, device=env.device, seed=0) as loader:
        cfg = resolve(cfg, 1, env.device.type, len(loader))
        model = build_model(**architecture(cfg.model.name, loader.num_classes))
        state = make_state(model, cfg, env)
        batches = iter(loader)
        train_step(state, [next(batches)])
        with no_host_syncs(env.device) as audit:
            audit.on_host(state.batch_aug)
            for _ in range(steps):
                train_step(state, [next(batches)])
                state.batch_in_epoch += 1
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
    return audit.syncs
