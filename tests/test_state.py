"""The training state across resumes and skipped steps: precisions that change between GPU
generations, and the BatchNorm statistics and EMA counters put back or copied in a few launches.

python -m pytest tests/test_state.py -q
"""

from __future__ import annotations

import math

import torch

from imagenet_ddp.checkpoint import FORMAT, load, save_atomic
from imagenet_ddp.config import load_config, resolve
from imagenet_ddp.engine import train_step
from imagenet_ddp.state import TrainState, make_state
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
