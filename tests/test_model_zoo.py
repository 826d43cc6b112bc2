"""Models by name: every torchvision classifier and every timm model (timm/<name>), each family's
adapter checked against the library's own functions (timm's data config, param_groups_layer_decay,
no_weight_decay, pretrained loading; torchvision's weights' transforms), and a timm ConvNeXt and ViT
trained under torchrun (2 ranks, gloo, CPU), resumed bitwise after a kill, exported to ONNX.

python -m pytest tests/test_model_zoo.py -q
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models._manipulate import group_parameters

from imagenet_ddp.checkpoint import load
from imagenet_ddp.config import ConfigError, load_config, validate
from imagenet_ddp.errors import UserError
from imagenet_ddp.finetune import freeze, init_from
from imagenet_ddp.models import adapter_for, architecture, build_model, skeleton


def one_line_error(call, match: str, kind=UserError) -> str:
    with pytest.raises(kind, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_torchvision_classifier_and_timm_model_has_a_family_and_a_typo_names_the_closest():
    for name in torchvision.models.list_models(module=torchvision.models):
        assert adapter_for(name).family.startswith("torchvision"), name
    for name in ("convnext_tiny", "vit_small_patch16_224", "deit_small_patch16_224", "regnety_040"):
        assert adapter_for(f"timm/{name}").family == "timm"
    assert adapter_for("timm/convnext_tiny.fb_in1k").family == "timm"  # a pretrained tag: its defaults
    message = one_line_error(lambda: adapter_for("convnxt_tiny"), "unknown model.name 'convnxt_tiny'")
    assert "'convnext_tiny'" in message and "'timm/convnext_tiny'" in message  # both registries
    one_line_error(
        lambda: adapter_for("timm/vit_smal_patch16_224"), "did you mean 'timm/vit_small_patch16_224'"
    )
    one_line_error(lambda: adapter_for("vit_small_patch16_224"), "timm/vit_small_patch16_224")  # no prefix
    one_line_error(lambda: architecture("timm/test_vit", 4, blurpool=True), "model.blurpool is for ResNets")


@pytest.mark.parametrize(
    "name", ["convnext_tiny", "vit_small_patch16_224", "deit_small_patch16_224", "regnety_040"]
)
def test_a_timm_models_defaults_are_timms_data_config(name):
    expected = timm.data.resolve_data_config({}, model=skeleton(name=f"timm/{name}", num_classes=2))
    got = adapter_for(f"timm/{name}").defaults(f"timm/{name}")
    assert (3, got["input_size"], got["input_size"]) == expected["input_size"]
    assert (got["interpolation"], got["crop_pct"]) == (expected["interpolation"], expected["crop_pct"])
    assert (got["mean"], got["std"]) == (expected["mean"], expected["std"])


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "vit_b_16", "swin_t", "regnet_y_1_6gf"])
def test_a_torchvision_models_defaults_are_its_default_weights_transform(name):
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    got = adapter_for(name).defaults(name)
    assert got["input_size"] == transform.crop_size[0]
    assert got["interpolation"] == transform.interpolation.value
    assert got["crop_pct"] == pytest.approx(transform.crop_size[0] / transform.resize_size[0], abs=1e-4)
    assert adapter_for("alexnet").defaults("alexnet")["interpolation"] == "bilinear"


def layer_scales(groups: list[dict]) -> dict[int, float]:
    return {id(p): group["lr_scale"] for group in groups for p in group["params"]}


@pytest.mark.parametrize("name", ["timm/test_vit", "timm/test_convnext"])
def test_layer_ids_give_timms_param_groups_layer_decay_scales(name):
    from timm.optim import param_groups_layer_decay

    model = build_model(name, num_classes=4)
    ids, num_layers = adapter_for(name).layer_ids(model)
    expected = layer_scales(param_groups_layer_decay(model, layer_decay=0.7))
    got = {id(p): 0.7 ** (num_layers - 1 - ids[n]) for n, p in model.named_parameters()}
    assert got == expected and num_layers > 3
    shifted = {id(p): 0.7 ** (num_layers - ids[n]) for n, p in model.named_parameters()}
    assert shifted != expected  # negative control: one layer off is seen
    one_line_error(lambda: adapter_for("resnet18").layer_ids(build_model("resnet18", 4)), "optim.layer_decay")


def per_layer_sizes(ids: dict[str, int], model) -> list[int]:
    sizes = Counter()
    for name, p in model.named_parameters():
        sizes[ids[name]] += p.numel()
    return [sizes[i] for i in range(len(sizes))]


@pytest.mark.parametrize(
    "name, counterpart",
    [
        ("vit_b_16", "vit_base_patch16_224"),
        ("convnext_tiny", "convnext_tiny"),
        ("swin_t", "swin_tiny_patch4_window7_224"),
    ],
)
def test_torchvisions_vit_convnext_and_swin_group_as_timm_groups_the_same_networks(name, counterpart):
    """Per layer, the parameters timm's grouping gives timm's own copy of the network (as many, as
    large, in the same order); the no-weight-decay names are as many as timm's no_weight_decay()."""
    model = skeleton(name=name, num_classes=10)
    theirs = skeleton(name=f"timm/{counterpart}", num_classes=10)
    timm_ids = group_parameters(theirs, theirs.group_matcher(coarse=False), reverse=True)
    last = max(timm_ids.values()) + 1
    timm_ids = {n: timm_ids.get(n, last - 1) for n, _ in theirs.named_parameters()}
    ids, num_layers = adapter_for(name).layer_ids(model)
    assert num_layers == last and per_layer_sizes(ids, model) == per_layer_sizes(timm_ids, theirs)
    exempt = adapter_for(f"timm/{counterpart}").no_weight_decay(theirs)
    assert len(adapter_for(name).no_weight_decay(model)) == len(exempt)
    assert adapter_for(name).channels_last(model) == (name == "convnext_tiny")


def test_timm_no_weight_decay_names_are_the_models_own():
    model = build_model("timm/test_vit", num_classes=4)
    assert adapter_for("timm/test_vit").no_weight_decay(model) == {"cls_token", "pos_embed"}
    assert adapter_for("timm/test_convnext").no_weight_decay(build_model("timm/test_convnext", 4)) == set()


def test_freeze_by_block_for_a_vit_and_by_stage_for_a_convnext():
    vit = build_model("timm/test_vit", num_classes=4)
    points = adapter_for("timm/test_vit").freeze_points(vit)
    assert points[:3] == ["stem", "blocks.0", "blocks.1"]
    freeze(vit, "timm/test_vit", "blocks.1")
    frozen = {n for n, p in vit.named_parameters() if not p.requires_grad}
    stem = ("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1.")
    assert frozen == {n for n, _ in vit.named_parameters() if n.startswith(stem)}
    convnext = build_model("timm/test_convnext", num_classes=4)
    assert adapter_for("timm/test_convnext").freeze_points(convnext) == [
        "stem",
        *(f"stages.{i}" for i in range(4)),
    ]
    norms = freeze(convnext, "timm/test_convnext", "backbone")
    assert {n for n, p in convnext.named_parameters() if p.requires_grad} == {
        "head.fc.weight",
        "head.fc.bias",
    }
    assert norms == []  # LayerNorms: no running statistics to keep
    message = one_line_error(
        lambda: validate(load_config(None, ["model.name=timm/test_vit", "model.freeze=block.1"])),
        "model.freeze='block.1' is not one of none, backbone, stem, blocks.0",
        ConfigError,
    )
    assert "blocks.1" in message


def test_model_kwargs_reach_the_builder_and_an_unknown_one_is_named():
    plain = architecture("timm/test_vit", 4, kwargs={"global_pool": "avg", "class_token": False})
    assert plain["kwargs"] == {"global_pool": "avg", "class_token": False}  # recorded in checkpoints
    expected = timm.create_model("test_vit", num_classes=4, global_pool="avg", class_token=False)
    assert list(build_model(**plain).state_dict()) == list(expected.state_dict())
    assert "cls_token" not in dict(build_model(**plain).named_parameters())
    one_line_error(
        lambda: build_model("timm/test_vit", 4, kwargs={"clas_token": False}), "model.kwargs.clas_token"
    )
    one_line_error(
        lambda: validate(load_config(None, ["model.name=convnext_tiny", "model.kwargs={layer_scal: 0.1}"])),
        "layer_scal",
        ConfigError,
    )
    cfg = validate(load_config(None, ["model.name=timm/test_vit", "model.kwargs={global_pool: avg}"]))
    assert cfg.model.kwargs == {"global_pool": "avg"}


def test_a_vit_is_built_for_data_image_size_and_records_it():
    from imagenet_ddp.models import model_architecture

    cfg = load_config(None, ["model.name=timm/test_vit", "data.image_size=32", "data.eval_size=32"])
    arch = model_architecture(cfg.model, 4, 32, 32)
    assert arch["img_size"] == 32 and build_model(**arch).patch_embed.img_size == (32, 32)
    assert "img_size" not in model_architecture(cfg.model, 4, 160, 160)  # timm's default: nothing recorded
    one_line_error(lambda: model_architecture(cfg.model, 4, 32, 48), "data.eval_size=48 must equal")


def test_fan_in_conv_init_is_kaiming_normal_by_each_filters_inputs():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, conv_init="fan_in")
    torch.manual_seed(0)
    expected = torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
    for m in expected.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.manual_seed(0)
    fan_out = build_model("resnet18", num_classes=10)
    assert not torch.equal(fan_out.layer4[0].conv1.weight, model.layer4[0].conv1.weight)  # negative control
    assert architecture("resnet50", 10, conv_init="fan_in")["conv_init"] == "fan_in"
    assert "conv_init" not in architecture("resnet50", 10)  # the default: older checkpoints' dicts
    one_line_error(
        lambda: architecture("timm/test_vit", 4, conv_init="fan_in"), "model.conv_init is for ResNets"
    )


def test_compile_keeps_a_timm_vit_as_it_is():
    torch.manual_seed(0)
    model, x = build_model("timm/test_vit", num_classes=4, img_size=32).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A timm ViT's weights as timm ships them on the hub (model.safetensors, 1000 classes, 160 px)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file(timm.create_model("test_vit", num_classes=1000).state_dict(), str(path))
    return path


def test_init_from_a_timm_weights_file_loads_as_timms_pretrained_loading(pretrained):
    """At 32 px and 4 classes: position embeddings resampled and the head dropped, as timm's own
    create_model(pretrained=True) does from the same file."""
    model = build_model("timm/test_vit", num_classes=4, img_size=32)
    record = init_from(model, "timm/test_vit", str(pretrained), ["a", "b", "c", "d"])
    assert record["head"].startswith("new") and len(record["sha256"]) == 64
    expected = timm.create_model(
        "test_vit",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(pretrained)},
        num_classes=4,
        img_size=32,
    )
    for key, value in expected.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.pos_embed.shape == expected.pos_embed.shape != (1, 101, 64)


def test_init_from_timm_reads_the_hugging_face_cache_and_never_downloads(pretrained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = build_model("timm/test_vit", num_classes=1000)
    one_line_error(
        lambda: init_from(model, "timm/test_vit", "timm:test_vit.r160_in1k", ["n0"]),
        "not in the Hugging Face cache .*hf download timm/test_vit.r160_in1k model.safetensors",
    )
    snapshot = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(pretrained)
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0123abc")
    from safetensors.torch import load_file

    classes = sorted(__import__("imagenet_ddp.labels", fromlist=["x"]).imagenet_names("en"))
    record = init_from(model, "timm/test_vit", "timm:test_vit.r160_in1k", classes)
    assert record["head"] == "kept (the same classes)"
    for key, value in load_file(str(pretrained)).items():
        assert torch.equal(model.state_dict()[key], value), key
    one_line_error(
        lambda: init_from(
            build_model("timm/test_convnext", 1000), "timm/test_convnext", "timm:test_vit", classes
        ),
        "holds a timm/test_vit, not a timm/test_convnext",
    )


# --- under torchrun: train, kill, resume bitwise, export ---------------------------------------------

ZOO_RUN = (
    "train.epochs=2",
    "train.deterministic=true",
    "run.checkpoint_every=2",
    "run.keep_last=20",
    "train.channels_last=true",  # taken by the ConvNeXt, left by the ViT
    "train.ema_decay=0.9",
)


@pytest.fixture(scope="module")
def zoo_shards(tmp_path_factory) -> Path:
    from tests.test_train import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("zoo"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm/test_convnext", "timm/test_vit"])
def test_a_timm_model_trains_on_two_ranks_resumes_bitwise_after_a_kill_and_exports(
    name, zoo_shards, tmp_path, capsys
):
    from tests.test_fault_tolerance import assert_same_weights, finish, kill_rank_1_after, torchrun
    from tests.test_train import small_run
    from tests.test_train_ddp import environment, start

    env = environment(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = (f"model.name={name}", *ZOO_RUN)
    uninterrupted = start(torchrun(*small_run(zoo_shards, whole, *args)), env)
    assert "done:" in finish(uninterrupted)
    proc = start(torchrun(*small_run(zoo_shards, killed, *args), restarts=2), env)
    log = kill_rank_1_after(proc, killed / "step-00000008.pt")
    assert proc.returncode == 0 and "resuming from" in log, log
    reference = load(whole / "last.pt")
    assert_same_weights(reference, load(killed / "last.pt"))
    assert all(torch.equal(v, load(killed / "last.pt")["ema"][k]) for k, v in reference["ema"].items())
    assert reference["architecture"]["name"] == name and reference["config"]["model"]["name"] == name
    check_export(whole / "best.pt", zoo_shards, tmp_path, capsys)


def check_export(checkpoint: Path, shards: Path, tmp_path: Path, capsys) -> None:
    """predict.py --model on onnxruntime answers each validation image as --checkpoint does."""
    from tests.needs import needs
    from tests.test_predict import records, run

    needs("onnxscript")
    onnx_path = tmp_path / "model.onnx"
    assert run(capsys, "--checkpoint", checkpoint, "--export", onnx_path)[0] == 0
    images = sorted(str(p) for p in (shards.parent / "src" / "val").rglob("*.*"))[:16]
    assert images
    answers = {}
    for flag, path in (("--checkpoint", checkpoint), ("--model", onnx_path)):
        code, out, err = run(
            capsys, flag, path, *images, "--format", "jsonl", "--device", "cpu", "--topk", "4"
        )
        assert code == 0, err
        answers[flag] = records(out)
    for image in images:
        torch_top, onnx_top = answers["--checkpoint"][image]["top"], answers["--model"][image]["top"]
        assert torch_top[0]["wnid"] == onnx_top[0]["wnid"], image
        for a, b in zip(torch_top, onnx_top, strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-3)
