"""Start from trained weights: read them, fit the classifier head to the new classes, freeze stages.

    python train_ddp.py --config configs/tiny_imagenet_resnet18_finetune.yaml
    python train_ddp.py --config configs/demo.yaml model.init_from=runs/demo/best.pt model.freeze=layer2

`model.init_from` is one of
    a checkpoint of this project (best.pt, last.pt): weights, classes (wnids) and architecture;
    a plain state_dict file (torch.save(model.state_dict()), or .safetensors), also {"state_dict": ...}
    or {"model": ...};
    torchvision:<Weights>.<NAME>, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2: read from TORCH_HOME
    (torch.hub.get_dir()/checkpoints, where torchvision caches it), downloaded there when online.
    timm:<name>.<tag>, e.g. timm:convnext_tiny.fb_in1k: timm's weights read from the Hugging Face cache
    (HF_HOME), never downloaded; a file of them (.safetensors, .bin, .pth) is given by its path.

A timm model's weights pass through timm's own checkpoint_filter_fn first, as timm's pretrained
loading does (a ViT's position embeddings resampled to model.img_size, for one).

The backbone must fit exactly (same keys and shapes): anything else is a one-line error naming the
keys. The head is kept when the classes are the same; when both sides know their classes (wnids, or
folder names) the rows of the classes they share are copied and the others start fresh; otherwise a
fresh head. Knows nothing about ranks: every rank reads the same file and gets the same weights.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import torch
from torch import nn

from imagenet_ddp.errors import UserError
from imagenet_ddp.models import TIMM_PREFIX, adapter_for, skeleton
from imagenet_ddp.shards import file_sha256

TORCHVISION = "torchvision:"
TIMM = "timm:"
DOWNLOAD_TIMEOUT_S = 30
_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes in state_dicts saved wrapped


def head_name(model_name: str, model: nn.Module | None = None) -> str:
    """The classifier head's module: its Linear layer holds one row per class."""
    return adapter_for(model_name).head_name(model if model is not None else _skeleton(model_name))


def stages(model_name: str, model: nn.Module | None = None) -> list[str]:
    """Freezable stages (convnets) or blocks (ViTs) in forward order (model.freeze: up to and
    including one of them); ResNets: stem, layer1..4."""
    return adapter_for(model_name).freeze_points(model if model is not None else _skeleton(model_name))


def check_freeze(model_name: str, freeze: str, model: nn.Module | None = None) -> None:
    if freeze in ("none", "backbone"):
        return
    choices = ["none", "backbone", *stages(model_name, model)]
    if freeze not in choices:
        raise UserError(f"model.freeze={freeze!r} is not one of {', '.join(choices)} for {model_name}")


def freeze(model: nn.Module, model_name: str, upto: str) -> list[nn.Module]:
    """Stop training the stages up to `upto` ("backbone": all but the head). Returns their norm
    layers: the training loop keeps them in eval mode, so their running statistics stay as loaded."""
    check_freeze(model_name, upto, model)
    if upto == "none":
        return []
    frozen = set(adapter_for(model_name).freeze_modules(model, upto))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and any(f"{name}.{p}" in frozen for p, _ in module.named_parameters(recurse=False))
    ]


def _skeleton(model_name: str) -> nn.Module:
    return skeleton(name=model_name, num_classes=2)


def read_source(source: str) -> tuple[dict[str, torch.Tensor], list[str] | None, str | None, str]:
    """(state_dict, classes or None, architecture name or None, digest) of a model.init_from value."""
    if source.startswith(TORCHVISION):
        return _torchvision_weights(source[len(TORCHVISION) :])
    if source.startswith(TIMM):
        return _timm_weights(source[len(TIMM) :])
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"model.init_from {source}: no such file (or torchvision:<Weights>.<NAME>, timm:<name>.<tag>)"
        )
    digest = file_sha256(path)
    try:
        data = _load_weights_file(path)
    except Exception as e:  # damaged, not a torch file, or code that weights_only refuses to run
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.init_from {source}: cannot read it with weights_only=True ({reason})"
        ) from None
    if isinstance(data, dict) and data.get("format", "").startswith("imagenet-ddp-checkpoint/"):
        return dict(data["model"]), list(data["classes"]), data["architecture"]["name"], digest
    if isinstance(data, dict) and not _is_state_dict(data):
        data = next((data[k] for k in ("state_dict", "model") if _is_state_dict(data.get(k))), data)
    if not _is_state_dict(data):
        raise UserError(f"model.init_from {source}: neither a checkpoint of this project nor a state_dict")
    weights = {}
    for key, value in data.items():
        for prefix in _WRAPPERS:
            key = key.removeprefix(prefix)
        weights[key] = value
    return weights, None, None, digest


def init_from(model: nn.Module, model_name: str, source: str, classes: list[str]) -> dict:
    """Load `source` into `model` (built for `classes`), in place. Returns what a checkpoint records."""
    weights, source_classes, source_name, digest = read_source(source)
    if source_name is not None and source_name.split(".")[0] != model_name.split(".")[0]:
        raise UserError(f"model.init_from {source} holds a {source_name}, not a {model_name} (model.name)")
    if source_name is None or source_name.startswith(TIMM_PREFIX):
        weights = _timm_filtered(model, weights)
    head = head_name(model_name, model)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    target = model.state_dict()
    missing = [k for k in target if k not in weights and k not in head_keys]
    unexpected = [k for k in weights if k not in target]
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in weights and k not in head_keys and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
            for what, found in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shapes differ", wrong),
            )
            if found
        ]
        raise UserError(f"model.init_from {source} does not fit {model_name}: {'; '.join(parts)}")
    loaded = {k: v for k, v in weights.items() if k not in head_keys}
    rows, how = _head_rows(weights, target, head, source_classes, classes)
    if rows:
        weight, bias = target[f"{head}.weight"].clone(), target[f"{head}.bias"].clone()
        for new, old in rows:
            weight[new], bias[new] = weights[f"{head}.weight"][old], weights[f"{head}.bias"][old]
        loaded.update({f"{head}.weight": weight, f"{head}.bias": bias})
    model.load_state_dict({**target, **loaded})
    return {"source": source, "sha256": digest, "head": how, "head_rows_loaded": len(rows)}


def _head_rows(weights, target, head, source_classes, classes) -> tuple[list[tuple[int, int]], str]:
    """(row in the new head, row in the source head) pairs to copy, and how they were chosen."""
    old_shape, new_shape = weights[f"{head}.weight"].shape, target[f"{head}.weight"].shape
    if old_shape[1:] != new_shape[1:]:
        return [], "new (the source head has another input width)"
    if source_classes is not None:
        where = {c: i for i, c in enumerate(source_classes)}
        rows = [(i, where[c]) for i, c in enumerate(classes) if c in where]
        if len(rows) == len(classes) == len(source_classes) and all(i == j for i, j in rows):
            return rows, "kept (the same classes)"
        return rows, f"{len(rows)} of {len(classes)} classes' rows copied by class id, the others new"
    if old_shape == new_shape:
        return [(i, i) for i in range(new_shape[0])], "kept (same class count; the source names no classes)"
    return [], f"new ({old_shape[0]} source classes, unnamed, for {new_shape[0]} here)"


def _torchvision_weights(name: str) -> tuple[dict, list[str], str, str]:
    import torchvision

    from imagenet_ddp.labels import imagenet_names

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.init_from torchvision:{name}: torchvision has no such weights "
            "(e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2)"
        ) from None
    model_name = next(
        (
            m
            for m in torchvision.models.list_models()
            if weights in list(torchvision.models.get_model_weights(m))
        ),
        None,
    )
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        _download(weights.url, path, name)
    try:
        weights_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a download cut short, a damaged disk
        raise UserError(
            f"model.init_from torchvision:{name}: cannot read {path} ({type(e).__name__}); delete it to download it again"
        ) from None
    classes = sorted(imagenet_names("en")) if len(weights.meta.get("categories", [])) == 1000 else None
    return weights_dict, classes, model_name, file_sha256(path)


def _timm_weights(spec: str) -> tuple[dict, list[str] | None, str, str]:
    """timm's pretrained weights `spec` (name or name.tag) from the Hugging Face cache; never downloads."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    from imagenet_ddp.labels import imagenet_names

    cfg = timm.models.get_pretrained_cfg(spec) if timm.is_model(spec.split(".")[0]) else None
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(
            f"model.init_from timm:{spec}: timm has no such pretrained weights on the Hugging Face hub"
        )
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    found = [try_to_load_from_cache(cfg.hf_hub_id, f) for f in files]
    path = next((Path(p) for p in found if isinstance(p, str)), None)
    if path is None:
        raise UserError(
            f"model.init_from timm:{spec}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"never downloaded by training: run `hf download {cfg.hf_hub_id} {files[0]}` where there is "
            "network (the same HF_HOME), or give the file: model.init_from=PATH"
        )
    weights = _load_weights_file(path)
    classes = sorted(imagenet_names("en")) if cfg.num_classes == 1000 else None
    return weights, classes, TIMM_PREFIX + cfg.architecture, file_sha256(path)


def _load_weights_file(path: Path):
    """A .safetensors file's tensors, or what torch.load reads safely (.pth, .pt, .bin)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _timm_filtered(model: nn.Module, weights: dict) -> dict:
    """timm's own adaptation of a state_dict to a timm model (its module's checkpoint_filter_fn, as
    timm's load_pretrained applies it): position embeddings resampled to the model's img_size,
    original-layout keys renamed. Other models' weights as they are."""
    import sys

    module = sys.modules.get(type(model).__module__)
    fit = getattr(module, "checkpoint_filter_fn", None)
    if not type(model).__module__.startswith("timm.") or fit is None:
        return weights
    return fit(weights, model)


def _download(url: str, path: Path, name: str) -> None:
    """`url` to `path` (atomically), or a one-line error saying where to put the file by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mktemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise UserError(
            f"model.init_from torchvision:{name}: not in TORCH_HOME ({path}) and downloading it failed "
            f"({reason}): download {url} to {path} on a machine with network"
        ) from None


def _is_state_dict(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())
