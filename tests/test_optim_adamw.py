"""optim.name=adamw and optim.layer_decay against timm's create_optimizer_v2, group by group, on a timm
ViT and ConvNeXt (timm's tiny test models), through make_state and train_step, and across a resume.

python -m pytest tests/test_optim_adamw.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch.nn import functional as F

from imagenet_ddp import optim
from imagenet_ddp.config import OptimConfig, load_config, resolve
from imagenet_ddp.engine import train_step
from imagenet_ddp.models import adapter_for
from imagenet_ddp.optim import build_optimizer, model_param_groups
from imagenet_ddp.state import make_state
from tests.test_optim import CPU, skips_then_resumes_bitwise

MODELS = ["test_vit", "test_convnext"]
WD, DECAY, LRS = 0.05, 0.75, [1e-3, 2e-3]
SIDE = 32  # images of 2 x 2 patches: the parameters are the 160 px model's but for pos_embed's length
# Shallower than timm's test models (fewer ops, the same kinds of layers): still 4-5 layer scales.
SHALLOW = {"test_vit": {"img_size": SIDE, "depth": 2}, "test_convnext": {"depths": (1, 1, 1, 1)}}


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    models = {}
    for name in MODELS:
        torch.manual_seed(0)
        models[name] = timm.create_model(name, num_classes=10, **SHALLOW[name])
    return models


def described(model, optimizer, scale_key: str) -> list[tuple[list[str], float, float]]:
    """Each group as (its parameters' names, weight decay, LR scale)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ([names[id(p)] for p in g["params"]], g["weight_decay"], g.get(scale_key, 1.0))
        for g in optimizer.param_groups
    ]


class Forgetful:
    """An adapter that forgets the model's no-weight-decay names (negative control)."""

    def __init__(self, adapter):
        self.adapter = adapter

    def no_weight_decay(self, model):
        return set()

    def layer_ids(self, model):
        return self.adapter.layer_ids(model)


def steps(model, optimizer, scale_key: str) -> None:
    """A few steps on fixed random data, each group's LR the step's times its scale (train_step's rule
    for ours, timm's scheduler's for timm's)."""
    generator = torch.Generator().manual_seed(1)
    model.train()
    for lr in LRS:
        images = torch.randn(2, 3, SIDE, SIDE, generator=generator)
        labels = torch.randint(0, 10, (2,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get(scale_key, 1.0)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("name", MODELS)
def test_adamw_with_layer_decay_has_timms_groups_and_steps_as_timms_optimizer(built, name):
    """Same parameters in each group (by name, in timm's order), same weight decay and LR scale as
    timm's create_optimizer_v2(model, "adamw", layer_decay=...); two steps end on the same weights.
    A wrong decay, or the model's no-weight-decay names forgotten, is told apart."""
    ours_model, timm_model = copy.deepcopy(built[name]), copy.deepcopy(built[name])
    adapter = adapter_for(f"timm/{name}")
    o = OptimConfig(name="adamw", weight_decay=WD, layer_decay=DECAY, betas=[0.9, 0.95])
    ours = build_optimizer(model_param_groups(ours_model, o, adapter), o, LRS[0], "cpu")
    reference = create_optimizer_v2(
        timm_model, "adamw", lr=LRS[0], weight_decay=WD, layer_decay=DECAY, betas=(0.9, 0.95)
    )
    assert type(ours) is type(reference) is torch.optim.AdamW
    want = described(timm_model, reference, "lr_scale")
    assert described(ours_model, ours, "lr_mult") == want
    assert len({scale for _, _, scale in want}) >= 4 and {wd for _, wd, _ in want} == {0.0, WD}
    hyper = {
        k: v for k, v in reference.defaults.items() if k not in ("lr", "weight_decay", "foreach", "fused")
    }
    assert {k: ours.defaults[k] for k in hyper} == hyper
    if name == "test_vit":  # its position embedding and class token: no decay, as timm's no_weight_decay()
        exempt = [n for names, wd, _ in want if wd == 0 for n in names]
        assert {"pos_embed", "cls_token"} <= set(exempt)

    # Negative controls: another decay, or the no-weight-decay names forgotten, give other groups.
    for wrong_o, wrong_adapter in [
        (OptimConfig(name="adamw", weight_decay=WD, layer_decay=0.7), adapter),
        (o, Forgetful(adapter)),
    ]:
        model = copy.deepcopy(built[name])
        wrong = build_optimizer(model_param_groups(model, wrong_o, wrong_adapter), wrong_o, LRS[0], "cpu")
        if name == "test_convnext" and isinstance(wrong_adapter, Forgetful):
            continue  # a ConvNeXt exempts no names: nothing to forget
        assert described(model, wrong, "lr_mult") != want

    before = copy.deepcopy(ours_model.state_dict())
    steps(ours_model, ours, "lr_mult")
    steps(timm_model, reference, "lr_scale")
    for (key, a), b in zip(ours_model.state_dict().items(), timm_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.equal(before[key], ours_model.state_dict()[key])


def test_without_layer_decay_adamw_has_timms_two_groups(built):
    """No layer decay: timm's param_groups_weight_decay (no weight decay first), one LR."""
    ours_model, timm_model = copy.deepcopy(built["test_vit"]), copy.deepcopy(built["test_vit"])
    o = OptimConfig(name="adamw", weight_decay=WD)
    ours = build_optimizer(model_param_groups(ours_model, o, adapter_for("timm/test_vit")), o, 1e-3, "cpu")
    reference = create_optimizer_v2(timm_model, "adamw", lr=1e-3, weight_decay=WD)
    ours_groups = sorted(described(ours_model, ours, "lr_mult"), key=lambda g: g[1])
    assert ours_groups == described(timm_model, reference, "lr_scale")


def test_wd_on_norm_and_bias_is_timms_filter_bias_and_bn_false(built):
    """Norm layers and biases decayed too (timm: filter_bias_and_bn=False); the model's no-weight-decay names
    still exempt, as in timm."""
    ours_model, timm_model = copy.deepcopy(built["test_vit"]), copy.deepcopy(built["test_vit"])
    o = OptimConfig(name="adamw", weight_decay=WD, layer_decay=DECAY, wd_on_norm_and_bias=True)
    ours = build_optimizer(model_param_groups(ours_model, o, adapter_for("timm/test_vit")), o, 1e-3, "cpu")
    reference = create_optimizer_v2(
        timm_model, "adamw", lr=1e-3, weight_decay=WD, layer_decay=DECAY, filter_bias_and_bn=False
    )
    want = described(timm_model, reference, "lr_scale")
    assert described(ours_model, ours, "lr_mult") == want
    assert [n for names, wd, _ in want if wd == 0 for n in names] == ["cls_token", "pos_embed"]


def test_backbone_lr_mult_multiplies_the_layer_scale_outside_the_head(built):
    model = copy.deepcopy(built["test_vit"])
    adapter = adapter_for("timm/test_vit")
    o = OptimConfig(name="adamw", weight_decay=WD, layer_decay=DECAY, backbone_lr_mult=0.1)
    head = model.get_submodule(adapter.head_name(model))
    groups = model_param_groups(model, o, adapter, head)
    ids, num_layers = adapter.layer_ids(model)
    names = {id(p): n for n, p in model.named_parameters()}
    in_head = {id(p) for p in head.parameters()}
    for group in groups:
        for p in group["params"]:
            scale = DECAY ** (num_layers - 1 - ids[names[id(p)]])
            assert group["lr_mult"] == pytest.approx(scale * (1.0 if id(p) in in_head else 0.1), rel=1e-12)


def vit_state(overrides):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, **SHALLOW["test_vit"])
    cfg = load_config(
        None,
        [
            "model.name=timm/test_vit",
            "train.precision=fp32",
            "train.channels_last=false",
            "optim.name=adamw",
            "optim.lr=0.001",
            "optim.weight_decay=0.05",
            *overrides,
        ],
    )
    return make_state(model, resolve(cfg, 1, "cpu", batches_per_epoch=8), CPU)


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_adamw_skips_non_finite_steps_and_resumes_exactly_with_its_layer_scales(
    kernel, tmp_path, monkeypatch
):
    """make_state builds AdamW with the layer groups: foreach on a CPU (skipping on the host), fused on
    CUDA (skipping on the device with found_inf; run here with torch's fused CPU kernel); train_step
    sets each group's LR to the schedule's times its scale; a NaN step changes nothing, the step count
    included; a state saved and loaded through a checkpoint file steps on bitwise as if never
    interrupted."""
    if kernel == "fused":
        monkeypatch.setattr(optim, "ADAMW_FUSED_DEVICES", ("cuda", "cpu"))
    overrides = ["optim.layer_decay=0.65"]
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 3, SIDE, SIDE, generator=generator), torch.tensor([0, 3])) for _ in range(2)]
    bad = (torch.full((2, 3, SIDE, SIDE), math.nan), torch.zeros(2, dtype=torch.long))
    straight = vit_state(overrides)
    assert isinstance(straight.optimizer, torch.optim.AdamW) and straight.optimizer.defaults[kernel]
    train_step(straight, [batches[0]])
    scales = [g["lr_mult"] for g in straight.optimizer.param_groups]
    lr = straight.schedule(0)
    assert [g["lr"] for g in straight.optimizer.param_groups] == [lr * s for s in scales]
    assert len(set(scales)) == 4  # stem, two blocks, head
    skips_then_resumes_bitwise(straight, lambda: vit_state(overrides), bad, batches[1:], tmp_path)


def test_layer_decay_out_of_range_is_a_one_line_error():
    from imagenet_ddp.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
        resolve(load_config(None, ["optim.layer_decay=1.5"]), 1, "cpu", batches_per_epoch=8)


def test_layer_decay_on_a_model_without_per_block_groups_is_refused_in_one_line():
    from imagenet_ddp.errors import UserError
    from tests.test_optim import tiny_state

    with pytest.raises(UserError, match="optim.layer_decay: no per-block grouping is known for .*ResNet"):
        tiny_state(["optim.name=adamw", "optim.layer_decay=0.7"])  # model.name: resnet50
