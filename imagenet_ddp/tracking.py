"""What a run reports: a console progress bar, metrics.jsonl, Weights & Biases. Rank 0 only.

    torchrun --standalone --nproc_per_node=2 train_ddp.py --config configs/demo.yaml   # prints, logs
    wandb sync runs/demo/wandb/offline-run-*                                          # upload later

`make_tracker` gives rank 0 a Tracker and every other rank a NullTracker with the same methods doing
nothing, so the training loop never asks which rank it is on.

W&B never hangs and never stops training: without an API key it logs offline at once; with a key but
no network the online init gives up after `logging.wandb_init_timeout` s and it logs offline; if even
that fails, training goes on without W&B. Each case is said in one line. A resumed run continues the
same W&B run (its id is stored in the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

from imagenet_ddp.config import Config, flat


class NullTracker:
    """A tracker for ranks other than 0: every method does nothing."""

    wandb_run_id: str | None = None

    def info(self, message: str) -> None:
        pass

    def write_config(self, text: str) -> None:
        pass

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        pass

    def advance(self) -> None:
        pass

    def log_step(self, step: int, metrics: dict) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def log_epoch(self, metrics: dict) -> None:
        pass

    def close(self, preempted: bool = False, failed: bool = False) -> None:
        pass


class Tracker(NullTracker):
    def __init__(self, cfg: Config, resume_step: int | None = None, wandb_run_id: str | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.run.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._trim_metrics(resume_step or 0)
        self.bar = None
        self.tty = sys.stdout.isatty()
        self.epochs = cfg.train.epochs
        self.wandb = _init_wandb(cfg, wandb_run_id, self.info) if cfg.logging.wandb else None
        self.wandb_run_id = self.wandb.id if self.wandb else wandb_run_id

    def _trim_metrics(self, resume_step: int) -> None:
        """Keep only the lines up to the checkpoint we start from: a restart rewrites what came after."""
        if not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", math.inf) <= resume_step]
        if len(kept) != len(lines):
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.metrics_path)

    def info(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def write_config(self, text: str) -> None:
        """The resolved config as run.dir/config.yaml (replaced atomically on each start)."""
        tmp = self.dir / ".config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / "config.yaml")

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if self.tty:  # a bar redrawn in place is noise in a SLURM log file: lines at log_every there
            from tqdm import tqdm

            self.bar = tqdm(
                total=steps,
                initial=done,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="step",
                dynamic_ncols=True,
            )
        self.epoch, self.steps = epoch, steps

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log_step(self, step: int, metrics: dict) -> None:
        loss, lr, rate = metrics["train/loss"], metrics["train/lr"], metrics["train/images_per_sec"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.3g} {rate:.0f} img/s", refresh=False)
        else:
            print(
                f"epoch {self.epoch + 1}/{self.epochs} step {step}: loss {loss:.4f} lr {lr:.4g} {rate:.0f} img/s",
                flush=True,  # a SLURM log shows progress as it happens
            )
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_epoch(self, metrics: dict) -> None:
        """One line of metrics.jsonl (`epoch` counts completed epochs from 1), the console, W&B."""
        record = {**metrics, "time": round(time.time(), 3)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        val = (
            f" | val top-1 {metrics['val_top1']:.2%} top-5 {metrics['val_top5']:.2%}"
            if "val_top1" in metrics
            else ""
        )
        self.info(
            f"epoch {metrics['epoch']}/{self.epochs} step {metrics['step']}: train loss {metrics['train_loss']:.4f} "
            f"top-1 {metrics['train_top1']:.2%}{val} | {metrics['images_per_sec']:.0f} img/s, "
            f"{metrics['epoch_seconds']:.1f} s"
        )
        if self.wandb:
            self.wandb.log({f"epoch/{k}": v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def close(self, preempted: bool = False, failed: bool = False) -> None:
        self.end_epoch()
        if self.wandb:
            run, self.wandb = self.wandb, None
            if preempted:
                run.mark_preempting()
            offline = run.settings.mode == "offline"
            run.finish(exit_code=1 if failed else 0)
            if offline:
                self.info(
                    f"W&B: offline run in {Path(run.dir).parent}; upload with `wandb sync {Path(run.dir).parent}`"
                )


def make_tracker(
    cfg: Config, is_main: bool, resume_step: int | None = None, wandb_run_id: str | None = None
) -> NullTracker:
    return Tracker(cfg, resume_step, wandb_run_id) if is_main else NullTracker()


def _init_wandb(cfg: Config, run_id: str | None, say):
    """A W&B run (online, else offline), or None; never raises, never waits longer than the timeout."""
    try:
        import wandb
    except ImportError:
        say("W&B: wandb is not installed; logging to metrics.jsonl only")
        return None
    lg = cfg.logging
    mode = os.environ.get("WANDB_MODE") or lg.wandb_mode
    if mode == "disabled":
        return None
    if mode == "auto":
        # prompt=False: with no key this returns False instead of asking on a terminal forever.
        mode = "online" if wandb.login(prompt=False, verify=False) else "offline"
        if mode == "offline":
            say(
                "W&B: no API key (wandb login / WANDB_API_KEY): logging offline; upload later with `wandb sync`"
            )
    kwargs = {
        "project": lg.wandb_project,
        "entity": lg.wandb_entity,
        "group": lg.wandb_group,
        "tags": lg.wandb_tags or None,
        "name": cfg.run.name or Path(cfg.run.dir).name,
        "id": run_id or secrets.token_hex(4),  # stored in checkpoints: a resumed run continues it
        "resume": "allow",
        "dir": str(Path(cfg.run.dir).resolve()),
        "config": flat(cfg),
    }
    # quiet: wandb's banner and run summary would bury the training log; we say what matters in one line.
    settings = wandb.Settings(init_timeout=lg.wandb_init_timeout, quiet=True)
    if mode == "online" and not (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")):
        # wandb.init retries for 2-4x init_timeout when the server is unreachable; a plain connect
        # answers "no network" in at most a few seconds.
        problem = _unreachable(settings.base_url, timeout=min(5.0, lg.wandb_init_timeout))
        if problem:
            say(
                f"W&B: cannot reach {settings.base_url} ({problem}): logging offline; upload later with `wandb sync`"
            )
            mode = "offline"
    try:
        return wandb.init(mode=mode, settings=settings, **kwargs)
    except (
        Exception
    ) as e:  # wandb raises its own errors, TimeoutError, ConnectionError... any means "not now"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if mode == "offline":
        say(f"W&B: offline init failed ({reason}); logging to metrics.jsonl only")
        return None
    say(f"W&B: online init failed ({reason}); logging offline; upload later with `wandb sync`")
    try:
        return wandb.init(mode="offline", settings=settings, **kwargs)
    except Exception as e:
        say(f"W&B: offline init failed too ({type(e).__name__}); logging to metrics.jsonl only")
        return None


def _unreachable(url: str, timeout: float) -> str | None:
    """Why a TCP connection to `url`'s host fails, or None when it connects."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return str(e) or type(e).__name__
