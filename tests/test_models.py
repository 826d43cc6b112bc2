"""Model variants: deterministic pooling for train.deterministic=true on CUDA; BlurPool, drop path and
dropout (model.blurpool, model.drop_path, model.dropout) with torchvision's state_dict, rebuilt from a
checkpoint alone.

python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from imagenet_ddp.config import ConfigError, load_config, validate
from imagenet_ddp.errors import UserError
from imagenet_ddp.models import (
    EFFICIENTNETS,
    BlurPoolConv2d,
    GlobalAvgPool,
    architecture,
    build_model,
    deterministic_pooling,
)
from tests.needs import needs

# FFCV's train_imagenet.py BlurPoolConv2d, written out: [1,2,1]^T [1,2,1] / 16 on each channel.
FFCV_FILTER = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def ffcv_blurpool(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    channels = conv.in_channels
    blurred = F.conv2d(x, FFCV_FILTER.repeat(channels, 1, 1, 1), stride=1, padding=(1, 1), groups=channels)
    return conv(blurred)


def blurred_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BlurPoolConv2d)]


def shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, pools", [("resnet18", 1), ("efficientnet_b0", 17)])
def test_deterministic_pooling_replaces_every_global_average_pool_and_changes_no_value(name, pools):
    """AdaptiveAvgPool2d's CUDA backward has no deterministic kernel; its replacement (a mean) must give
    torchvision's model the same outputs and gradients and the same state_dict."""
    torch.manual_seed(0)
    reference = build_model(name, num_classes=5)
    model = deterministic_pooling(copy.deepcopy(reference))
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in reference.modules()) == pools  # head + SE blocks
    assert sum(isinstance(m, GlobalAvgPool) for m in model.modules()) == pools
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()  # no dropout or stochastic depth draws: the same function
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_blurpool_is_ffcvs_blur_then_the_strided_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, kernel_size=3, stride=2, padding=1, bias=True)
    blurred = BlurPoolConv2d.from_conv(conv)
    assert blurred.weight is conv.weight and blurred.bias is conv.bias
    x = torch.randn(2, 16, 13, 13)  # odd: the border and the stride's last row are covered
    torch.testing.assert_close(blurred(x), ffcv_blurpool(conv, x), rtol=0, atol=1e-6)
    assert blurred(x).shape == conv(x).shape == (2, 8, 7, 7)
    assert not torch.allclose(blurred(x), conv(x), atol=1e-2)
    # The filter alone, through a 1x1 identity convolution: on a constant image zero padding leaves
    # 9/16 at the corners, 12/16 on the edges, 1 inside.
    identity = nn.Conv2d(16, 16, kernel_size=1, bias=False)
    nn.init.dirac_(identity.weight)
    blur = BlurPoolConv2d.from_conv(identity)(torch.ones(1, 16, 5, 5))[0, 0]
    assert blur[0, 0] == blur[4, 4] == 9 / 16 and blur[0, 2] == blur[2, 4] == 12 / 16 and blur[2, 2] == 1


@pytest.mark.parametrize(
    "name, small_input, expected",
    [
        ("resnet50", False, ["layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]),
        ("resnet18", False, ["layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]),
        ("resnet18", True, ["layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]),
    ],
)
def test_blurpool_blurs_each_strided_convolution_with_16_or_more_input_channels(name, small_input, expected):
    """FFCV's rule: each stage's strided 3x3 and its 1x1 downsample, in layer2..4; not the stem's
    3-channel conv1 (stride 2, or 1 with small_input), not the max-pool, nothing with stride 1."""
    model = build_model(name, num_classes=10, small_input=small_input, blurpool=True)
    downsamples = [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert sorted(blurred_names(model)) == sorted(expected + downsamples)
    assert type(model.conv1) is nn.Conv2d and isinstance(model.maxpool, nn.MaxPool2d | nn.Identity)
    plain = dict(build_model(name, num_classes=10, small_input=small_input).named_modules())
    for conv_name in blurred_names(model):
        conv = model.get_submodule(conv_name)
        assert conv.stride == plain[conv_name].stride == (2, 2) and conv.in_channels >= 16
    strided_left = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert set(strided_left) - set(blurred_names(model)) <= {"conv1"}


@pytest.mark.parametrize(
    "name, variant",
    [
        ("resnet50", {"blurpool": True}),
        ("resnet50", {"drop_path": 0.1}),
        ("resnet50", {"dropout": 0.3}),
        ("resnet18", {"blurpool": True, "drop_path": 0.2, "dropout": 0.5, "small_input": True}),
        ("efficientnet_b0", {"drop_path": 0.3, "dropout": 0.5}),
        ("efficientnet_b0", {"drop_path": 0.0, "dropout": 0.0}),
    ],
)
def test_every_variant_has_the_plain_networks_state_dict(name, variant):
    """The same keys, in the same order, with the same shapes: torchvision's weights, model.init_from,
    the EMA and the export see the plain network."""
    plain = build_model(name, num_classes=10, small_input=variant.get("small_input", False))
    model = build_model(name, num_classes=10, **variant)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert shapes(model) == shapes(plain)
    model.load_state_dict(plain.state_dict())  # strict


def test_torchvision_weights_load_into_a_blurpool_resnet_through_init_from(tmp_path):
    """A state_dict of torchvision's own ResNet-18 class, saved to a file, read by model.init_from."""
    from imagenet_ddp.finetune import init_from

    torch.manual_seed(0)
    weights = torchvision.models.resnet18(num_classes=4).state_dict()
    torch.save(weights, tmp_path / "resnet18.pth")
    model = build_model("resnet18", num_classes=4, blurpool=True)
    init_from(model, "resnet18", str(tmp_path / "resnet18.pth"), ["a", "b", "c", "d"])
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    reference = torchvision.models.resnet18(num_classes=4)
    reference.load_state_dict(weights)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()
    assert not torch.allclose(model(x), reference(x), atol=1e-3)  # the same weights, blurred inputs
    model.load_state_dict(reference.state_dict(), strict=True)


def test_drop_path_drops_each_residual_branch_per_sample_with_a_rate_rising_to_the_last_block():
    """ResNet-18's 8 blocks: block i's branch (its last BatchNorm's output) is zeroed for a whole
    sample with probability rate * i / 7, survivors scaled by 1 / (1 - p) (timm's rule, torchvision's
    stochastic_depth); in eval mode nothing is dropped."""
    rate, samples = 0.4, 2000
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, drop_path=rate, zero_init_residual=False)
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    raw, branch = {}, {}  # cloned: the block adds the shortcut to the branch in place
    for index, block in enumerate(blocks):
        block.bn2.register_forward_hook(lambda m, i, out: raw.update(out=out.clone()), prepend=True)
        block.bn2.register_forward_hook(lambda m, i, out: branch.update(out=out.clone()))
        x = torch.randn(samples, block.conv1.in_channels, 1, 1)
        with torch.no_grad():
            block.train()(x)
            dropped = branch["out"].flatten(1).abs().amax(1) == 0
            p = rate * index / (len(blocks) - 1)
            assert abs(dropped.float().mean().item() - p) < 0.04, (index, p)
            kept = ~dropped
            torch.testing.assert_close(branch["out"][kept], raw["out"][kept] / (1 - p))
            block.eval()(x[:100])
            assert torch.equal(branch["out"], raw["out"])
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), model(x))


def test_drop_path_and_dropout_are_torchvisions_on_efficientnets_with_its_defaults_recorded():
    model = build_model("efficientnet_b0", num_classes=10, drop_path=0.3, dropout=0.45)
    depth = [m for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert depth[0].p == 0 and max(m.p for m in depth) == pytest.approx(0.3 * 15 / 16)  # torchvision's rule
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.45
    for name in EFFICIENTNETS:  # None: torchvision's own defaults, resolved in the checkpoint's dict
        with torch.device("meta"):  # no memory, no initialisation: only the modules' settings
            default = torchvision.models.get_model(name, weights=None)
        arch = architecture(name, 10)
        assert arch["dropout"] == default.classifier[0].p, name
        rates = [m.p for m in default.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        assert max(rates) == pytest.approx(arch["drop_path"] * (len(rates) - 1) / len(rates)), name


def test_resnet_dropout_drops_the_classifiers_input_in_train_mode_only():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, dropout=0.5)
    raw, seen = {}, {}
    model.fc.register_forward_pre_hook(lambda m, args: raw.update(x=args[0]), prepend=True)
    model.fc.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)
        live = raw["x"] != 0
        zeroed = (seen["x"] == 0) & live
        assert abs(zeroed.float().sum().item() / live.sum().item() - 0.5) < 0.05
        torch.testing.assert_close(seen["x"][~zeroed], raw["x"][~zeroed] * 2)
        model.eval()(x)
        assert torch.equal(seen["x"], raw["x"])


def test_variants_are_validated_with_one_line_errors():
    for kwargs, message in [
        ({"name": "efficientnet_b0", "blurpool": True}, "model.blurpool is for ResNets"),
        ({"name": "resnet50", "drop_path": 1.0}, r"model.drop_path must be in \[0, 1\), got 1.0"),
        ({"name": "resnet50", "dropout": -0.1}, r"model.dropout must be in \[0, 1\), got -0.1"),
    ]:
        with pytest.raises(UserError, match=message) as e:
            architecture(num_classes=10, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.blurpool is for ResNets"):
        validate(load_config(None, ["model.name=efficientnet_b0", "model.blurpool=true"]))
    with pytest.raises(ConfigError, match="model.drop_path must be in"):
        validate(load_config(None, ["model.drop_path=1.5"]))
    validate(load_config(None, ["model.blurpool=true", "model.drop_path=0.05", "model.dropout=0.1"]))


def test_a_checkpoints_architecture_dict_rebuilds_its_variant_and_an_older_one_the_plain_network():
    arch = architecture("resnet18", 10, blurpool=True, drop_path=0.1, dropout=0.2)
    assert arch == {
        "name": "resnet18",
        "num_classes": 10,
        "small_input": False,
        "zero_init_residual": True,
        "blurpool": True,
        "drop_path": 0.1,
        "dropout": 0.2,
    }
    saved = json.loads(json.dumps(arch))  # what a checkpoint (and an ONNX export's metadata) holds
    rebuilt = build_model(**saved)
    assert len(blurred_names(rebuilt)) == 6
    assert sum(len(m._forward_hooks) for m in rebuilt.modules()) == 7  # blocks 1..7 of 0..7
    assert len(rebuilt.fc._forward_pre_hooks) == 1
    older = {"name": "resnet18", "num_classes": 10, "small_input": False, "zero_init_residual": True}
    assert architecture(**older) == architecture("resnet18", 10)
    assert architecture(**older) == {**older, "blurpool": False, "drop_path": 0.0, "dropout": 0.0}
    plain = build_model(**older)
    assert blurred_names(plain) == [] and not any(
        m._forward_hooks or m._forward_pre_hooks for m in plain.modules()
    )
    older_efficientnet = {**older, "name": "efficientnet_b2", "zero_init_residual": False}
    assert architecture(**older_efficientnet)["dropout"] == 0.3  # what it was trained with: the default
    # Explicit rates equal to the defaults are the same architecture (resuming compares the dicts).
    assert architecture("efficientnet_b2", 10, drop_path=0.2, dropout=0.3) == architecture(
        "efficientnet_b2", 10
    )


def test_gradients_reach_every_parameter_of_a_variant_and_the_ema_copy_and_ddp_keep_it():
    """The EMA deep-copies the model (hooks and blur filters included); DDP (gloo, one rank) reduces
    gradients through the hooks; an SGD step moves the blurred convolutions."""
    from imagenet_ddp.state import Ema

    torch.manual_seed(0)
    model = build_model(
        "resnet18", num_classes=10, blurpool=True, drop_path=0.2, dropout=0.2, zero_init_residual=False
    )
    ema = Ema(model, decay=0.5)
    assert blurred_names(ema.module) == blurred_names(model)
    assert len(ema.module.layer4[1].bn2._forward_hooks) == 1
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model.train())
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        before = model.layer2[0].conv1.weight.detach().clone()
        for _ in range(2):  # DDP's reducer checks at the second step that the first one finished
            F.cross_entropy(ddp(x), labels).backward()
            for name, param in model.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert model.layer2[0].conv1.weight.grad.abs().sum() > 0
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
    finally:
        dist.destroy_process_group()
    assert not torch.equal(model.layer2[0].conv1.weight, before)
    assert not torch.equal(ema.module.layer2[0].conv1.weight, before)


@pytest.mark.parametrize("variant", [{"drop_path": 0.9}, {"dropout": 0.5}])
def test_torch_compile_keeps_the_drop_path_and_dropout_hooks(variant):
    """Dynamo's graph (the eager backend: its tracing without code generation) keeps the hooks: train
    mode draws, eval mode is the eager model's function."""
    torch.manual_seed(0)
    # zero_init_residual=False: a zero-initialised branch, dropped or not, would change nothing
    model = build_model("resnet18", num_classes=10, blurpool=True, zero_init_residual=False, **variant)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(compiled.train()(x), compiled(x))
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x))


def test_predict_rebuilds_a_variant_from_the_checkpoint_alone_and_exports_it(tmp_path, capsys):
    """A checkpoint of a BlurPool + drop path + dropout ResNet-18: predict.py classifies with the same
    network in eval mode (no draws: the same answers twice), and its ONNX export answers the same."""
    needs("onnxscript")
    import predict
    from imagenet_ddp.export import OnnxClassifier
    from imagenet_ddp.inference import Classifier
    from tests.test_predict import WNIDS, make_checkpoint, photo, records, run

    torch.manual_seed(0)
    arch = architecture("resnet18", len(WNIDS), blurpool=True, drop_path=0.3, dropout=0.5)
    reference = build_model(**arch)
    reference.fc.weight.data *= 300  # confident answers, as a trained model's (see test_export)
    path = make_checkpoint(tmp_path / "best.pt", architecture=arch, model=reference.state_dict())
    clf = Classifier.from_checkpoint(path, device="cpu", precision="fp32")
    assert clf.architecture == arch and len(blurred_names(clf.model)) == 6
    images = torch.stack([clf.preprocess(photo(seed=s)) for s in range(4)])
    with torch.no_grad():
        expected = reference.eval()(clf.model_input(images)).softmax(1)
    torch.testing.assert_close(clf.probabilities(images), expected)
    photo().save(tmp_path / "photo.jpg")
    first = run(capsys, "--checkpoint", path, tmp_path / "photo.jpg", "--format", "jsonl", "--device", "cpu")
    second = run(capsys, "--checkpoint", path, tmp_path / "photo.jpg", "--format", "jsonl", "--device", "cpu")
    assert first[0] == 0 and first == second
    assert predict.main(["--checkpoint", str(path), "--export", str(tmp_path / "model.onnx")]) == 0
    capsys.readouterr()
    onnx_clf = OnnxClassifier(tmp_path / "model.onnx")
    assert onnx_clf.architecture == arch
    torch.testing.assert_close(onnx_clf.probabilities(images), expected, rtol=1e-3, atol=1e-4)
    assert records(first[1])
