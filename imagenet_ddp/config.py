"""The training configuration: one typed schema, a recipe YAML plus dotted overrides, strict checks.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml \
        train.epochs=40 optim.lr=0.5 run.dir=runs/r50-40ep

Every key of a YAML file or an override must exist in the schema and have the right type; an error names
the key, the file and line, and the closest valid key. Values that depend on the world size or on the
data (global batch, scaled LR, steps) are computed in `resolve` only, and written with the rest to the run
folder (`config.yaml`), the checkpoint and W&B under `derived`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imagenet_ddp.data import BACKENDS
from imagenet_ddp.data import DataConfig as LoaderConfig
from imagenet_ddp.data.presets import eval_resize
from imagenet_ddp.errors import UserError


class ConfigError(UserError):
    """A key or value that the schema does not accept."""


# The `data` section is the loaders' DataConfig (documented in imagenet_ddp/data/__init__.py) without
# batch_size and channels_last: those are train.batch_size and train.channels_last, one value for the
# loader and the model. `loader_config` puts them back.
_FROM_TRAIN = ("batch_size", "channels_last")


def _data_section():
    hints = typing.get_type_hints(LoaderConfig)
    fields = []
    for f in dataclasses.fields(LoaderConfig):
        if f.name in _FROM_TRAIN:
            continue
        tp = Literal[BACKENDS] if f.name == "backend" else hints[f.name]  # a typo gets a close match
        fields.append((f.name, tp, field(default=f.default, default_factory=f.default_factory)))
    section = dataclasses.make_dataclass("DataConfig", fields)
    section.__module__ = __name__
    return section


DataConfig = _data_section()


@dataclass
class ModelConfig:
    # A torchvision.models name (resnet50, convnext_tiny, vit_b_16, ...) or timm/<a timm model name>
    # (timm/vit_small_patch16_224, timm/convnext_tiny), randomly initialised (docs/models.md).
    name: str = "resnet50"
    small_input: bool = False  # stem for 32-64 px inputs: 3x3 stride-1 first conv, no max-pool
    zero_init_residual: bool = True  # ResNets: last BN of each block starts at 0 (Goyal et al. 2017)
    # Start from weights (imagenet_ddp/finetune.py): a checkpoint of this project, a state_dict file,
    # or torchvision:<Weights>.<NAME> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2); None: random.
    init_from: str | None = None
    # none | backbone | a stage or block, frozen with all before it, BN in eval (ResNet: stem, layer1..4;
    # timm ViT: stem, blocks.0..; timm ConvNeXt: stem, stages.0..3; docs/models.md lists them)
    freeze: str = "none"
    blurpool: bool = False  # ResNets: blur (3x3 binomial) before each strided convolution (FFCV, Composer)
    drop_path: float | None = (
        None  # stochastic depth rate of the last block; None: the architecture's default
    )
    dropout: float | None = None  # before the classifier; None: the architecture's default
    # ResNets' convolutions: fan_out (torchvision's kaiming_normal_) or fan_in (NVIDIA's ResNet-50 v1.5)
    conv_init: Literal["fan_out", "fan_in"] = "fan_out"
    # Keyword arguments for timm.create_model or torchvision's builder, e.g. {global_pool: avg,
    # class_token: false} for a plain ViT (timm train.py's --model-kwargs); recorded in checkpoints.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 90  # passes over the train split
    batch_size: int = 64  # per process (per GPU)
    grad_accum: int = 1  # micro-batches per optimizer step
    # auto: bf16 on GPUs that have it, else fp16; on CPUs bf16 where it runs natively (AVX-512, AMX), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # model and images in channels_last memory format (faster with AMP)
    compile: bool = False  # torch.compile the model
    label_smoothing: float = 0.1  # share of each target spread over all classes (ce and bce); 0: off
    loss: Literal["ce", "bce"] = "ce"  # cross-entropy, or binary cross-entropy over classes (timm, Composer)
    bce_target_threshold: float = 0.0  # bce: targets above it become 1 (timm's target_threshold); 0: off
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha) on the device batch; 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0: off
    mix_switch_prob: float = 0.5  # with both on: the probability of CutMix for a batch (timm's switch_prob)
    eval_flip: bool = False  # evaluation averages the logits of each image and its mirror (FFCV's lr_tta)
    grad_clip: float = 0.0  # max global grad norm; 0: no clipping
    ema_decay: float = 0.0  # EMA of weights: decay per step of a global batch of ema_ref_batch_size; 0: none
    ema_ref_batch_size: int = 256  # the decay is scaled to the real global batch B as ema_decay ** (B / this)
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps with a NaN/Inf gradient
    deterministic: bool = False  # deterministic algorithms (slower), seeded everything
    seed: int = 0  # seeds initialization, data order and augmentations (with the rank and the epoch)


@dataclass
class OptimConfig:
    # sgd, adamw: torch's (fused on CUDA); lamb, rmsprop_tf, lars: timm's
    name: Literal["sgd", "adamw", "lamb", "rmsprop_tf", "lars"] = "sgd"
    lr: float = 0.1  # for a global batch of ref_batch_size; scaled linearly to the real one
    ref_batch_size: int = 256  # 0: use lr as is
    momentum: float = 0.9  # sgd, lars, rmsprop_tf
    nesterov: bool = True  # sgd, lars: Nesterov momentum
    weight_decay: float = 5e-5  # L2 penalty of the weights (adamw, lamb: decoupled)
    wd_on_norm_and_bias: bool = False  # also decay norm layers' weights and biases (false: they take none)
    backbone_lr_mult: float = 1.0  # the backbone's LR as a fraction of the head's (fine-tuning)
    # Layer-wise LR decay (BEiT, timm's layer_decay): a parameter of layer i of n (0 the stem, n-1 the
    # head) trains at lr * layer_decay ** (n - 1 - i); times backbone_lr_mult outside the head. null: off
    layer_decay: float | None = None
    warmup_epochs: float = 5.0  # linear warmup from warmup_start_factor * lr
    warmup_start_factor: float = 0.1  # the LR at step 0, as a fraction of the scaled lr
    min_lr_factor: float = 0.0  # cosine decays to min_lr_factor * lr
    # cosine, linear: the decay spans the whole run and warmup replaces its start (timm's cosine with
    # warmup_prefix=False); false: it spans the steps after warmup
    warmup_overlaps_decay: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, lamb
    eps: float | None = None  # adamw, lamb, rmsprop_tf, lars; None: the library's default (adamw 1e-8)
    rmsprop_alpha: float = 0.9  # rmsprop_tf: decay of the squared-gradient average
    lars_trust_coeff: float = 0.001  # lars
    # After warmup: cosine to min_lr_factor * lr; linear down to it (with warmup, FFCV's triangular
    # schedule); step: times step_gamma every step_epochs (timm's `step`)
    schedule: Literal["cosine", "linear", "step"] = "cosine"
    step_epochs: float = 30.0  # step schedule: epochs between two drops
    step_gamma: float = 0.1  # step schedule: the LR is multiplied by this at each drop


@dataclass
class RunConfig:
    dir: str = "runs/default"  # the run folder: config.yaml, metrics.jsonl, checkpoints, wandb/
    name: str | None = None  # None: the folder's name
    checkpoint_every: int = 0  # also save last.pt every this many steps; 0: at epoch ends only
    keep_last: int = 2  # step checkpoints kept beside last.pt and best.pt
    resume: bool = True  # continue from run.dir/last.pt when it exists
    timeout_s: int = 900  # collective timeout: a dead or hung rank ends the job instead of hanging it
    poll_every: int = 10  # steps between checks for a stop signal and for NaN/Inf streaks (each a host sync)
    # Resume although settings that change the run (see config.run_changes) differ from its checkpoint's;
    # the changes are appended to run.dir/config-changes.jsonl, config.yaml keeps the original.
    allow_changes: bool = False


@dataclass
class LoggingConfig:
    log_every: int = 50  # steps between console/W&B step metrics (each costs one device sync)
    wandb: bool = True  # log to Weights & Biases (rank 0 only); false: console and metrics.jsonl only
    wandb_project: str = "imagenet-ddp"  # W&B project of the run
    wandb_entity: str | None = None  # W&B user or team; None: the logged-in account's default
    wandb_group: str | None = None  # runs of one sweep share a group
    wandb_tags: list[str] = field(default_factory=list)  # tags of the W&B run
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: online if a key is set, else offline
    wandb_init_timeout: float = 15.0  # online init timeout (wandb may retry 2-4x this); then offline
    wandb_checkpoints: bool = False  # also log best.pt as a W&B artifact at the end of the run


@dataclass
class Derived:
    """Computed by `resolve`, never set by hand: written for the record, recomputed on every start."""

    world_size: int = 1  # processes (one per GPU) in the run
    global_batch_size: int = 0  # batch_size * world_size * grad_accum
    lr: float = 0.0  # optim.lr scaled by global_batch_size / ref_batch_size
    precision: str = "fp32"  # train.precision with auto decided for this device
    steps_per_epoch: int = 0  # optimizer steps per epoch: loader batches per rank // grad_accum
    total_steps: int = 0  # steps_per_epoch * train.epochs
    warmup_steps: int = 0  # optim.warmup_epochs in steps
    ema_decay: float = 0.0  # train.ema_decay per optimizer step of global_batch_size images
    eval_resize: int = 0  # evaluation: shorter side resized to this, then centre crop data.eval_size
    interpolation: str = ""  # the train and eval resize filter: data.interpolation or the model's default
    recipe: str = ""  # the --config file the run was started from ("": the defaults)
    overrides: list[str] = field(default_factory=list)  # the section.key=value given on top of it


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    derived: Derived = field(default_factory=Derived)


# ---------------------------------------------------------------------------------------------- checks


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "None" if tp is type(None) else str(tp)
    )


def _check_value(value, tp, where: str):
    """`value` converted to `tp`, or ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)} like [a, b], got {value!r}")
        return [_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping like {{key: value}}, got {value!r}")
        return dict(value)
    # bool is an int in Python; a config that says `epochs: true` is a mistake, not 1.
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string: accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _suggest(key: str, section: str | None, schema: dict[str, type]) -> str:
    """' (did you mean ...?)' for an unknown key: a close name here, or the same name in another section."""
    if section is None:
        close = difflib.get_close_matches(key, list(schema), n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""
    elsewhere = [f"{s}.{key}" for s, cls in schema.items() if s != section and key in _fields(cls)]
    if elsewhere:
        return f" (did you mean {elsewhere[0]}?)"
    keys = list(_fields(schema[section]))
    here = difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or [k for k in keys if k.startswith(key)]
    if here:
        return f" (did you mean {section}.{here[0]}?)"
    return f" (valid keys of {section}: {', '.join(_fields(schema[section]))})"


def _build(data: dict, source: str, lines: dict[str, int], allow_derived: bool) -> Config:
    """A Config from nested dicts: every key must exist, every value must have its type."""

    def where(key: str) -> str:
        line = lines.get(key)
        return f"{source}:{line}: {key}" if line else f"{source}: {key}" if source else key

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, train, ...)")
    schema = _fields(Config)
    sections = {}
    for name, values in data.items():
        if name not in schema:
            raise ConfigError(f"{where(str(name))}: unknown section{_suggest(str(name), None, schema)}")
        if name == "derived" and not allow_derived:
            raise ConfigError(f"{where(name)}: computed at start-up, cannot be set (set the inputs instead)")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where(name)}: expected a mapping of keys, got {values!r}")
        keys = _fields(schema[name])
        checked = {}
        for key, value in values.items():
            dotted = f"{name}.{key}"
            if key not in keys:
                raise ConfigError(f"{where(dotted)}: unknown key{_suggest(str(key), name, schema)}")
            checked[key] = _check_value(value, keys[key], where(dotted))
        sections[name] = schema[name](**checked)
    return Config(**sections)


def _yaml_lines(text: str, source: str) -> dict[str, int]:
    """Line of each dotted key in a YAML text, and ConfigError on a key given twice (YAML keeps the last)."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            if dotted in lines:
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: {dotted} is given twice")
            lines[dotted] = key_node.start_mark.line + 1
            if not prefix:
                walk(value_node, f"{dotted}.")

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return lines


def _parse_override(text: str, schema: dict[str, type]) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value parsed as YAML, or raw text for string keys)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.epochs=10")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in schema:
        raise ConfigError(f"override {dotted}: unknown section{_suggest(section, None, schema)}")
    if section == "derived":
        raise ConfigError(f"override {dotted}: computed at start-up, cannot be set (set the inputs instead)")
    keys = _fields(schema[section])
    if key not in keys:
        raise ConfigError(f"override {dotted}: unknown key{_suggest(key, section, schema)}")
    tp = keys[key]
    # A string key takes the text as typed (run.name=007 stays '007'); 'null' still means None.
    is_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in tp.__args__)
    if is_str and raw.strip() not in ("null", "None", "~"):
        return section, key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted}: cannot read {raw!r}: {e}") from None
    return section, key, _check_value(value, tp, f"override {dotted}")


def config_from_dict(data: dict, source: str = "") -> Config:
    """A Config from a plain dict (e.g. a checkpoint's): same checks; `derived` is accepted and recomputed."""
    return _build(data, source, {}, allow_derived=True)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Recipe file (or the defaults) + dotted overrides, every key and type checked."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = str(path) if path else "defaults"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"--config {path} is not a YAML text file (a checkpoint? resume by run.dir instead)"
            ) from None
        try:
            lines = _yaml_lines(text, source)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:  # its text spans lines, with a caret: the problem and where, in one
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        # A resolved config.yaml of a run carries `derived`: accepted for re-use and recomputed (but
        # it still names the recipe the run came from).
        recorded = _build(data, source, lines, allow_derived=True).derived
        data.pop("derived", None)
    schema = _fields(Config)
    for text in overrides:
        section, key, value = _parse_override(text, schema)
        if not data.get(section):
            data[section] = {}
        data[section][key] = value
        lines.pop(f"{section}.{key}", None)
    cfg = _build(data, source, lines, allow_derived=False)
    if path is not None:
        cfg.derived.recipe = recorded.recipe or str(path)
        cfg.derived.overrides = [*recorded.overrides, *overrides] if recorded.recipe else list(overrides)
    else:
        cfg.derived.overrides = list(overrides)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat(cfg: Config) -> dict[str, Any]:
    """{'train.epochs': 90, ...}: the form W&B shows as columns."""
    return {f"{s}.{k}": v for s, values in to_dict(cfg).items() for k, v in values.items()}


def dump_yaml(cfg: Config) -> str:
    header = "# Resolved configuration of this run. `derived` is recomputed at start-up.\n"
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def loader_config(cfg: Config) -> LoaderConfig:
    """The loaders' DataConfig: the data section plus train.batch_size and train.channels_last, and
    data.interpolation resolved (the model's default when unset)."""
    try:
        return LoaderConfig(
            **{**dataclasses.asdict(cfg.data), "interpolation": interpolation(cfg)},
            batch_size=cfg.train.batch_size,
            channels_last=cfg.train.channels_last,
        )
    except UserError as e:
        raise ConfigError(str(e)) from None


def interpolation(cfg: Config) -> str:
    """data.interpolation, or when unset the model's own (its adapter's defaults: timm's pretrained_cfg,
    torchvision's weights), bilinear where that is neither bilinear nor bicubic."""
    if cfg.data.interpolation is not None:
        return cfg.data.interpolation
    from imagenet_ddp.data.presets import INTERPOLATIONS
    from imagenet_ddp.models import adapter_for

    default = adapter_for(cfg.model.name).defaults(cfg.model.name).get("interpolation")
    return default if default in INTERPOLATIONS else "bilinear"


# Sides in pixels worth training on and that a decoder can make: below MIN_SIDE an image holds
# nothing to learn from; above MAX_SIDE a resize needs gigabytes per batch.
MIN_SIDE, MAX_SIDE = 8, 4096
MAX_EPOCHS = 100_000  # beyond any schedule; step counts computed from more overflow


def _nonfinite(cfg: Config) -> str | None:
    """The first number of the config that is NaN or infinite, as `section.key=value`."""
    for section, values in to_dict(cfg).items():
        if section == "derived":
            continue
        for key, value in values.items():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    return f"{section}.{key}={value}"
    return None


def _has_batchnorm(model) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def validate(cfg: Config) -> Config:
    """Rules between and within fields that types cannot express; ConfigError naming the key."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    bad = _nonfinite(cfg)
    if bad:
        raise ConfigError(f"{bad}: every number must be finite (not NaN or infinity)")
    rules = [
        (
            MIN_SIDE <= d.image_size <= MAX_SIDE and MIN_SIDE <= d.eval_size <= MAX_SIDE,
            f"data.image_size and data.eval_size must be in [{MIN_SIDE}, {MAX_SIDE}] pixels "
            f"(got {d.image_size} and {d.eval_size})",
        ),
        (
            0 < d.eval_crop_ratio <= 1 and eval_resize(d) <= MAX_SIDE,
            f"data.eval_size / data.eval_crop_ratio (or data.eval_resize_size) must be at most {MAX_SIDE} "
            f"pixels, got {d.eval_size} / {d.eval_crop_ratio}",
        ),
        (0.0 <= o.momentum < 1.0, f"optim.momentum must be in [0, 1), got {o.momentum}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (cfg.model.drop_path is None or 0 <= cfg.model.drop_path < 1, "model.drop_path must be in [0, 1)"),
        (cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
        (t.ema_ref_batch_size >= 0, "train.ema_ref_batch_size must be >= 0 (0: the decay is per step as is)"),
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (t.grad_clip >= 0, "train.grad_clip must be >= 0 (0: no clipping)"),
        (t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.ref_batch_size >= 0, "optim.ref_batch_size must be >= 0 (0: no scaling)"),
        (0 <= o.warmup_epochs <= MAX_EPOCHS, f"optim.warmup_epochs must be in [0, {MAX_EPOCHS}]"),
        (t.epochs <= MAX_EPOCHS, f"train.epochs must be at most {MAX_EPOCHS}"),
        (o.backbone_lr_mult > 0, "optim.backbone_lr_mult must be > 0 (freeze with model.freeze instead)"),
        (
            o.layer_decay is None or 0 < o.layer_decay <= 1,
            f"optim.layer_decay must be in (0, 1] (or null: off), got {o.layer_decay}",
        ),
        (
            0.0 <= t.bce_target_threshold < 1.0,
            "train.bce_target_threshold must be in [0, 1) (0: soft targets)",
        ),
        (
            t.loss == "bce" or not t.bce_target_threshold,
            "train.bce_target_threshold applies to train.loss=bce",
        ),
        (
            o.momentum > 0 or not o.nesterov or o.name not in ("sgd", "lars"),
            "optim.nesterov=true needs optim.momentum > 0",
        ),
        (o.schedule != "step" or not o.min_lr_factor, "optim.min_lr_factor applies to cosine and linear"),
        (
            t.mixup_alpha >= 0 and t.cutmix_alpha >= 0,
            "train.mixup_alpha and train.cutmix_alpha must be >= 0 (0: off)",
        ),
        (0.0 <= t.mix_switch_prob <= 1.0, "train.mix_switch_prob is a probability in [0, 1]"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)"),
        (o.eps is None or o.eps > 0, "optim.eps must be > 0 (or null: the optimizer's default)"),
        (0 <= o.rmsprop_alpha < 1, "optim.rmsprop_alpha must be in [0, 1)"),
        (o.lars_trust_coeff > 0, "optim.lars_trust_coeff must be > 0"),
        (
            0 < o.step_epochs <= MAX_EPOCHS and 0 < o.step_gamma <= 1,
            f"optim.step_epochs must be in (0, {MAX_EPOCHS}] and optim.step_gamma in (0, 1]",
        ),
        (
            0 <= o.min_lr_factor <= 1 and 0 <= o.warmup_start_factor <= 1,
            "optim.min_lr_factor and optim.warmup_start_factor must be in [0, 1]",
        ),
        (cfg.run.keep_last >= 0, "run.keep_last must be >= 0"),
        (bool(cfg.run.dir.strip()), "run.dir must name a folder (it is empty)"),
        (0 <= t.seed < 2**32, f"train.seed must be in [0, 2**32), got {t.seed}"),
        (cfg.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0: at epoch ends only)"),
        (cfg.run.timeout_s > 0, "run.timeout_s must be > 0"),
        (cfg.run.poll_every >= 1, "run.poll_every must be >= 1"),
        (cfg.logging.log_every >= 1, "logging.log_every must be >= 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    loader_config(cfg)
    from imagenet_ddp.finetune import check_freeze
    from imagenet_ddp.models import model_architecture, skeleton

    try:  # the network is built without memory (meta tensors): its own errors come out here
        model = skeleton(**model_architecture(cfg.model, 2, d.image_size, d.eval_size))
        check_freeze(cfg.model.name, cfg.model.freeze, model)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if t.batch_size == 1 and _has_batchnorm(model):
        raise ConfigError(
            f"train.batch_size=1 with {cfg.model.name}'s BatchNorm: its statistics need at least 2 "
            "images per rank; use train.batch_size>=2 (train.grad_accum keeps a global batch)"
        )
    return cfg


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively in oneDNN (AVX-512 or AMX). Emulated on AVX2, bf16 autocast
    makes a training step ~10-20x slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(device_type: str) -> str:
    """train.precision=auto on this device: bf16 on GPUs that have it, else fp16; on CPUs bf16 where
    it runs natively, else fp32."""
    import torch

    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp16"


def resolve(cfg: Config, world_size: int, device_type: str, batches_per_epoch: int) -> Config:
    """`cfg` with `derived` filled in: the one place where values are computed from others."""
    t, o = validate(cfg).train, cfg.optim
    if batches_per_epoch < t.grad_accum:
        raise ConfigError(
            f"an epoch has {batches_per_epoch} batches per rank, fewer than train.grad_accum={t.grad_accum}"
        )
    precision = auto_precision(device_type) if t.precision == "auto" else t.precision
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    global_batch = t.batch_size * world_size * t.grad_accum
    steps_per_epoch = batches_per_epoch // t.grad_accum
    derived = Derived(
        world_size=world_size,
        global_batch_size=global_batch,
        lr=o.lr * global_batch / o.ref_batch_size if o.ref_batch_size else o.lr,
        precision=precision,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * t.epochs,
        warmup_steps=round(o.warmup_epochs * steps_per_epoch),
        # Per image, not per step: the EMA averages over the same number of images whatever the
        # world size (torchvision's reference scales its decay the same way).
        ema_decay=t.ema_decay ** (global_batch / t.ema_ref_batch_size)
        if t.ema_ref_batch_size
        else t.ema_decay,
        eval_resize=eval_resize(cfg.data),
        interpolation=interpolation(cfg),
        recipe=cfg.derived.recipe,
        overrides=list(cfg.derived.overrides),
    )
    if not math.isfinite(derived.lr):
        raise ConfigError(
            f"optim.lr={o.lr} scaled to a global batch of {global_batch} is {derived.lr}: lower optim.lr"
        )
    return dataclasses.replace(cfg, derived=derived)


# Settings that say where or how fast a run goes, not what it computes: a resume may change them.
_RUNTIME_KEYS = {
    "data": ("backend", "workers", "decode_device"),
    "train": ("compile", "channels_last", "max_nonfinite_steps", "deterministic"),
}
_RUNTIME_PREFIXES = ("data.dali_",)


def run_changes(saved: dict, cfg: Config, derived: bool = False) -> dict[str, tuple[Any, Any]]:
    """{'section.key': (saved value, new value)} for each setting that changes what a run computes
    (model, data, train, optim; not run, logging or where it runs) and differs from `saved`, a
    checkpoint's config; `derived`: the derived values that differ too (for the record). Keys an
    older checkpoint lacks are not compared."""
    changes = {}
    new = to_dict(cfg)
    for section in ("model", "data", "train", "optim", *(("derived",) if derived else ())):
        for key, old in (saved.get(section) or {}).items():
            dotted = f"{section}.{key}"
            if key in _RUNTIME_KEYS.get(section, ()) or dotted.startswith(_RUNTIME_PREFIXES):
                continue
            if dotted in ("derived.recipe", "derived.overrides"):
                continue
            if key in new[section] and new[section][key] != old:
                changes[dotted] = (old, new[section][key])
    return changes


def recipe_name(recipe: str) -> str:
    """`configs/demo.yaml` -> `demo`; "" (no --config) -> `defaults`; a run folder's config.yaml
    (an older run restarted from it) -> the folder's name."""
    if not recipe:
        return "defaults"
    path = Path(recipe)
    return path.parent.name if path.name == "config.yaml" else path.stem


def run_label(cfg: Config) -> str:
    """The recipe's name and the overrides that change the experiment (not where it runs or logs),
    the last one of each key: `demo optim.lr=0.4`, what W&B shows as the run name."""
    last = {o.split("=", 1)[0]: o for o in cfg.derived.overrides}
    changes = [o for o in last.values() if not o.startswith(("run.", "logging."))]
    return " ".join([recipe_name(cfg.derived.recipe), *changes])


# Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): SGD with linear LR scaling and warmup matched
# small-batch accuracy up to a global batch of 8k on ImageNet, and lost accuracy beyond it.
SGD_MAX_GLOBAL_BATCH = 8192


def advice(cfg: Config) -> list[str]:
    """Warnings about a resolved config that is valid but likely to train badly."""
    d, notes = cfg.derived, []
    if d.global_batch_size > SGD_MAX_GLOBAL_BATCH and cfg.optim.name == "sgd":
        notes.append(
            f"warning: a global batch of {d.global_batch_size} ({d.world_size} ranks x "
            f"{cfg.train.batch_size}{f' x {cfg.train.grad_accum}' if cfg.train.grad_accum > 1 else ''}) with "
            f"SGD at a linearly scaled lr of {d.lr:.4g}: plain SGD loses accuracy beyond a global batch of "
            f"~{SGD_MAX_GLOBAL_BATCH} (Goyal et al. 2017). Such batches need a layer-wise adaptive "
            "optimizer (LARS, LAMB: optim.name=lars or lamb), or use fewer ranks or a smaller train.batch_size"
        )
    return notes
