"""The life of one training run: set up, check a resume, run the epochs, save, report.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml

train_ddp.py parses the command line, installs the stop signal, sets up the ranks and turns errors
into exit statuses; it calls `train(cfg, env, stop)`, which returns the exit status of the run.
"""

from __future__ import annotations

import math
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagenet_ddp import checkpoint as ck
from imagenet_ddp.config import advice, dump_yaml, loader_config, resolve, run_changes, to_dict
from imagenet_ddp.data import build_loader
from imagenet_ddp.data.stage import stage_node
from imagenet_ddp.dist import EXIT_REQUEUE, all_gather_object, barrier, nodes, post_and_wait
from imagenet_ddp.engine import evaluate, train_one_epoch
from imagenet_ddp.errors import UserError
from imagenet_ddp.evaluate import evaluate_splits, find_splits, metric_keys, plan_split, real_of
from imagenet_ddp.finetune import init_from
from imagenet_ddp.models import architecture, build_model, model_architecture
from imagenet_ddp.state import make_state, seed_everything
from imagenet_ddp.tracking import make_tracker, run_facts


def train(cfg, env, stop) -> int:
    """Train (or continue) the run `cfg` describes; return 0, EXIT_REQUEUE or 1 (not saved)."""
    ckpts = ck.CheckpointDir(cfg.run.dir, cfg.run.keep_last, writer=env.is_main)
    found = latest_checkpoint(cfg, ckpts)
    run = set_up(cfg, env, found)
    cfg, state, train_loader = run.cfg, run.state, run.train_loader
    tracker = start_reporting(run, found)
    saver = Saver(run, ckpts, tracker, metrics=run.ckpt.get("metrics") if run.ckpt else None)
    start = time.time()
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            state.epoch = epoch
            train_loader.set_epoch(epoch)
            result = train_one_epoch(state, train_loader, cfg, tracker, stop, saver.save)
            if result.pop("stopped"):
                saver.save()
                return requeue(tracker, f"stopped by signal at step {state.step}", ckpts)
            val = evaluate(
                {"": state.model, **({"ema": state.ema.module} if state.ema else {})},
                run.val_loader,
                state,
                real=run.val_real,
            )
            val.update(extra_evaluation(run, epoch))
            saver.metrics, is_best = end_epoch(state, epoch, result, val)
            tracker.log_epoch(saver.metrics)
            saver.save(is_best)
            if stop.requested(env.device) and epoch + 1 < cfg.train.epochs:
                return requeue(tracker, f"stopped by signal after epoch {epoch + 1}", ckpts)
    except BaseException:
        tracker.close(failed=True)
        raise
    finally:
        train_loader.close()
        run.val_loader.close()
    return finish(run, tracker, saver, start)


# Copying a node's shards may take far longer than any collective: a crashed copier ends the job anyway.
STAGE_TIMEOUT_S = 6 * 3600


@dataclass
class Run:
    """What the set-up made: the resolved config, the loaders, the model's state and what it resumes."""

    cfg: Any
    env: Any
    data: Any
    train_loader: Any
    val_loader: Any
    arch: dict
    state: Any
    origin: dict | None
    ckpt: dict | None
    changes: dict
    val_real: dict | None = None  # the val split's ReaL labels, when it has them (evaluate.real_of)


def latest_checkpoint(cfg, ckpts) -> tuple[dict, Any] | None:
    """(checkpoint, its path) to resume from; a run folder already in use without run.resume is refused."""
    found = ck.CheckpointDir(cfg.run.dir).load_latest() if cfg.run.resume else None
    if not cfg.run.resume and ckpts.last.exists():
        raise UserError(
            f"{cfg.run.dir} already holds a run (last.pt): choose another run.dir or set run.resume=true"
        )
    return found


def set_up(cfg, env, found) -> Run:
    seed_everything(cfg.train.seed, env.rank, cfg.train.deterministic)
    data = loader_config(cfg)
    if data.stage_dir and data.backend != "synthetic":
        stage_shards(data, env, cfg.train.seed, range(found[0]["epoch"] if found else 0, cfg.train.epochs))
    where = {"rank": env.rank, "world_size": env.world_size, "device": env.device, "seed": cfg.train.seed}
    train_loader = build_loader(data, "train", **where)
    val_loader = build_loader(data, "val", train=False, **where)
    extra_eval_splits(data, train_loader.classes)  # a wrong folder is an error before training
    cfg = resolve(cfg, env.world_size, env.device.type, len(train_loader))
    m = cfg.model
    arch = model_architecture(m, train_loader.num_classes, cfg.data.image_size, cfg.data.eval_size)
    model, ckpt = build_model(**arch), found[0] if found else None
    changes: dict = {}
    # Weights to start from: before anything is written (a bad source is a one-line error), and
    # not when resuming (the checkpoint has the weights, and records where they came from).
    origin = init_from(model, m.name, m.init_from, train_loader.classes) if m.init_from and not ckpt else None
    origin = ckpt.get("init_from") if ckpt else origin
    state = make_state(model, cfg, env)
    if ckpt is not None:
        changes = check_resume(cfg, arch, *found)
        state.load_checkpoint(ckpt, env.rank, env.world_size, train_loader)
    val_real = real_of(Path(data.root) / "val", env.rank, env.world_size)
    return Run(cfg, env, data, train_loader, val_loader, arch, state, origin, ckpt, changes, val_real)


def stage_shards(data, env, seed: int, epochs: range) -> None:
    """data.stage_dir: the first process of each node copies the shards its node's ranks read in
    `epochs` (data/stage.py); every process waits for every node, as long as copying takes."""
    groups = nodes()
    mine = next(g for g in groups if env.rank in g)
    result = None
    if env.rank == mine[0]:
        try:
            report = stage_node(data, mine, env.world_size, seed, epochs)
            result = "ok"
        except BaseException as e:
            post_and_wait("staged", f"on rank {env.rank}: {e}", [], STAGE_TIMEOUT_S)
            raise
        print(report.line(socket.gethostname()), flush=True)
        if report.warning:
            print(report.warning, file=sys.stderr, flush=True)
    failed = [
        r for r in post_and_wait("staged", result, [g[0] for g in groups], STAGE_TIMEOUT_S) if r != "ok"
    ]
    if failed:
        raise UserError(f"staging the shards failed {failed[0]}")


def extra_eval_splits(data, classes: list[str]) -> list:
    """data.extra_eval's split folders, each checked against the model's classes (UserError)."""
    splits = find_splits(data.extra_eval) if data.extra_eval else []
    for split in splits:
        plan_split(split, classes)
    return splits


def extra_evaluation(run: Run, epoch: int) -> dict:
    """data.extra_eval's metrics (evaluate.metric_keys) after the last epoch and every
    data.extra_eval_every epochs; nothing at the other epochs."""
    data, done, every = run.data, epoch + 1, run.data.extra_eval_every
    if not data.extra_eval or not (done == run.cfg.train.epochs or (every and done % every == 0)):
        return {}
    classes, env = run.train_loader.classes, run.env
    splits = extra_eval_splits(data, classes)
    results = evaluate_splits(run.state.model, classes, splits, data, run.state, env.rank, env.world_size)
    return metric_keys(results)


def check_resume(cfg, arch, ckpt, path) -> dict:
    """The settings changed since `ckpt` was saved; a change that cannot carry over is refused."""
    if architecture(**ckpt["architecture"]) != arch:  # an older checkpoint lacks the later keys
        raise UserError(f"{path} holds a {ckpt['architecture']} model, not {arch}: choose another run.dir")
    saved_optimizer = ckpt["config"]["optim"].get("name", "sgd")  # runs before optim.name: SGD
    if saved_optimizer != cfg.optim.name:
        raise UserError(
            f"{path} was trained with optim.name={saved_optimizer}, not {cfg.optim.name}: its "
            "optimizer state does not carry over; keep the optimizer or choose another run.dir"
        )
    changes = run_changes(ckpt["config"], cfg)
    # More epochs than done is training longer (recorded); fewer would disown epochs already run.
    refused = {k: v for k, v in changes.items() if k != "train.epochs" or v[1] < ckpt["epoch"]}
    if refused and not cfg.run.allow_changes:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise UserError(
            f"{path} was trained with other settings ({listed}): choose another run.dir, or add "
            "run.allow_changes=true to continue with them (recorded in config-changes.jsonl)"
        )
    return changes


def start_reporting(run: Run, found):
    """The tracker, with the config written and the run described on the console."""
    cfg, env, ckpt = run.cfg, run.env, run.ckpt
    facts = run_facts(env.device, run.train_loader, run.val_loader, run.data.root) if env.is_main else None
    tracker = make_tracker(
        cfg, env.is_main, run.state.step, ckpt.get("wandb_run_id") if ckpt else None, facts
    )
    tracker.write_config(dump_yaml(cfg), keep=ckpt is not None)
    if ckpt is not None and run.changes:
        tracker.record_changes(
            run_changes(ckpt["config"], cfg, derived=True), run.state.step, run.state.epoch
        )
        tracker.info(f"continuing with changed settings ({', '.join(run.changes)}): see config-changes.jsonl")
    for line in describe(run, found):
        tracker.info(line)
    return tracker


def describe(run: Run, found):
    """The lines that open a run's console: what is trained on what, how, and from where."""
    cfg, env, d, m = run.cfg, run.env, run.cfg.derived, run.cfg.model
    train_loader, val_loader, ckpt = run.train_loader, run.val_loader, run.ckpt
    yield (
        f"{m.name} on {run.data.root} ({run.data.backend}): {train_loader.num_classes} classes, "
        f"{train_loader.num_samples} train / {val_loader.num_samples} val images; {env.world_size} x "
        f"{cfg.train.batch_size}{f' x {cfg.train.grad_accum}' if cfg.train.grad_accum > 1 else ''} = "
        f"{d.global_batch_size} per step, lr {d.lr:.4g}, {d.precision}, {d.steps_per_epoch} steps x "
        f"{cfg.train.epochs} epochs, {env.device.type}; run folder {cfg.run.dir}"
    )
    if run.origin:
        yield f"weights from {run.origin['source']}: classifier head {run.origin['head']}"
    if cfg.train.ema_decay:
        half_life = math.log(0.5) / math.log(d.ema_decay) / d.steps_per_epoch
        yield f"EMA decay {d.ema_decay:.6g} per step: half-life {half_life:.3g} epochs"
    yield from advice(cfg)
    if ckpt is not None:
        yield f"resuming from {found[1]}: {ck.describe(ckpt)}"
        if len(ckpt["ranks"]) != env.world_size:
            yield f"warning: saved by {len(ckpt['ranks'])} ranks, now {env.world_size}: epoch restarts"


class Saver:
    """Saves last.pt (and best.pt) from every rank's state; rank 0 writes, all ranks wait for it."""

    def __init__(self, run: Run, ckpts, tracker, metrics: dict | None):
        self.run, self.ckpts, self.tracker, self.metrics = run, ckpts, tracker, metrics
        self.unsaved: list[str] = []  # why the newest save failed, until one succeeds (rank 0 only)
        cfg, loader, d = run.cfg, run.train_loader, run.cfg.derived
        info = ck.inference_info(
            run.arch,
            loader.classes,
            loader.class_names,
            d.eval_resize,
            run.data.eval_size,
            cfg.train.eval_flip,
            run.data.interpolation,
        )
        self.static = {
            **info,
            "config": to_dict(cfg),
            "world_size": run.env.world_size,
            "init_from": run.origin,
        }

    def save(self, is_best: bool = False) -> None:
        state, ckpts, tracker = self.run.state, self.ckpts, self.tracker
        # Every rank's RNG state and loader position, so a resumed rank continues its own streams,
        # and every rank's weights digest: replicas that drifted apart would be a silent bug.
        # The host too: the run's record of where each rank ran (a multi-node job's placement).
        mine = {**state.rank_state(), "loader": self.run.train_loader.state_dict()}
        mine["host"] = socket.gethostname()
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
        ranks = [r for r, _, _ in per_rank]
        payload = {**self.static, **state.state_dict(), "ranks": ranks, "metrics": self.metrics}
        payload["weights_sha256"] = digests
        try:
            ckpts.save({**payload, "wandb_run_id": tracker.wandb_run_id}, is_best)
            self.unsaved.clear()
        except ck.CheckpointError as e:  # e.g. disk full: the previous checkpoint is intact, go on
            tracker.info(f"warning: {e}; the previous checkpoint is kept")
            self.unsaved[:] = [str(e)]
        # No rank leaves before rank 0 has written: a rank exiting for requeue makes torchrun (or
        # srun --kill-on-bad-exit) kill the others, rank 0 mid-save included.
        barrier()


def end_epoch(state, epoch: int, result: dict, val: dict) -> tuple[dict, bool]:
    """The epoch's metrics, and whether it is the best so far; the state moves to the next epoch."""
    state.epoch, state.batch_in_epoch = epoch + 1, 0
    is_best = val["val_top1"] > state.best_val_top1
    state.best_val_top1 = max(state.best_val_top1, val["val_top1"])
    return {"epoch": epoch + 1, "step": state.step, **result, **val}, is_best


def requeue(tracker, why: str, ckpts) -> int:
    tracker.info(f"{why}: saved {ckpts.last}; exit {EXIT_REQUEUE}")
    tracker.close(preempted=True)
    return EXIT_REQUEUE


def finish(run: Run, tracker, saver: Saver, start: float) -> int:
    """Report the run's end; 1 when the trained weights are not on disk (not a success), else 0."""
    metrics, state = saver.metrics, run.state
    final = (
        f"val top-1 {metrics['val_top1']:.2%}, top-5 {metrics['val_top5']:.2%}" if metrics else "no epoch run"
    )
    tracker.info(
        f"done: {final} (best {state.best_val_top1:.2%}) after {state.step} steps, "
        f"{time.time() - start:.0f} s this session; checkpoints in {run.cfg.run.dir}"
    )
    tracker.close()
    if saver.unsaved:
        print(f"train_ddp.py: error: the final checkpoint was not saved: {saver.unsaved[0]}", file=sys.stderr)
        return 1
    return 0
