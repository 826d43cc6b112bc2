"""Every recipe in configs/ runs as written, on both backends: 2 optimizer steps and one validation on
fixture shards, with only the sizes (image sides scaled to 32 px, the shuffle buffer), the batch, the
loader's worker count, the epoch count and where it writes overridden (and repeated augmentation, which
needs k processes, off in these single-process runs). Everything else (compile, gradient accumulation,
the eval resize, crop ratio and filter, init_from, the model's kwargs, the policy, the loss, the
optimizer and its schedule) is the recipe's; torchvision weights a recipe starts from are a local file of the right architecture in
TORCH_HOME, as they would be after a download (this machine is offline).

And with every ingredient on at once, a run killed mid-epoch resumes to bitwise-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import make_shards
import predict
import train_ddp
from imagenet_ddp.checkpoint import load
from imagenet_ddp.config import load_config
from imagenet_ddp.data.presets import eval_resize_size
from tests.fixtures import make_folder
from tests.test_loaders import DALI
from tests.test_train import one_thread, small_run  # noqa: F401 (one_thread: an autouse fixture)

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
SIDE = 32  # train and eval crops


def weights_file(source: str) -> str:
    import torchvision

    return Path(torchvision.models.get_weight(source.removeprefix("torchvision:")).url).name


def eval_resize_scaled(cfg) -> int:
    return round(cfg.data.eval_resize_size * SIDE / cfg.data.eval_size)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """TORCH_HOME with the torchvision weights the recipes start from (model.init_from), each as
    torchvision's file: the state_dict of that architecture (untrained), under the file name of its URL."""
    import torchvision

    home = tmp_path_factory.mktemp("torch-home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    for recipe in RECIPES:
        source = load_config(recipe).model.init_from or ""
        if source.startswith("torchvision:"):
            weights = torchvision.models.get_weight(source.removeprefix("torchvision:"))
            name = next(
                m
                for m in torchvision.models.list_models()
                if weights in torchvision.models.get_model_weights(m)
            )
            model = torchvision.models.get_model(
                name, weights=None, num_classes=len(weights.meta["categories"])
            )
            torch.save(model.state_dict(), home / "hub" / "checkpoints" / weights_file(source))
    return home


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 classes, 16 train images (2 batches of 8) and 8 val images (one batch)."""
    root = tmp_path_factory.mktemp("recipes")
    make_folder(root / "src", num_classes=4, per_class=4, val_per_class=2, bad=False, side_range=(64, 96))
    args = ["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--workers", "1"]
    assert make_shards.main(args + ["--shard-size", "6"]) == 0
    return root / "shards"


def shrunk(recipe: Path, shards: Path, backend: str, run_dir: Path) -> list[str]:
    """The recipe's overrides for a CPU run of seconds: sizes, batch, one epoch, where it writes."""
    cfg = load_config(recipe)
    overrides = [
        f"data.root={shards}",
        f"data.backend={backend}",
        "data.workers=1",
        f"data.image_size={SIDE}",
        f"data.eval_size={SIDE}",
        "data.shuffle_buffer=16",
        "train.batch_size=8",
        "train.epochs=1",
        f"run.dir={run_dir}",
        "logging.wandb=false",
    ]
    if cfg.data.eval_resize_size:  # the recipe's resize, in the same proportion to the crop
        overrides.append(f"data.eval_resize_size={eval_resize_scaled(cfg)}")
    if cfg.data.progressive_start_size:  # the ramp then starts at half the side
        overrides += [f"data.progressive_start_size={SIDE // 2}", f"data.progressive_step={SIDE // 2}"]
    if cfg.data.repeated_aug > 1:  # needs as many ranks as repeats and DeiT's epoch of N // 256 * 256
        overrides.append("data.repeated_aug=1")  # samples: run under torchrun in test_repeated_aug.py
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", DALI])
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_recipe_trains_two_steps_and_validates(
    shards, torch_home, monkeypatch, tmp_path, recipe, backend
):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    run, written = tmp_path / "run", load_config(recipe)
    assert train_ddp.main(["--config", str(recipe), *shrunk(recipe, shards, backend, run)]) == 0
    [line] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 2 // written.train.grad_accum and line["val_count"] == 8
    assert line["train_size"] == (SIDE // 2 if written.data.progressive_start_size else SIDE)
    saved = load(run / "last.pt")
    for section, keys in RECIPE_KEYS.items():  # as the recipe sets them
        for key in keys:
            assert saved["config"][section][key] == getattr(getattr(written, section), key), (section, key)
    # The eval transform validation ran with: the recipe's resize (scaled) or its crop ratio.
    expected = (
        eval_resize_scaled(written)
        if written.data.eval_resize_size
        else eval_resize_size(SIDE, written.data.eval_crop_ratio)
    )
    assert (saved["preprocess"]["resize"], saved["preprocess"]["crop"]) == (expected, SIDE)
    if written.data.interpolation:  # and with the recipe's resize filter
        assert saved["preprocess"]["interpolation"] == written.data.interpolation
    if written.model.init_from:  # the weights it starts from were read
        file = torch_home / "hub" / "checkpoints" / weights_file(written.model.init_from)
        assert saved["init_from"]["source"] == written.model.init_from
        assert saved["init_from"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


RECIPE_KEYS = {
    "data": ("auto_augment", "eval_crop_ratio", "random_erase", "interpolation", "crop_area_min"),
    "train": (
        "compile",
        "grad_accum",
        "loss",
        "mixup_alpha",
        "cutmix_alpha",
        "ema_decay",
        "precision",
        "grad_clip",
    ),
    "model": ("name", "init_from", "drop_path", "kwargs", "conv_init"),
    "optim": ("name", "weight_decay", "warmup_overlaps_decay"),
}


# A recipe and its published figure in `runs compare --anchor` (imagenet_ddp/anchors_data/anchors.json).
RECIPE_ANCHORS = {
    "torchvision_resnet50_v2": "torchvision-rn50-v2",
    "torchvision_regnet_y_1_6gf": "torchvision-regnet-y-1.6gf",
    "deit_small": "deit-small",
    "convnext_tiny": "convnext-tiny",
    "vit_small_beyer": "vit-s16-beyer",
}


@pytest.mark.parametrize("recipe, anchor", RECIPE_ANCHORS.items())
def test_a_recipes_expected_figure_and_epochs_are_its_anchors(recipe, anchor):
    """The header's first "Expected: X%" and the recipe's epochs are a point `runs compare --anchor`
    plots; the anchor names its source."""
    from imagenet_ddp.runs import load_anchor

    path = REPO / "configs" / f"{recipe}.yaml"
    expected = float(re.search(r"Expected: (\d+\.\d+)%", path.read_text())[1])
    published = load_anchor(anchor)
    assert published["source"] and published["title"]
    [point] = [p for p in published["points"] if p["epochs"] == load_config(path).train.epochs]
    assert abs(100 * point["top1"] - expected) < 0.06, (point, expected)


REPEATING = [r for r in RECIPES if load_config(r).data.repeated_aug > 1]


@pytest.mark.parametrize("recipe", REPEATING, ids=[p.stem for p in REPEATING])
def test_the_command_of_a_recipe_with_repeated_augmentation_starts_enough_processes(recipe):
    """data.repeated_aug=k needs k ranks at least: the header's torchrun command starts them."""
    nproc = int(re.search(r"--nproc_per_node=(\d+)", recipe.read_text())[1])
    assert 1 < load_config(recipe).data.repeated_aug <= nproc


EVERYTHING = (
    "data.auto_augment=ta_wide",
    "data.random_erase=0.5",
    "data.progressive_start_size=16",
    "data.progressive_step=16",
    "data.progressive_start_epoch=0",
    "data.progressive_end_epoch=1",
    "model.blurpool=true",
    "model.drop_path=0.1",
    "model.dropout=0.1",
    "train.mixup_alpha=0.2",
    "train.cutmix_alpha=1.0",
    "train.loss=bce",
    "train.ema_decay=0.9",
    "train.eval_flip=true",
    "optim.name=lamb",
    "optim.lr=0.004",
    "optim.weight_decay=0.02",
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", DALI])
def test_every_ingredient_on_a_run_killed_mid_epoch_resumes_to_the_same_weights(
    shards, tmp_path, backend, capsys
):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    same = (
        f"data.backend={backend}",
        "data.workers=1",
        "data.shuffle_buffer=16",
        "train.batch_size=4",  # 4 steps an epoch
        "train.epochs=2",
        "train.deterministic=true",
        "run.checkpoint_every=1",
        "run.keep_last=10",
        *EVERYTHING,
    )
    assert train_ddp.main(small_run(shards, whole, *same)) == 0
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [line["train_size"] for line in lines] == [16, 32]
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((whole / "step-00000006.pt").read_bytes())  # killed in epoch 2
    assert load(resumed / "last.pt")["batch_in_epoch"] == 2
    assert train_ddp.main(small_run(shards, resumed, *same)) == 0
    a, b = load(whole / "last.pt"), load(resumed / "last.pt")
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key
    # predict.py --evaluate scores the checkpoint as validation did, flip averaging included.
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(whole / "last.pt"), "--evaluate", str(shards / "val")]) == 0
    [scored] = json.loads((whole / "last.eval.json").read_text())["splits"]
    assert (
        abs(scored["top1"] - lines[-1]["val_top1"]) < 1e-9
        and f"{scored['top1']:.2%}" in capsys.readouterr().out
    )
    assert a["preprocess"]["flip"] is True


def test_a_run_is_not_resumed_with_another_optimizer(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_ddp.main(small_run(shards, run, "train.epochs=1", "data.backend=synthetic")) == 0
    assert train_ddp.main(small_run(shards, run, "train.epochs=2", "optim.name=lamb")) == 2
    assert "was trained with optim.name=sgd, not lamb" in capsys.readouterr().err
