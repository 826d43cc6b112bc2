"""Fine-tuning: model.init_from (this project's checkpoints, state_dicts, torchvision weights in
TORCH_HOME), the head mapped by class, model.freeze, optim.backbone_lr_mult, one-line errors, and a
fine-tune that beats training from scratch on real shards.

python -m pytest tests/test_finetune.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import make_shards
import train_ddp
from imagenet_ddp import checkpoint as ck
from imagenet_ddp.config import load_config, resolve
from imagenet_ddp.dist import DistEnv
from imagenet_ddp.engine import train_one_epoch
from imagenet_ddp.finetune import init_from
from imagenet_ddp.labels import imagenet_names
from imagenet_ddp.models import build_model
from imagenet_ddp.state import make_state
from imagenet_ddp.synth import jpeg_bytes, synth_image
from imagenet_ddp.tracking import NullTracker
from tests.test_train import Batches, NoStop, small_run

CPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
STYLES = 12  # class looks to draw from: a class name keeps its look in every fixture


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def styled_shards(root: Path, classes: dict[str, int], per_class: int, val_per_class: int) -> Path:
    """Folders of `classes` (name -> look), packed: the same name looks the same in every set."""
    rng = np.random.default_rng(sum(classes.values()))
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name, style in classes.items():
            (root / "src" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = synth_image(rng, *rng.integers(40, 72, 2), class_index=style, num_classes=STYLES)
                (root / "src" / split / name / f"{i}.jpg").write_bytes(jpeg_bytes(image))
    args = ["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--workers", "1"]
    assert make_shards.main([*args, "--shard-size", "64"]) == 0
    return root / "shards"


def save_checkpoint(path: Path, model_name: str, classes: list[str], seed: int = 0) -> dict:
    torch.manual_seed(seed)
    arch = {"name": model_name, "num_classes": len(classes), "small_input": False, "zero_init_residual": True}
    model = build_model(**arch)
    ckpt = {**ck.inference_info(arch, classes, classes, 37, 32), "model": model.state_dict()}
    ck.save_atomic(ckpt, path)
    return ckpt["model"]


def test_shared_classes_start_with_their_trained_head_rows_and_the_backbone_is_loaded(tmp_path):
    source = save_checkpoint(tmp_path / "best.pt", "resnet18", ["ant", "bee", "cat", "dog"])
    torch.manual_seed(1)
    model = build_model("resnet18", num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    record = init_from(model, "resnet18", str(tmp_path / "best.pt"), ["bee", "dog", "eel"])
    loaded = model.state_dict()
    assert torch.equal(loaded["layer3.0.conv1.weight"], source["layer3.0.conv1.weight"])
    assert torch.equal(loaded["fc.weight"][0], source["fc.weight"][1])  # bee
    assert torch.equal(loaded["fc.bias"][1], source["fc.bias"][3])  # dog
    assert torch.equal(loaded["fc.weight"][2], fresh["fc.weight"][2])  # eel: new
    assert record["head"] == "2 of 3 classes' rows copied by class id, the others new"
    assert record["head_rows_loaded"] == 2 and len(record["sha256"]) == 64
    same = build_model("resnet18", num_classes=4)
    assert init_from(same, "resnet18", str(tmp_path / "best.pt"), ["ant", "bee", "cat", "dog"])["head"] == (
        "kept (the same classes)"
    )
    assert all(torch.equal(v, source[k]) for k, v in same.state_dict().items())


def test_torchvision_weights_are_read_from_torch_home_and_their_head_mapped_by_wnid(tmp_path, monkeypatch):
    """No network here: the file torchvision would have downloaded is put where it caches it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    imagenet = build_model("resnet18", num_classes=1000).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    wnids = sorted(imagenet_names("en"))  # torchvision's class order
    classes = [wnids[7], "my-own-class", wnids[999]]
    model = build_model("resnet18", num_classes=3)
    record = init_from(model, "resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V1", classes)
    assert torch.equal(model.state_dict()["fc.weight"][0], imagenet["fc.weight"][7])
    assert torch.equal(model.state_dict()["fc.weight"][2], imagenet["fc.weight"][999])
    assert torch.equal(model.state_dict()["conv1.weight"], imagenet["conv1.weight"])
    assert (
        record["source"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and record["head_rows_loaded"] == 2
    )


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """bee and dog look as in the source set below; eel and fox are new."""
    return styled_shards(tmp_path_factory.mktemp("target"), {"bee": 1, "dog": 3, "eel": 8, "fox": 9}, 24, 12)


def run_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return small_run(shards, run_dir, "optim.warmup_epochs=0", "logging.log_every=100", *extra)


def one_line_error(capsys, args: list[str]) -> str:
    assert train_ddp.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_sources_are_one_line_errors_and_write_nothing(target, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    run = tmp_path / "run"
    name = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    err = one_line_error(capsys, run_args(target, run, f"model.init_from={name}"))
    where = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert err.startswith(f"train_ddp.py: error: model.init_from {name}: not in TORCH_HOME ({where})")
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth to" in err
    save_checkpoint(tmp_path / "r18.pt", "resnet18", ["bee", "dog"])
    err = one_line_error(
        capsys, run_args(target, run, f"model.init_from={tmp_path / 'r18.pt'}", "model.name=resnet34")
    )
    assert err.endswith(
        f"model.init_from {tmp_path / 'r18.pt'} holds a resnet18, not a resnet34 (model.name)\n"
    )
    weights = build_model("resnet18", num_classes=4).state_dict()
    del weights["layer1.0.bn1.running_var"], weights["conv1.weight"]
    torch.save({**weights, "extra.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    err = one_line_error(capsys, run_args(target, run, f"model.init_from={tmp_path / 'partial.pth'}"))
    assert (
        "does not fit resnet18: 2 missing keys (conv1.weight, layer1.0.bn1.running_var); 1 unexpected keys (extra.weight)"
        in err
    )
    err = one_line_error(capsys, run_args(target, run, "model.freeze=layer9"))
    assert "model.freeze='layer9' is not one of none, backbone, stem, layer1, layer2, layer3, layer4" in err
    assert not run.exists()


def tiny_run_state(overrides: list[str]):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, small_input=True)
    cfg = resolve(
        load_config(None, ["train.precision=fp32", "train.channels_last=false", *overrides]), 1, "cpu", 4
    )
    return make_state(model, cfg, CPU), cfg


def test_frozen_stages_keep_their_weights_and_batchnorm_statistics(tmp_path):
    state, cfg = tiny_run_state(["model.name=resnet18", "model.freeze=layer2", "logging.log_every=100"])
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = Batches(
        [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    )
    train_one_epoch(state, batches, cfg, NullTracker(), NoStop(), save=lambda: None)
    after = state.model.state_dict()
    for key, value in after.items():
        if key.split(".")[0] in ("conv1", "bn1", "layer1", "layer2"):  # frozen: weights and statistics
            assert torch.equal(value, before[key]), key
    for key in ("layer3.0.bn2.weight", "layer3.0.bn1.running_mean", "layer4.1.bn2.weight", "fc.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert not any(p.requires_grad for p in state.model.layer2.parameters())
    assert all(p.requires_grad for p in state.model.layer3.parameters())


def test_the_backbone_learns_at_a_fraction_of_the_heads_rate():
    state, cfg = tiny_run_state(["model.name=resnet18", "optim.backbone_lr_mult=0.1", "optim.lr=0.4"])
    g = torch.Generator().manual_seed(0)
    batches = Batches(
        [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    )
    train_one_epoch(state, batches, cfg, NullTracker(), NoStop(), save=lambda: None)
    head = {id(p) for p in state.model.fc.parameters()}
    for group in state.optimizer.param_groups:
        expected = 1.0 if all(id(p) in head for p in group["params"]) else 0.1
        assert group["lr_mult"] == expected and group["lr"] == pytest.approx(state.schedule(1) * expected)
    assert sum(len(g["params"]) for g in state.optimizer.param_groups if g["lr_mult"] == 1.0) == 2  # fc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fine_tuning_from_a_trained_model_beats_training_from_scratch(target, tmp_path_factory, capsys):
    """Trained on 8 classes, fine-tuned on 4 (2 of them shared) for 2 epochs, against the same 2 epochs
    from random weights (figures printed; the README quotes them)."""
    root = tmp_path_factory.mktemp("finetune")
    names = ["ant", "bee", "cat", "dog", "elk", "gnu", "hen", "jay"]
    source = styled_shards(root / "source", {n: i for i, n in enumerate(names)}, 40, 8)
    assert train_ddp.main(run_args(source, root / "pretrain", "train.epochs=16")) == 0
    best = root / "pretrain" / "best.pt"
    assert train_ddp.main(run_args(target, root / "scratch", "train.epochs=2")) == 0
    tuned = [f"model.init_from={best}", "optim.backbone_lr_mult=0.1", "optim.lr=0.05"]
    assert train_ddp.main(run_args(target, root / "tuned", "train.epochs=2", *tuned)) == 0
    assert (
        "classifier head 2 of 4 classes' rows copied by class id, the others new" in capsys.readouterr().out
    )
    pretrain, scratch, fine = (read_metrics(root / run) for run in ("pretrain", "scratch", "tuned"))
    with capsys.disabled():
        print(
            f"\nsource best val top-1 {max(m['val_top1'] for m in pretrain):.2f}; target val top-1 per epoch: "
            f"scratch {[round(m['val_top1'], 2) for m in scratch]}, fine-tuned {[round(m['val_top1'], 2) for m in fine]}"
        )
    assert fine[-1]["val_top1"] >= scratch[-1]["val_top1"] + 0.15
    record = ck.load(root / "tuned" / "last.pt")["init_from"]
    assert record["source"] == str(best) and record["head_rows_loaded"] == 2
    assert not math.isnan(fine[-1]["train_loss"])


def test_the_tiny_imagenet_fine_tune_recipe_starts_every_class_from_its_imagenet_row(
    tmp_path, monkeypatch, capsys
):
    """The recipe on the bundled Tiny ImageNet sample (real wnids), sizes cut down, from a stand-in for
    torchvision's file in TORCH_HOME: every class is an ImageNet class, so every head row is copied."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    (tmp_path / "torch-home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        build_model("resnet18", num_classes=1000).state_dict(),
        tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth",
    )
    args = [
        "tiny-imagenet",
        "--src",
        "data/tiny-imagenet-demo",
        "--out",
        str(tmp_path / "shards"),
        "--workers",
        "1",
    ]
    assert make_shards.main(args) == 0
    overrides = [
        f"data.root={tmp_path / 'shards'}",
        "data.backend=torch",
        "data.workers=0",
        "data.image_size=32",
        "data.eval_size=32",
    ]
    overrides += [
        "train.epochs=1",
        "train.batch_size=32",
        "train.precision=fp32",
        "train.channels_last=false",
    ]
    overrides += [f"run.dir={tmp_path / 'run'}", "logging.wandb=false", "run.checkpoint_every=2"]
    cmd = ["--config", "configs/tiny_imagenet_resnet18_finetune.yaml", *overrides]
    assert train_ddp.main(cmd) == 0
    record = ck.load(tmp_path / "run" / "last.pt")["init_from"]
    classes = ck.load(tmp_path / "run" / "last.pt")["classes"]
    assert record["source"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert record["head_rows_loaded"] == len(classes) > 1 and all(c.startswith("n") for c in classes)


@pytest.mark.parametrize(
    "name, upto, frozen, trained",
    [
        ("efficientnet_b0", "features.3", ["features.0", "features.3"], ["features.4", "classifier"]),
        ("efficientnet_v2_s", "backbone", ["features.7"], ["classifier"]),
        ("resnet50", "stem", ["conv1", "bn1"], ["layer1", "fc"]),
    ],
)
def test_freezing_stops_the_named_stages_and_nothing_after(name, upto, frozen, trained):
    from imagenet_ddp.finetune import freeze

    model = build_model(name, num_classes=3)
    norms = freeze(model, name, upto)
    for stage in frozen:
        assert not any(p.requires_grad for p in model.get_submodule(stage).parameters()), stage
    for stage in trained:
        assert all(p.requires_grad for p in model.get_submodule(stage).parameters()), stage
    assert norms and all(isinstance(n, torch.nn.modules.batchnorm._BatchNorm) for n in norms)
