"""What a run reports: a console progress bar, metrics.jsonl, Weights & Biases. Rank 0 only.

    torchrun --standalone --nproc_per_node=2 train_ddp.py --config configs/demo.yaml   # prints, logs
    wandb sync runs/demo/wandb/offline-run-*                                          # upload later

`make_tracker` gives rank 0 a Tracker and every other rank a NullTracker with the same methods doing
nothing, so the training loop never asks which rank it is on.

A Tracker hands each call to the part that does that job: `Console` (progress bar, step and epoch
lines), `RunFiles` (metrics.jsonl, status.json, config.yaml, config-changes.jsonl in run.dir) and
`WandbRun` (the W&B run, if any).

W&B never hangs and never stops training: without an API key it logs offline at once; with a key but
no network the online init gives up after `logging.wandb_init_timeout` s and it logs offline; if even
that fails, training goes on without W&B. Each case is said in one line. A resumed run continues the
same W&B run (its id is stored in the checkpoint).

Arranged for comparing runs: the W&B run is named after the recipe and the overrides that change it
(config.run_label), grouped by recipe, its config is the flattened config plus what the run found
(`env.*`, `data.*`: device, git commit, the dataset manifest's digest and sizes); epoch metrics have
the epoch, images seen and training hours as x-axes, and the summary holds the best and last val
top-1/top-5 (EMA too). run.dir/status.json says whether the run is running, finished, stopped for
a requeue or crashed (python -m imagenet_ddp.runs reads it).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

from imagenet_ddp.config import Config, flat, recipe_name, run_label

# W&B summary keys: the best and the last value of each, over the epochs.
SUMMARY_METRICS = ("val_top1", "val_top5", "val_top1_ema", "val_top5_ema")


class NullTracker:
    """A tracker for ranks other than 0: every method does nothing."""

    wandb_run_id: str | None = None

    def info(self, message: str) -> None:
        pass

    def write_config(self, text: str, keep: bool = False) -> None:
        pass

    def record_changes(self, changes: dict, step: int, epoch: int) -> None:
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


class Console:
    """The console: a progress bar on a terminal, a line every log_every steps elsewhere, one line
    per epoch."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.bar = None
        self.tty = sys.stdout.isatty()
        self.epoch = 0

    def info(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

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
        self.epoch = epoch

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

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_epoch(self, metrics: dict) -> None:
        val = (
            f" | val top-1 {metrics['val_top1']:.2%} top-5 {metrics['val_top5']:.2%}"
            if "val_top1" in metrics
            else ""
        )
        if "val_real_top1" in metrics:
            val += f" ReaL {metrics['val_real_top1']:.2%}"
        # data.extra_eval's sets: their top-1 (every key in metrics.jsonl and W&B)
        val += "".join(
            f" | {key[5:-5]} {value:.2%}"
            for key, value in metrics.items()
            if key.startswith("eval/") and key.endswith("/top1")
        )
        self.info(
            f"epoch {metrics['epoch']}/{self.epochs} step {metrics['step']}: train loss {metrics['train_loss']:.4f} "
            f"top-1 {metrics['train_top1']:.2%}{val} | {metrics['images_per_sec']:.0f} img/s, "
            f"{metrics['epoch_seconds']:.1f} s"
        )


class RunFiles:
    """What the run writes in run.dir: metrics.jsonl, status.json, config.yaml, config-changes.jsonl."""

    def __init__(self, cfg: Config, resume_step: int | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.run.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._trim_metrics(resume_step or 0)
        done = self.records()
        self._last = done[-1] if done else {"epoch": 0, "step": 0, "images_seen": 0}  # metrics.jsonl's end
        # Wall-clock hours of all sessions so far (validation, saves and the part of an epoch a stop
        # cut short included; waits in a queue not): kept in status.json across requeues.
        self.hours, self._mark = self._previous_hours(), time.time()
        self.epochs = cfg.train.epochs
        self.step = resume_step or 0

    def records(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def _previous_hours(self) -> float:
        try:
            return float(json.loads((self.dir / "status.json").read_text())["hours"])
        except (OSError, ValueError, KeyError, TypeError):
            return self._last.get("hours", 0.0)

    def _clock(self) -> float:
        now = time.time()
        self.hours, self._mark = self.hours + (now - self._mark) / 3600, now
        return self.hours

    def status(self, state: str) -> None:
        """run.dir/status.json: running, finished, stopped (for a requeue) or crashed, and where."""
        status = {
            "state": state,
            "epoch": self._last["epoch"],
            "epochs": self.epochs,
            "step": self.step,
            "hours": round(self._clock(), 6),
            "updated": round(time.time(), 3),
            "pid": os.getpid(),
        }
        tmp = self.dir / ".status.json.tmp"
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, self.dir / "status.json")

    def _trim_metrics(self, resume_step: int) -> None:
        """Keep only the lines up to the checkpoint we start from: a restart rewrites what came after."""
        if not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        kept = [
            json.dumps(r) for r in read_metrics(self.metrics_path) if r.get("step", math.inf) <= resume_step
        ]
        if len(kept) != len(lines):
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.metrics_path)

    def write_config(self, text: str, keep: bool = False) -> None:
        """The resolved config as run.dir/config.yaml, atomically; `keep`: an existing one stays (a
        resumed run keeps the record of how it started; changes go to config-changes.jsonl)."""
        if keep and (self.dir / "config.yaml").exists():
            return
        tmp = self.dir / ".config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / "config.yaml")

    def record_changes(self, changes: dict, step: int, epoch: int) -> None:
        """Append one line to run.dir/config-changes.jsonl: the settings a resume changed, and when."""
        line = {
            "time": round(time.time(), 3),
            "step": step,
            "epoch": epoch,
            "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()},
        }
        with open(self.dir / "config-changes.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def heartbeat(self, step: int) -> None:
        self.step = step
        self.status("running")  # `runs compare` tells a live run from a killed one

    def log_epoch(self, metrics: dict) -> dict:
        """Append one line to metrics.jsonl (`epoch` counts completed epochs from 1); returns it."""
        before = self._last
        # Per step at this session's global batch: a run resumed on another world size counts right.
        seen = (
            before.get("images_seen", 0)
            + (metrics["step"] - before["step"]) * self.cfg.derived.global_batch_size
        )
        record = {
            **metrics,
            "images_seen": seen,
            "hours": round(self._clock(), 6),
            "world_size": self.cfg.derived.world_size,
            "time": round(time.time(), 3),
        }
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._last, self.step = record, metrics["step"]
        self.status("running")
        return record


class WandbRun:
    """The W&B run, or nothing when W&B is off or could not start: every method is then a no-op."""

    def __init__(self, cfg: Config, run_id: str | None, say, facts: dict):
        self.cfg, self.say = cfg, say
        self.run = _init_wandb(cfg, run_id, say, facts) if cfg.logging.wandb else None

    @property
    def id(self) -> str | None:
        return self.run.id if self.run else None

    def log_step(self, step: int, metrics: dict) -> None:
        if self.run:
            self.run.log(metrics, step=step)

    def log_epoch(self, record: dict) -> None:
        if self.run:
            logged = {k: v for k, v in record.items() if k not in ("step", "time")}
            self.run.log({f"epoch/{k}": v for k, v in logged.items()}, step=record["step"])

    def close(self, metrics_path: Path, preempted: bool = False, failed: bool = False) -> None:
        """The summary (best and last of SUMMARY_METRICS from metrics_path), the best checkpoint, then
        finish; each step that fails says why and the next still runs."""
        if not self.run:
            return
        run, self.run = self.run, None
        # W&B never stops the run, nor turns a requeue into a crash: each step says why it failed.
        try:
            records = read_metrics(metrics_path)
            for key in SUMMARY_METRICS:
                values = [r[key] for r in records if key in r]
                if values:
                    run.summary[f"best/{key}"], run.summary[f"final/{key}"] = max(values), values[-1]
            best = Path(self.cfg.run.dir) / "best.pt"
            if self.cfg.logging.wandb_checkpoints and not failed and best.exists():
                _log_checkpoint(run, best)
            if preempted:
                run.mark_preempting()
        except Exception as e:
            self.say(f"W&B: could not record the run's summary or checkpoint ({type(e).__name__}: {e})")
        offline = run.settings.mode == "offline"
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:
            self.say(f"W&B: could not finish the run ({type(e).__name__}: {e})")
        if offline:
            self.say(
                f"W&B: offline run in {Path(run.dir).parent}; upload with `wandb sync {Path(run.dir).parent}`"
            )


class Tracker(NullTracker):
    """Rank 0's tracker: each call goes to the console, the run's files and W&B, in that order."""

    def __init__(
        self,
        cfg: Config,
        resume_step: int | None = None,
        wandb_run_id: str | None = None,
        facts: dict | None = None,
    ):
        self.cfg = cfg
        self.files = RunFiles(cfg, resume_step)
        self.console = Console(cfg.train.epochs)
        self.files.status("running")
        self.wandb = WandbRun(cfg, wandb_run_id, self.info, facts or {})
        self.wandb_run_id = self.wandb.id or wandb_run_id

    def info(self, message: str) -> None:
        self.console.info(message)

    def write_config(self, text: str, keep: bool = False) -> None:
        self.files.write_config(text, keep)

    def record_changes(self, changes: dict, step: int, epoch: int) -> None:
        self.files.record_changes(changes, step, epoch)

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        self.console.start_epoch(epoch, steps, done)

    def advance(self) -> None:
        self.console.advance()

    def log_step(self, step: int, metrics: dict) -> None:
        self.console.log_step(step, metrics)
        self.wandb.log_step(step, metrics)
        self.files.heartbeat(step)

    def end_epoch(self) -> None:
        self.console.end_epoch()

    def log_epoch(self, metrics: dict) -> None:
        """One line of metrics.jsonl (`epoch` counts completed epochs from 1), the console, W&B."""
        record = self.files.log_epoch(metrics)
        self.console.log_epoch(metrics)
        self.wandb.log_epoch(record)

    def close(self, preempted: bool = False, failed: bool = False) -> None:
        self.console.end_epoch()
        self.files.status("crashed" if failed else "stopped" if preempted else "finished")
        self.wandb.close(self.files.metrics_path, preempted, failed)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line a kill cut short (or damaged) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def make_tracker(
    cfg: Config,
    is_main: bool,
    resume_step: int | None = None,
    wandb_run_id: str | None = None,
    facts: dict | None = None,
) -> NullTracker:
    """`facts`: what the run found, for W&B's config (run_facts)."""
    return Tracker(cfg, resume_step, wandb_run_id, facts) if is_main else NullTracker()


def run_facts(device, train_loader, val_loader, data_root: str) -> dict:
    """What the config does not say and a comparison needs: the device, the code, the data."""
    import subprocess

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = (
            [
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ]
            if cpuinfo.exists()
            else []
        )
        name = models[0] if models else "cpu"
    try:
        top = Path(__file__).resolve().parent.parent
        git = subprocess.run(
            ["git", "-C", str(top), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = git.stdout.strip() if git.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    manifest = Path(data_root) / "train" / "manifest.json"
    from imagenet_ddp.shards import file_sha256

    return {
        "env.device": name,
        "env.git_commit": commit,
        "data.manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
        "data.train_samples": train_loader.num_samples,
        "data.val_samples": val_loader.num_samples,
        "data.num_classes": train_loader.num_classes,
    }


def _log_checkpoint(run, path: Path) -> None:
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"file": path.name})
    artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=["best"])


def _define_metrics(run, say):
    """Epoch metrics against the epoch by default; images seen and hours are there to pick as x-axes.
    Returns the run: a failure here only costs the axes."""
    try:
        for axis in ("epoch/epoch", "epoch/images_seen", "epoch/hours"):
            run.define_metric(axis)
        run.define_metric("epoch/*", step_metric="epoch/epoch")
        for key in SUMMARY_METRICS:
            run.define_metric(f"epoch/{key}", step_metric="epoch/epoch", summary="max,last")
    except Exception as e:
        say(f"W&B: could not define the epoch axes ({type(e).__name__}: {e})")
    return run


def _init_wandb(cfg: Config, run_id: str | None, say, facts: dict):
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
        "group": lg.wandb_group or recipe_name(cfg.derived.recipe),
        "job_type": "train",
        "tags": [*lg.wandb_tags, cfg.model.name] if cfg.model.name not in lg.wandb_tags else lg.wandb_tags,
        "name": cfg.run.name or run_label(cfg),
        "id": run_id or secrets.token_hex(4),  # stored in checkpoints: a resumed run continues it
        "resume": "allow",
        "dir": str(Path(cfg.run.dir).resolve()),
        "config": {**flat(cfg), **facts},
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
        run = wandb.init(mode=mode, settings=settings, **kwargs)
        return _define_metrics(run, say)
    except (
        Exception
    ) as e:  # wandb raises its own errors, TimeoutError, ConnectionError... any means "not now"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if mode == "offline":
        say(f"W&B: offline init failed ({reason}); logging to metrics.jsonl only")
        return None
    say(f"W&B: online init failed ({reason}); logging offline; upload later with `wandb sync`")
    try:
        run = wandb.init(mode="offline", settings=settings, **kwargs)
        return _define_metrics(run, say)
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
