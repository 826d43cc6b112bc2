"""Folder predictions on torch and on onnxruntime, side by side, in one process.

    python -m imagenet_ddp.bench predict [--images 200] [--model resnet50] [--checkpoint best.pt]

The same generated folder (500x375 JPEGs, quality 90) is classified by predict.py's batched path
(decoding threads, one forward pass per batch) with the checkpoint on torch (fp32, CPU) and with
its ONNX export on onnxruntime (CPU), each the best of --repeats runs taken in turn. Without
--checkpoint, an untrained --model for ImageNet's 1000 classes at 256/224 stands in (the speed of a
network does not depend on its weights). Prints a table, then one JSON line; the top-1 agreement
between the two runtimes is counted too.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--model", default="resnet50", help="architecture of the stand-in checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint of train_ddp.py instead of the stand-in")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding threads, and compute threads")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    from imagenet_ddp.export import OnnxClassifier, export_onnx
    from imagenet_ddp.inference import Classifier, classify_files
    from imagenet_ddp.synth import write_image_set

    torch.set_num_threads(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        images = write_image_set(tmp / "images", args.images)
        ckpt = args.checkpoint or _stand_in(tmp / "best.pt", args.model)
        clf = Classifier.from_checkpoint(ckpt, device="cpu", precision="fp32")
        export_onnx(clf, tmp / "model.onnx", {"checkpoint": str(ckpt)})
        runtimes = {"torch": clf, "onnxruntime": OnnxClassifier(tmp / "model.onnx", threads=args.workers)}
        best, top1 = dict.fromkeys(runtimes, 0.0), {}
        for _ in range(args.repeats):
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                inputs = [(str(path), None) for path in images]
                results = list(
                    classify_files(runtime, inputs, batch_size=args.batch_size, workers=args.workers)
                )
                rate = len(results) / (time.perf_counter() - start)
                best[name] = max(best[name], rate)
                top1[name] = [r.top[0][0].class_index for _, r in results]
                print(f"  {name:12s} {rate:7.1f} img/s", flush=True)
    same = sum(a == b for a, b in zip(top1["torch"], top1["onnxruntime"], strict=True)) / len(images)
    arch = clf.architecture["name"]
    print(f"\n{arch}, {args.images} images, batch {args.batch_size}, {args.workers} threads, fp32 CPU:")
    print("| runtime | img/s | ms/img | vs torch |\n|---|---|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {1000 / rate:.1f} | {rate / best['torch']:.2f}x |")
    print(f"top-1 agreement: {same:.1%}")
    record = {"model": arch, "images": args.images, "img_per_s": best, "top1_agreement": same}
    print(json.dumps({**record, "machine": platform.processor() or platform.machine()}))
    return 0


def _stand_in(path: Path, name: str) -> Path:
    from imagenet_ddp import checkpoint as ck
    from imagenet_ddp.labels import imagenet_names
    from imagenet_ddp.models import architecture, build_model

    wnids = sorted(imagenet_names("en"))
    arch = architecture(name, len(wnids))
    ckpt = {**ck.inference_info(arch, wnids, wnids, 256, 224), "model": build_model(**arch).state_dict()}
    ck.save_atomic(ckpt, path)
    return path
