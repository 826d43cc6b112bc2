#!/usr/bin/env python3
"""Train an image classifier on tar shards with DistributedDataParallel.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        train_ddp.py --config configs/nvidia_resnet50.yaml run.dir=runs/r50
    python train_ddp.py --config configs/demo.yaml train.epochs=1        # one process
    srun python train_ddp.py --config ...                                # SLURM variables only

Overrides are `section.key=value` (see imagenet_ddp/config.py). Running the same command again in
the same run.dir continues from its last.pt. SIGTERM or SIGUSR1 (SLURM before a time limit or
preemption) stops all ranks after the same step, saves last.pt and exits with status 75.
Exit status: 0 done, 75 stopped to be requeued, 2 bad config or data, 1 anything else.
"""

from __future__ import annotations

import argparse
import signal
import sys

from imagenet_ddp.errors import ArgumentParser, UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def error_line(line: str) -> None:
    """One write per line: stderr writes through, and print's separate newline let the lines of
    two ranks sharing a pipe run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def parse_args(argv):
    p = ArgumentParser(
        prog="train_ddp.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key, with its type, default and meaning: docs/config.md",
    )
    p.add_argument("--config", help="recipe YAML, e.g. configs/demo.yaml (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=10")
    p.add_argument("--print-config", action="store_true", help="print the checked config and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    # SLURM may signal before the stop handler exists (importing torch takes seconds): remember the
    # signal instead of dying of it, and stop at the first step boundary.
    early: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: early.append(signum)) for sig in STOP_SIGNALS}
    try:
        return _main(argv, early)
    finally:  # called in-process (tests, notebooks): the caller's handlers come back
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv, early: list[int]) -> int:
    args = parse_args(argv)
    prefix = "train_ddp.py: error:"
    try:
        from imagenet_ddp.config import dump_yaml, load_config, validate

        cfg = validate(load_config(args.config, args.overrides))
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from imagenet_ddp.dist import StopSignal, collective_failure, distributed
        from imagenet_ddp.runlock import hold_run_dir

        stop = StopSignal().install()  # before any worker process or thread starts
        stop.received = early[0] if early else None
        try:
            with distributed(cfg.run.timeout_s) as env:
                prefix = f"train_ddp.py: error on rank {env.rank}:" if env.world_size > 1 else prefix
                try:
                    with hold_run_dir(cfg.run.dir, env.is_main):
                        from imagenet_ddp.run import train  # the run's life: set-up, epochs, saving

                        return train(cfg, env, stop)
                except Exception as e:
                    message = collective_failure(e, env, cfg.run.timeout_s)
                    if message is None:
                        raise
                    error_line(f"{prefix} {message}")
                    return 1
        finally:
            stop.uninstall()
    except UserError as e:
        error_line(f"{prefix} {e}")
        return 2
    except KeyboardInterrupt:
        error_line("train_ddp.py: interrupted; run the same command again to resume")
        return 130
    except Exception:  # a bug or an environment problem: the traceback follows this line
        where = f"training in run.dir {cfg.run.dir}" if "cfg" in locals() else "reading the config"
        error_line(f"{prefix} unexpected error while {where} (traceback below)")
        raise


if __name__ == "__main__":
    sys.exit(main())
