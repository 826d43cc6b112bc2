"""A run folder belongs to one run at a time: rank 0 holds run.dir/run.lock for the run's life.

    python train_ddp.py --config configs/demo.yaml run.dir=runs/demo    # a second one: one-line error

The lock is a small JSON file (host, pid, process start, SLURM job id, start time) created with
O_EXCL; a thread touches it every HEARTBEAT_S seconds while the run lives, and it is removed on any
exit that Python sees. A lock left behind (kill -9, a node that died) is taken over with one line when
its holder is provably gone: on this host its pid no longer runs the same process; on another host
its heartbeat is older than STALE_AFTER_S. A SLURM requeue (the same SLURM_JOB_ID) is never blocked:
the job's previous incarnation is gone by definition.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from imagenet_ddp.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S  # a holder on another host that missed 4 heartbeats is gone


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it does not run: with the pid
    it names one process, not a later one that reused the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]


def _describe(holder: dict) -> str:
    started = datetime.fromtimestamp(float(holder.get("started", 0))).strftime("%Y-%m-%d %H:%M:%S")
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, started {started}"


class RunLock:
    """`with RunLock(run_dir, say=print):` holds run_dir/run.lock; UserError if another run holds it."""

    def __init__(self, run_dir: str | Path, say=print):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.say = say
        self.mine: dict | None = None
        self._created: list[Path] = []  # folders made for the lock, deepest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _me(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": round(time.time(), 3),
        }

    def _prepare_dir(self) -> None:
        try:
            if self.dir.exists() and not self.dir.is_dir():
                raise UserError(f"run.dir {self.dir} is a file, not a folder: choose another run.dir")
            if not self.dir.is_dir():  # mkdir(exist_ok) in a read-only parent says EACCES, not EEXIST
                self._created = [p for p in [self.dir, *self.dir.parents] if not p.exists()]
                self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run.dir {self.dir}: cannot create it: {e.strerror or e}") from None

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the holder is gone (its lock may be taken over), or None while it may still run."""
        me = self._me()
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
            return f"a requeue of SLURM job {me['slurm_job_id']}"
        if holder.get("host") == me["host"]:
            running = _process_start(int(holder.get("pid", -1)))
            if running is None or (running != "?" and running != holder.get("process_start", running)):
                return f"pid {holder.get('pid')} no longer runs on this host"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "its lock file is gone"
        if age > STALE_AFTER_S:
            return f"no heartbeat from host {holder.get('host')} for {age:.0f} s"
        return None

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # half-written or damaged: judged by its age below

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(
                f"run.dir {self.dir} is not writable ({e.strerror}): choose another run.dir"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return True

    def acquire(self) -> RunLock:
        self._prepare_dir()
        me = self._me()
        for _ in range(3):  # a lock that vanishes under us (its holder just ended): try again
            if self._create(me):
                break
            holder = self._read()
            if not holder:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < STALE_AFTER_S:  # being written right now, or a damaged one still young
                    raise UserError(
                        f"run.dir {self.dir} is in use: {self.path} is unreadable and {age:.0f} s old; "
                        "remove it if no run uses this folder"
                    )
                reason = f"an unreadable lock {age:.0f} s old"
            else:
                reason = self._stale_reason(holder)
                if reason is None:
                    raise UserError(
                        f"run.dir {self.dir} is in use by another run ({_describe(holder)}): wait for "
                        f"it to end, stop it, or choose another run.dir"
                    )
            tmp = self.path.with_name(f".{LOCK_NAME}.{me['pid']}.tmp")
            tmp.write_text(json.dumps(me) + "\n")
            os.replace(tmp, self.path)
            if self._read().get("pid") != me["pid"]:  # another run took it over at the same moment
                continue
            self.say(f"taking over the lock of a run that is gone ({_describe(holder)}): {reason}")
            break
        else:
            raise UserError(f"run.dir {self.dir}: could not take {self.path}; another run is starting")
        self.mine = me
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # the folder went away: the run notices where it writes
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if self.mine is not None and (holder.get("host"), holder.get("pid")) == (
            self.mine["host"],
            self.mine["pid"],
        ):
            self.path.unlink(missing_ok=True)
        # A run refused before it wrote anything leaves no trace: the folders made for the lock go.
        for folder in self._created:
            try:
                folder.rmdir()  # only while empty
            except OSError:
                break
        self._created = []
        self.mine = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, is_main: bool, say=print):
    """Rank 0 holds the run folder's lock for the block; every rank raises the same UserError if it
    cannot (so no rank waits in a collective for a rank 0 that gave up)."""
    from imagenet_ddp.dist import broadcast_object

    lock, problem = RunLock(run_dir, say) if is_main else None, None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
