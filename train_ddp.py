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
import math
import signal
import sys
import time

from imagenet_ddp.errors import ArgumentParser, UserError


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


def train(cfg, env, stop) -> int:
    from imagenet_ddp import checkpoint as ck
    from imagenet_ddp.config import advice, dump_yaml, loader_config, resolve, run_changes, to_dict
    from imagenet_ddp.data import build_loader
    from imagenet_ddp.dist import EXIT_REQUEUE, all_gather_object, barrier
    from imagenet_ddp.engine import evaluate, train_one_epoch
    from imagenet_ddp.finetune import init_from
    from imagenet_ddp.models import architecture, build_model
    from imagenet_ddp.state import make_state, seed_everything
    from imagenet_ddp.tracking import make_tracker, run_facts

    ckpts = ck.CheckpointDir(cfg.run.dir, cfg.run.keep_last, writer=env.is_main)
    found = ck.CheckpointDir(cfg.run.dir).load_latest() if cfg.run.resume else None
    if not cfg.run.resume and ckpts.last.exists():
        raise UserError(
            f"{cfg.run.dir} already holds a run (last.pt): choose another run.dir or set run.resume=true"
        )
    seed_everything(cfg.train.seed, env.rank, cfg.train.deterministic)
    data = loader_config(cfg)
    where = {"rank": env.rank, "world_size": env.world_size, "device": env.device, "seed": cfg.train.seed}
    train_loader = build_loader(data, "train", **where)
    val_loader = build_loader(data, "val", train=False, **where)
    cfg = resolve(cfg, env.world_size, env.device.type, len(train_loader))
    m = cfg.model
    variant = ("small_input", "zero_init_residual", "blurpool", "drop_path", "dropout")
    arch = architecture(m.name, train_loader.num_classes, **{key: getattr(m, key) for key in variant})
    model, ckpt = build_model(**arch), found[0] if found else None
    changes: dict = {}
    # Weights to start from: before anything is written (a bad source is a one-line error), and
    # not when resuming (the checkpoint has the weights, and records where they came from).
    origin = init_from(model, m.name, m.init_from, train_loader.classes) if m.init_from and not ckpt else None
    origin = ckpt.get("init_from") if ckpt else origin
    state = make_state(model, cfg, env)
    if ckpt is not None:
        if architecture(**ckpt["architecture"]) != arch:  # an older checkpoint lacks the later keys
            raise UserError(
                f"{found[1]} holds a {ckpt['architecture']} model, not {arch}: choose another run.dir"
            )
        saved_optimizer = ckpt["config"]["optim"].get("name", "sgd")  # runs before optim.name: SGD
        if saved_optimizer != cfg.optim.name:
            raise UserError(
                f"{found[1]} was trained with optim.name={saved_optimizer}, not {cfg.optim.name}: its "
                "optimizer state does not carry over; keep the optimizer or choose another run.dir"
            )
        changes = run_changes(ckpt["config"], cfg)
        # More epochs than done is training longer (recorded); fewer would disown epochs already run.
        refused = {k: v for k, v in changes.items() if k != "train.epochs" or v[1] < ckpt["epoch"]}
        if refused and not cfg.run.allow_changes:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
            raise UserError(
                f"{found[1]} was trained with other settings ({listed}): choose another run.dir, or add "
                "run.allow_changes=true to continue with them (recorded in config-changes.jsonl)"
            )
        state.load_checkpoint(ckpt, env.rank, env.world_size, train_loader)
    facts = run_facts(env.device, train_loader, val_loader, data.root) if env.is_main else None
    tracker = make_tracker(cfg, env.is_main, state.step, ckpt.get("wandb_run_id") if ckpt else None, facts)
    tracker.write_config(dump_yaml(cfg), keep=ckpt is not None)
    if ckpt is not None and changes:
        tracker.record_changes(run_changes(ckpt["config"], cfg, derived=True), state.step, state.epoch)
        tracker.info(f"continuing with changed settings ({', '.join(changes)}): see config-changes.jsonl")
    d = cfg.derived
    tracker.info(
        f"{m.name} on {data.root} ({data.backend}): {train_loader.num_classes} classes, "
        f"{train_loader.num_samples} train / {val_loader.num_samples} val images; {env.world_size} x "
        f"{cfg.train.batch_size}{f' x {cfg.train.grad_accum}' if cfg.train.grad_accum > 1 else ''} = "
        f"{d.global_batch_size} per step, lr {d.lr:.4g}, {d.precision}, {d.steps_per_epoch} steps x "
        f"{cfg.train.epochs} epochs, {env.device.type}; run folder {cfg.run.dir}"
    )
    if origin:
        tracker.info(f"weights from {origin['source']}: classifier head {origin['head']}")
    if cfg.train.ema_decay:
        half_life = math.log(0.5) / math.log(d.ema_decay) / d.steps_per_epoch
        tracker.info(f"EMA decay {d.ema_decay:.6g} per step: half-life {half_life:.3g} epochs")
    for note in advice(cfg):
        tracker.info(note)
    if ckpt is not None:
        tracker.info(f"resuming from {found[1]}: {ck.describe(ckpt)}")
        if len(ckpt["ranks"]) != env.world_size:
            tracker.info(
                f"warning: saved by {len(ckpt['ranks'])} ranks, now {env.world_size}: epoch restarts"
            )
    static = {
        **ck.inference_info(
            arch,
            train_loader.classes,
            train_loader.class_names,
            d.eval_resize,
            data.eval_size,
            cfg.train.eval_flip,
        ),
        "config": to_dict(cfg),
        "world_size": env.world_size,
        "init_from": origin,
    }
    metrics = ckpt.get("metrics") if ckpt else None
    unsaved: list[str] = []  # why the newest save failed, until one succeeds (rank 0 only)

    def save(is_best: bool = False) -> None:
        # Every rank's RNG state and loader position, so a resumed rank continues its own streams,
        # and every rank's weights digest: replicas that drifted apart would be a silent bug.
        mine = {**state.rank_state(), "loader": train_loader.state_dict()}
        weights = ck.unwrap(state.model).state_dict()
        per_rank = all_gather_object((mine, ck.weights_digest(state.model), ck.nonfinite_tensors(weights)))
        bad = next((bad for _, _, bad in per_rank if bad), None)
        if bad:  # on every rank: none waits in a collective for a save that will not come
            raise ck.NonFiniteWeightsError(
                f"{len(bad)} of {len(weights)} weight tensors hold NaN/Inf at step {state.step} (first: "
                f"{bad[0]}): not saved; {ckpts.last.name} and {ckpts.best.name} keep the last finite ones. "
                "Lower optim.lr, set train.grad_clip, or use bf16/fp32"
            )
        digests = [digest for _, digest, _ in per_rank]
        if len(set(digests)) > 1:
            tracker.info(f"warning: weights differ between ranks at step {state.step}: {digests}")
        payload = {**static, **state.state_dict(), "ranks": [r for r, _, _ in per_rank], "metrics": metrics}
        payload["weights_sha256"] = digests
        try:
            ckpts.save({**payload, "wandb_run_id": tracker.wandb_run_id}, is_best)
            unsaved.clear()
        except ck.CheckpointError as e:  # e.g. disk full: the previous checkpoint is intact, go on
            tracker.info(f"warning: {e}; the previous checkpoint is kept")
            unsaved[:] = [str(e)]
        # No rank leaves before rank 0 has written: a rank exiting for requeue makes torchrun (or
        # srun --kill-on-bad-exit) kill the others, rank 0 mid-save included.
        barrier()

    start = time.time()
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            state.epoch = epoch
            train_loader.set_epoch(epoch)
            result = train_one_epoch(state, train_loader, cfg, tracker, stop, save)
            if result.pop("stopped"):
                save()
                tracker.info(
                    f"stopped by signal at step {state.step}: saved {ckpts.last}; exit {EXIT_REQUEUE}"
                )
                tracker.close(preempted=True)
                return EXIT_REQUEUE
            val = evaluate(
                {"": state.model, **({"ema": state.ema.module} if state.ema else {})}, val_loader, state
            )
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            is_best = val["val_top1"] > state.best_val_top1
            state.best_val_top1 = max(state.best_val_top1, val["val_top1"])
            metrics = {"epoch": epoch + 1, "step": state.step, **result, **val}
            tracker.log_epoch(metrics)
            save(is_best)
            if stop.requested(env.device) and epoch + 1 < cfg.train.epochs:
                tracker.info(
                    f"stopped by signal after epoch {epoch + 1}: saved {ckpts.last}; exit {EXIT_REQUEUE}"
                )
                tracker.close(preempted=True)
                return EXIT_REQUEUE
    except BaseException:
        tracker.close(failed=True)
        raise
    finally:
        train_loader.close()
        val_loader.close()
    final = (
        f"val top-1 {metrics['val_top1']:.2%}, top-5 {metrics['val_top5']:.2%}" if metrics else "no epoch run"
    )
    tracker.info(
        f"done: {final} (best {state.best_val_top1:.2%}) after {state.step} steps, "
        f"{time.time() - start:.0f} s this session; checkpoints in {cfg.run.dir}"
    )
    tracker.close()
    if unsaved:  # the trained weights are not on disk: not a success
        print(f"train_ddp.py: error: the final checkpoint was not saved: {unsaved[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    # SLURM may signal before the stop handler exists (importing torch takes seconds): remember the
    # signal instead of dying of it, and stop at the first step boundary.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: early.append(signum))
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
                        return train(cfg, env, stop)
                except Exception as e:
                    message = collective_failure(e, env, cfg.run.timeout_s)
                    if message is None:
                        raise
                    print(f"{prefix} {message}", file=sys.stderr, flush=True)
                    return 1
        finally:
            stop.uninstall()
    except UserError as e:
        print(f"{prefix} {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("train_ddp.py: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug or an environment problem: the traceback follows this line
        where = f"training in run.dir {cfg.run.dir}" if "cfg" in locals() else "reading the config"
        print(f"{prefix} unexpected error while {where} (traceback below)", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
