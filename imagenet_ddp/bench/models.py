"""What the model variants and other architectures cost: ResNet-50 train steps with and without
BlurPool (and drop path), and a ConvNeXt-T and a ViT-S/16 (timm's), in one process.

    python -m imagenet_ddp.bench models [--batch-size 8] [--size 160] [--steps 3] [--repeats 5]
    python -m imagenet_ddp.bench models --device cuda --batch-size 128 --size 224
    python -m imagenet_ddp.bench models --others timm/deit_small_patch16_224,convnext_tiny

A step is what train_step does: forward and loss under bf16 autocast (--precision fp32: none), backward, SGD with momentum,
on channels_last inputs where the model's adapter says it helps (not ViTs; a ViT is built for
--size). Each variant is built from the same seed and timed for --steps steps, the
variants taken in turn --repeats times, each first in turn; the best time of each counts (the least
disturbed by other work on the machine). Prints a table with each variant's time against the plain network's, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

VARIANTS = {  # name: build_model's keyword arguments for --model
    "plain": {},
    "blurpool": {"blurpool": True},
    "drop_path 0.05": {"drop_path": 0.05},
}
OTHERS = "timm/convnext_tiny,timm/vit_small_patch16_224"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=160, help="image side")
    p.add_argument("--steps", type=int, default=3, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, taken in turn")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="autocast dtype (CPUs without bf16: fp32)",
    )
    p.add_argument("--others", default=OTHERS, help="other models (plain) timed against --model; '' for none")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = {name: (args.model, variant) for name, variant in VARIANTS.items()}
    runs.update({name: (name, {}) for name in filter(None, args.others.split(","))})
    steps = {name: _stepper(args, device, model, variant) for name, (model, variant) in runs.items()}
    best = dict.fromkeys(steps, float("inf"))
    for step in steps.values():
        step()  # warm-up: allocator, oneDNN/cuDNN algorithm choice
    names = list(steps)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # each goes first in turn
            step = steps[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"\n{args.model} variants and other models: train step (forward + backward + SGD), batch "
        f"{args.batch_size} at {args.size} px, {args.precision}, {device.type} ({where}, {torch.get_num_threads()} threads), "
        f"best of {args.repeats} x {args.steps} steps:"
    )
    print(f"| variant | ms/step | img/s | vs {args.model} |\n|---|---|---|---|")
    for name, seconds in best.items():
        print(
            f"| {name} | {seconds * 1000:.0f} | {args.batch_size / seconds:.1f} | "
            f"{seconds / best['plain']:.3f}x |"
        )
    record = {
        "model": args.model,
        "batch_size": args.batch_size,
        "size": args.size,
        "precision": args.precision,
    }
    record["s_per_step"] = best
    print(json.dumps({**record, "device": where, "threads": torch.get_num_threads()}))
    return 0


def _stepper(args, device: torch.device, name: str, variant: dict):
    from imagenet_ddp.models import adapter_for, build_model

    torch.manual_seed(0)
    adapter = adapter_for(name)
    if adapter.fixed_input_size(name) and adapter.defaults(name)["input_size"] != args.size:
        variant = {**variant, "img_size": args.size}
    model = build_model(name, num_classes=1000, **variant)
    channels_last = adapter.channels_last(model)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
