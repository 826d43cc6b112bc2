"""The training state across resumes and skipped steps: precisions that change between GPU
generations, and the BatchNorm statistics and EMA counters put back or copied in a few launches.

python -m pytest tests/test_state.py -q
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from imagenet_ddp.checkpoint import FORMAT, load, save_atomic
from imagenet_ddp.config import load_config, resolve
from imagenet_ddp.engine import train_step
from imagenet_ddp.models import build_model
from imagenet_ddp.state import BufferGuard, Ema, TrainState, make_state
from tests.test_train import CPU, bn_model, one_thread

__all__ = ["one_thread"]  # test_train's autouse fixture: one compute thread, flags restored

GOOD = (torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3]))
NAN = (torch.full((4, 3, 6, 6), math.nan), torch.zeros(4, dtype=torch.long))


def state_for(precision: str) -> TrainState:
    """A BatchNorm model's state as `train.precision` makes it. fp16 is resolved as on a GPU without
    bf16 (where precision=auto means fp16; the config refuses fp16 on a CPU device), then autocast
    and the GradScaler run it on this CPU."""
    torch.manual_seed(0)
    cfg = load_config(
        None, [f"train.precision={precision}", "train.channels_last=false", "train.ema_decay=0.9"]
    )
    device_type = "cuda" if precision == "fp16" else "cpu"
    return make_state(bn_model(), resolve(cfg, 1, device_type, batches_per_epoch=8), CPU)


def save(state: TrainState, path) -> None:
    save_atomic({"format": FORMAT, **state.state_dict()}, path)


def resumed(precision: str, path) -> TrainState:
    state = state_for(precision)
    state.load_state_dict(load(path))
    return state


def test_a_checkpoint_resumes_from_bf16_to_fp16_and_back_to_bf16(tmp_path):
    """precision=auto is bf16 on an A100/H100 and fp16 on a V100: a run moved between them resumes
    each way. Only an fp16 run's scale carries over to an fp16 run; otherwise the scaler starts fresh."""
    path = tmp_path / "last.pt"
    bf16 = state_for("bf16")
    train_step(bf16, [GOOD])
    save(bf16, path)
    assert load(path)["scaler"] == {}  # what a disabled GradScaler saves

    fp16 = resumed("fp16", path)
    assert fp16.scaler.is_enabled() and fp16.step == 1
    assert fp16.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # fresh
    for name, value in bf16.model.state_dict().items():
        assert torch.equal(fp16.model.state_dict()[name], value), name
    train_step(fp16, [NAN])  # an overflow: the step is skipped and the scale halves
    train_step(fp16, [GOOD])
    assert fp16.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale() / 2
    save(fp16, path)

    again = resumed("fp16", path)  # fp16 to fp16: the scale means something and is kept
    assert again.scaler.get_scale() == fp16.scaler.get_scale()

    back = resumed("bf16", path)
    assert not back.scaler.is_enabled() and back.step == 3
    train_step(back, [GOOD])
    assert back.step == 4 and int(back.nonfinite_streak) == 0
    assert all(torch.isfinite(p).all() for p in back.model.parameters())
    save(back, path)
    assert load(path)["scaler"] == {}


class Ops(TorchDispatchMode):
    """Counts the aten ops run inside it: on a GPU each is at least one kernel launch (a foreach op
    a few, one per chunk of tensors)."""

    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def per_buffer_restore(buffers, saved, skipped) -> None:
    """The reference: each buffer selected on its own (a `where` and a `copy_` each)."""
    for buffer, before in zip(buffers, saved, strict=True):
        buffer.copy_(torch.where(skipped, before, buffer))


@torch.no_grad()
def test_batchnorm_statistics_are_put_back_as_buffer_by_buffer_in_a_few_ops():
    """A ResNet-18's running statistics and batch counters after a kept step and a skipped NaN one
    are bitwise those of the per-buffer restore, in 3 ops per dtype instead of 2 per buffer."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4).train()
    reference = copy.deepcopy(model)
    guard, buffers = BufferGuard(model), list(reference.buffers())
    assert {b.dtype for b in buffers} == {torch.float32, torch.int64} and len(buffers) == 60
    batches = [torch.randn(2, 3, 32, 32), torch.full((2, 3, 32, 32), math.nan)]
    for images, skipped in zip(batches, (torch.tensor(False), torch.tensor(True)), strict=True):
        guard.save()
        saved = [b.clone() for b in buffers]
        model(images), reference(images)
        with Ops() as ops:
            guard.restore_where(skipped)
        per_buffer_restore(buffers, saved, skipped)
        assert ops.count == {"_foreach_copy_": 4, "where": 2}  # float32 and int64
        for name, value in reference.named_buffers():
            assert torch.equal(model.get_buffer(name), value), name
    assert model.bn1.num_batches_tracked == 1 and torch.isfinite(model.bn1.running_var).all()
    with Ops() as ops:
        per_buffer_restore(buffers, saved, skipped)
    assert ops.count == {"where": 60, "copy_": 60}


@torch.no_grad()
def test_the_ema_copies_the_batch_counters_in_one_op_and_moves_the_rest():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4).train()
    ema = Ema(model, decay=0.5)
    model(torch.randn(2, 3, 32, 32))
    with Ops() as ops:
        ema.update()
    assert ops.count == {"_foreach_lerp_": 1, "_foreach_copy_": 1}
    assert ema.module.bn1.num_batches_tracked == 1
    torch.testing.assert_close(
        ema.module.bn1.running_mean, model.bn1.running_mean * 0.5, rtol=0, atol=1e-7
    )  # from 0
