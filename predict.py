#!/usr/bin/env python3
"""Classify images with a checkpoint of train_ddp.py; evaluate it on shards; serve a web page.

    python predict.py --checkpoint runs/demo/best.pt photo.jpg photos/ 'more/**/*.png' --lang es
    find photos -name '*.jpg' | python predict.py --checkpoint runs/demo/best.pt - --format jsonl
    python predict.py --checkpoint runs/demo/best.pt --evaluate shards/demo/val
    python predict.py --checkpoint best.pt --evaluate shards/imagenet/val shards/imagenet-r/test shards/imagenet-c
    torchrun --standalone --nproc_per_node=8 predict.py --checkpoint best.pt --suite suite.txt
    python predict.py --checkpoint runs/demo/best.pt --serve --port 8000     # http://127.0.0.1:8000/
    python predict.py --checkpoint runs/demo/best.pt --export model.onnx     # for apps (onnxruntime)
    python predict.py --model model.onnx photo.jpg --lang es                  # the same, on onnxruntime

The checkpoint alone is enough (read with weights_only=True: a checkpoint cannot run code).
Per image: the top-k classes with class index, wnid, English name, name in --lang, probability.
A file that cannot be classified gets an error line in its place and the others go on.
Exit status: 0 all classified, 1 some file failed, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from imagenet_ddp.errors import ArgumentParser, UserError

FORMATS = ("table", "jsonl", "csv")


def parse_args(argv):
    p = ArgumentParser(
        prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "images", nargs="*", metavar="IMAGE", help="files, directories, globs; - reads them from stdin"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .pt file written by train_ddp.py (e.g. best.pt)")
    source.add_argument("--model", help="an .onnx file written by --export: runs on onnxruntime")
    p.add_argument("--export", metavar="ONNX", help="write the checkpoint's model as ONNX for apps")
    p.add_argument(
        "--force", action="store_true", help="--export: replace an existing file that is not our ONNX"
    )
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument(
        "--lang",
        default="en",
        help="language of the class names: en, es, fr, de, it, pt (--serve: the page's language when "
        "the browser's is none of these)",
    )
    p.add_argument(
        "--format", choices=FORMATS, default="table", help="table for people, jsonl/csv for programs"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument(
        "--workers", type=int, default=2, help="decoding threads (with --evaluate: loader workers)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: as in training (to reproduce its validation numbers)",
    )
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument(
        "--evaluate",
        nargs="+",
        metavar="SPLIT_DIR",
        help="one table over shard splits (e.g. shards/x/val; a folder of splits such as ImageNet-C's: "
        "each of them); written as JSON next to the checkpoint (best.eval.json)",
    )
    p.add_argument("--suite", metavar="FILE", help="--evaluate the split folders listed in FILE, one a line")
    p.add_argument("--backend", choices=("torch", "dali"), default="torch", help="loader for --evaluate")
    p.add_argument("--serve", action="store_true", help="serve a web page and a JSON endpoint")
    p.add_argument("--host", default="127.0.0.1", help="--serve address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="--serve port (0: any free one)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="--serve: largest accepted upload")
    p.add_argument("--max-megapixels", type=float, default=50.0, help="--serve: largest accepted image")
    p.add_argument("--max-concurrent", type=int, default=4, help="--serve: images decoded at once")
    args = p.parse_args(argv)
    if args.evaluate and args.suite:
        p.error("give --evaluate SPLIT_DIR ... or --suite FILE, not both")
    if args.suite:
        from imagenet_ddp.evaluate import read_suite

        try:
            args.evaluate = read_suite(args.suite)
        except UserError as e:
            p.error(str(e))
    modes = bool(args.images) + bool(args.evaluate) + args.serve + bool(args.export)
    if modes != 1:
        p.error("give images to classify, or --evaluate SPLIT_DIR, --serve or --export ONNX (one of them)")
    if args.model and (args.export or args.ema):
        p.error("--export and --ema need --checkpoint")
    if args.topk < 1 or args.batch_size < 1 or args.workers < 0:
        p.error("--topk and --batch-size must be at least 1, --workers at least 0")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port}: a port is 0-65535 (0: any free one)")
    if not (args.max_upload_mb > 0 and args.max_megapixels > 0 and args.max_concurrent >= 1):
        p.error("--max-upload-mb and --max-megapixels must be > 0, --max-concurrent at least 1")
    if args.device != "auto":
        import torch

        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            p.error(f"--device {args.device}: not a device here; use auto, cpu, cuda or cuda:N")
    return args


def percent(p: float) -> str:
    return f"{100 * p:6.2f}%"


def write_table(out, path: str, result, lang: str) -> None:
    out.write(f"{path}\n")
    if isinstance(result, str):
        out.write(f"  error: {result}\n")
        return
    for c, p in result.top:
        name = c.name if lang == "en" or c.name == c.name_en else f"{c.name} ({c.name_en})"
        out.write(f"  {percent(p)}  {name}  [{c.wnid}, class {c.class_index}]\n")


def classify(clf, args) -> int:
    from imagenet_ddp.inference import as_record, classify_files, expand_inputs

    out = sys.stdout
    rows = csv.writer(out, lineterminator="\n")
    if args.format == "csv":
        fields = [
            "path",
            "rank",
            "class_index",
            "wnid",
            "name_en",
            f"name_{args.lang}",
            "probability",
            "error",
        ]
        rows.writerow(fields)
    total = failed = 0
    results = classify_files(
        clf,
        expand_inputs(args.images, sys.stdin),
        topk=args.topk,
        lang=args.lang,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    for path, result in results:
        total += 1
        failed += isinstance(result, str)
        if args.format == "table":
            write_table(out, path, result, args.lang)
        elif args.format == "jsonl":
            out.write(json.dumps(as_record(path, result, args.lang), ensure_ascii=False) + "\n")
        elif isinstance(result, str):
            rows.writerow([path, "", "", "", "", "", "", result])
        else:
            for rank, (c, p) in enumerate(result.top, 1):
                rows.writerow([path, rank, c.class_index, c.wnid, c.name_en, c.name, f"{p:.6g}", ""])
        out.flush()  # a long run piped into another program shows its results as they come
    if failed:
        print(f"predict.py: {failed} of {total} files could not be classified", file=sys.stderr)
    return 1 if failed else 0


def evaluate(args) -> int:
    """The splits' table (rank 0 prints it and writes the JSON); under torchrun every rank scores its
    share of each split."""
    from imagenet_ddp import dist
    from imagenet_ddp.evaluate import evaluate_suite, find_splits, format_table, save_results

    splits = find_splits(args.evaluate)
    with dist.distributed() as env:
        clf = load_classifier(args, env.device if env.world_size > 1 and args.device == "auto" else None)
        report = evaluate_suite(
            clf, splits, backend=args.backend, batch_size=args.batch_size, workers=args.workers, env=env
        )
        if not env.is_main:
            return 0
    path = save_results(report, args.checkpoint or args.model)
    if args.format == "table":
        print(format_table(report["splits"], report["imagenet_c"]), end="")
        where = f"{report['world_size']} ranks" if report["world_size"] > 1 else "1 process"
        print(f"({report['backend']} loader, {report['precision']}, {where}; written to {path})")
    elif args.format == "jsonl":
        for record in report["splits"]:
            print(json.dumps(record))
        if report["imagenet_c"]:
            print(json.dumps({"dataset": "imagenet-c", **report["imagenet_c"]}))
    else:
        fields = list(dict.fromkeys(k for r in report["splits"] for k in r))
        rows = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
        rows.writeheader()
        rows.writerows(report["splits"])
    return 0


def load_classifier(args, device=None):
    """The checkpoint's (or the ONNX file's) classifier; `device` overrides --device (a torchrun rank's)."""
    if args.model:
        from imagenet_ddp.export import OnnxClassifier

        return OnnxClassifier(args.model)
    from imagenet_ddp.inference import Classifier

    return Classifier.from_checkpoint(
        args.checkpoint, device=device or args.device, precision=args.precision, ema=args.ema
    )


def export(args) -> int:
    from pathlib import Path

    from imagenet_ddp.export import check_export_target, export_onnx
    from imagenet_ddp.inference import Classifier
    from imagenet_ddp.shards import file_sha256

    check_export_target(args.export, args.checkpoint, args.force)
    clf = Classifier.from_checkpoint(args.checkpoint, device="cpu", precision="fp32", ema=args.ema)
    source = {"checkpoint": args.checkpoint, "weights": "ema" if args.ema else "model"}
    meta = export_onnx(clf, args.export, {**source, "sha256": file_sha256(Path(args.checkpoint))})
    print(
        f"wrote {args.export}: {meta['architecture']['name']}, {len(meta['classes'])} classes, input uint8 "
        f"[N, 3, {clf.crop}, {clf.crop}] after resize {clf.resize} + centre crop; names in {', '.join(meta['names'])}"
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.export:
            return export(args)
        if args.evaluate:
            return evaluate(args)
        clf = load_classifier(args)
        clf.class_info(args.lang)  # an unknown language is an error before any work
        if args.serve:
            from imagenet_ddp.serve import serve

            max_bytes = int(args.max_upload_mb * 1e6)
            serve(
                clf,
                host=args.host,
                port=args.port,
                lang=args.lang,
                topk=args.topk,
                max_upload_bytes=max_bytes,
                max_pixels=int(args.max_megapixels * 1e6),
                max_concurrent=args.max_concurrent,
            )
            return 0
        return classify(clf, args)
    except UserError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug or an environment problem: the traceback follows this line
        mode = (
            "exporting"
            if args.export
            else "evaluating"
            if args.evaluate
            else "serving"
            if args.serve
            else "classifying"
        )
        source = args.checkpoint or args.model
        print(f"predict.py: unexpected error while {mode} with {source} (traceback below)", file=sys.stderr)
        raise
    except BrokenPipeError:  # `predict.py ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
