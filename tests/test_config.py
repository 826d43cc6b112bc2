"""The config is strict: every recipe validates; unknown keys and wrong types are named, with a fix.

python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagenet_ddp.config import (
    ConfigError,
    cpu_has_bf16,
    dump_yaml,
    flat,
    load_config,
    resolve,
    validate,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
REQUIRED = [
    "data.root",
    "data.backend",
    "data.image_size",
    "model.name",
    "train.epochs",
    "train.batch_size",
    "train.deterministic",
    "optim.lr",
    "run.dir",
    "logging.wandb",
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        validate(load_config(path, list(overrides)))
    return str(e.value)


def test_the_recipes_exist_and_each_validates_with_a_header_stating_its_expected_accuracy():
    names = {p.stem for p in RECIPES}
    assert {
        "demo",
        "tiny_imagenet_resnet18",
        "ffcv_resnet50",
        "ffcv_resnet18",
        "torchvision_resnet50_v2",
        "nvidia_resnet50",
        "timm_efficientnet_b0",
        "timm_resnet50_a3",
    } <= names
    for path in RECIPES:
        validate(load_config(path))
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        assert "Expected" in header and "top-1" in header, path


def test_the_required_keys_exist_under_their_names():
    assert set(REQUIRED) <= set(flat(load_config()))


def test_an_unknown_key_in_a_yaml_is_named_with_its_line_and_the_close_match(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  epoch: 4\n")
    assert error(path) == f"{path}:3: train.epoch: unknown key (did you mean train.epochs?)"


def test_a_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    assert "did you mean optim.lr?" in error(write(tmp_path, "train:\n  lr: 0.1\n"))
    assert "did you mean train.batch_size?" in error(overrides=["data.batch_size=32"])


def test_an_unknown_section_is_named(tmp_path):
    assert "trian: unknown section (did you mean 'train'?)" in error(write(tmp_path, "trian:\n  epochs: 3\n"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  epochs: ten\n", ":2: train.epochs: expected an integer, got 'ten'"),
        ("train:\n  epochs: true\n", ":2: train.epochs: expected an integer, got True"),
        ("train:\n  deterministic: 1\n", ":2: train.deterministic: expected true or false, got 1"),
        (
            "data:\n  backend: dal\n",
            "data.backend: 'dal' is not one of 'dali' | 'torch' | 'synthetic' (did you mean 'dali'?)",
        ),
        ("logging:\n  wandb_tags: a\n", "logging.wandb_tags: expected a list of a string"),
        ("train: 3\n", "train: expected a mapping of keys"),
        ("train:\n  epochs: 3\n  epochs: 4\n", ":3: train.epochs is given twice"),
    ],
)
def test_a_wrong_value_in_a_yaml_is_named(tmp_path, text, expected):
    assert expected in error(write(tmp_path, text))


def test_overrides_are_checked_the_same_way():
    assert (
        error(overrides=["train.epochs=ten"]) == "override train.epochs: expected an integer, got 'ten' (str)"
    )
    assert (
        error(overrides=["train.ema=0.9"])
        == "override train.ema: unknown key (did you mean train.ema_decay?)"
    )
    assert "expected section.key=value" in error(overrides=["epochs=3"])
    assert "computed at start-up" in error(overrides=["derived.lr=3"])


def test_overrides_win_over_the_file_and_keep_types(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\noptim:\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.epochs=5", "run.name=007", "logging.wandb_tags=[a, b]", "run.name=null"])
    assert cfg.train.epochs == 5
    assert cfg.optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; a float key takes it as a number
    assert cfg.run.name is None
    assert cfg.logging.wandb_tags == ["a", "b"]
    assert load_config(None, ["run.name=007"]).run.name == "007"  # a string key keeps the text as typed


def test_rules_between_values_are_checked():
    assert "train.ema_decay must be in [0, 1)" in error(overrides=["train.ema_decay=1.5"])
    assert "data.workers must be 0 or more" in error(overrides=["data.workers=-1"])
    assert "did you mean 'resnet18'" in error(overrides=["model.name=resnet19"])
    cfg = load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve(cfg, 1, "cpu", 10)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the kernel's CPU flags")
def test_auto_precision_on_a_cpu_is_bf16_only_where_the_cpu_runs_it_natively():
    """The kernel's CPU flags are the reference: native bf16 (AVX512-BF16, AMX) or AVX-512, which
    oneDNN uses for bf16, gives bf16; an AVX2-only CPU, where bf16 is emulated (~10-20x slower than
    fp32 per step), gives fp32."""
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    cfg = load_config(None, ["train.batch_size=8"])
    precision = resolve(cfg, world_size=1, device_type="cpu", batches_per_epoch=10).derived.precision
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert precision == "bf16"
    elif "avx512bw" not in flags:
        assert precision == "fp32"
    assert precision == ("bf16" if cpu_has_bf16() else "fp32")


def test_derived_values_are_computed_in_one_place():
    cfg = load_config(
        None, ["train.batch_size=64", "train.grad_accum=2", "optim.lr=0.1", "optim.warmup_epochs=2"]
    )
    d = resolve(cfg, world_size=4, device_type="cpu", batches_per_epoch=101).derived
    assert d.global_batch_size == 64 * 4 * 2
    assert d.lr == pytest.approx(0.1 * 512 / 256)
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (50, 50 * 90, 100)
    assert d.precision == ("bf16" if cpu_has_bf16() else "fp32")  # auto: never emulated bf16
    assert d.eval_resize == 256
    unscaled = load_config(None, ["optim.ref_batch_size=0", "optim.lr=0.3"])
    assert resolve(unscaled, 8, "cpu", 10).derived.lr == 0.3


@pytest.mark.parametrize("world_size", [1, 8, 512])
def test_the_ema_averages_over_the_same_number_of_images_at_any_world_size(world_size):
    """train.ema_decay is per step of ema_ref_batch_size images: after an epoch of 1.28M images the
    weight left on the starting point is the same whatever the world size (and the global batch)."""
    cfg = load_config(
        None, ["train.ema_decay=0.9999", "train.ema_ref_batch_size=256", "train.batch_size=128"]
    )
    d = resolve(cfg, world_size, "cpu", 10).derived
    steps = 1_281_167 / d.global_batch_size
    assert d.ema_decay**steps == pytest.approx(0.9999 ** (1_281_167 / 256), rel=1e-9)
    assert d.ema_decay == pytest.approx(0.9999 ** (128 * world_size / 256))
    per_step = load_config(None, ["train.ema_decay=0.9999", "train.ema_ref_batch_size=0"])
    assert resolve(per_step, world_size, "cpu", 10).derived.ema_decay == 0.9999  # timm's meaning


def test_a_global_batch_beyond_where_sgd_is_known_to_work_is_warned_about():
    from imagenet_ddp.config import advice

    cfg = resolve(load_config(None, ["train.batch_size=256", "optim.lr=0.256"]), 512, "cpu", 10)
    [note] = advice(cfg)
    assert note.startswith(
        "warning: a global batch of 131072 (512 ranks x 256) with SGD at a linearly scaled lr of 131"
    )
    assert "Goyal et al. 2017" in note and "LARS, LAMB" in note
    assert advice(resolve(load_config(None, ["train.batch_size=256"]), 32, "cpu", 10)) == []  # 8192: fine
    lars = load_config(None, ["train.batch_size=256", "optim.name=lars"])
    assert advice(resolve(lars, 512, "cpu", 10)) == []


def test_the_resolved_config_is_yaml_that_loads_back_to_the_same_config(tmp_path):
    cfg = resolve(load_config(RECIPES[0], ["train.epochs=7"]), 2, "cpu", 20)
    text = dump_yaml(cfg)
    assert yaml.safe_load(text)["derived"]["world_size"] == 2
    again = load_config(write(tmp_path, text))
    assert again.train.epochs == 7
    assert resolve(again, 2, "cpu", 20) == cfg


def test_the_cli_prints_one_line_and_exits_2_on_a_config_error():
    run = subprocess.run(
        [sys.executable, "train_ddp.py", "--config", "configs/demo.yaml", "train.epoch=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip()
        == "train_ddp.py: error: override train.epoch: unknown key (did you mean train.epochs?)"
    )
