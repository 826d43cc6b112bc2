"""A private SLURM cluster for tests: its own munged, slurmctld and slurmd(s), all in a temp dir.

    from tests.slurm_cluster import SlurmCluster
    with SlurmCluster.start(root) as cluster:          # < 1 s; needs root and `.ci/slurm.sh install`
        job, _ = cluster.sbatch("--output=out.txt", "slurm/train.sbatch", "configs/demo.yaml", cwd=repo)
        cluster.wait_job(job)["JobState"]              # COMPLETED

    with SlurmCluster.start(root, nodes=2) as cluster:  # two nodes, each a host of tests/netns.py
        cluster.nodes[1].name, cluster.nodes[1].address  # node2, 10.X.Y.3 (NodeAddr; its hostname)
        cluster.nodes[1].scratch                        # its node-local folder, seen from this machine
        cluster.local_scratch                           # the same folders, as jobs see them (one path)
        cluster.on_node("node2", ["hostname"])          # a command run on node2 (namespace + hostname)

One node: slurmd runs on this machine, as `hostname`, at 127.0.0.1. Several nodes: node1, node2, ...
each a slurmd in its own network namespace with its own address, hostname, spool and node-local
folder (bind-mounted at `local_scratch`, a path every node has, like a node's local disk), joined to
slurmctld on this machine by a bridge (tests/netns.py); torchrun's rendezvous and gloo cross it. The
repository and run folders stay on the shared filesystem, as on a cluster. Fixtures: `slurm` in
tests/test_slurm.py (one node), `two_node_cluster` in tests/conftest.py (two nodes, shared by the
session).

`root` must be reachable by the `munge` user (every parent folder o+x): a tempfile.mkdtemp() in /tmp
is, pytest's tmp_path (/tmp/pytest-of-root, mode 700) is not.

Nothing is shared with a system SLURM or munge: its own munge key and socket, free TCP ports, its own
slurm.conf, state, spool and logs. Every command goes to it through `cluster.env` (SLURM_CONF), which
jobs inherit, so `scontrol` inside a job talks to this cluster too. The daemons run in the foreground
as children of the test process, with a parent-death signal, and are stopped by PID; jobs still running
at the end are cancelled first, then the namespaces are removed. Settings that make it fast (requeued
jobs restart after ~11 s, not ~150 s) are explained in ../shared/FACTS.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.netns import Network, NetworkError, NetworkUnavailable

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
# Job states after which a job does not run again (a requeued job goes back to PENDING instead).
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "munge", "unmunge")
INSTALL_HINT = (
    "install it with `.ci/slurm.sh install` (Debian/Ubuntu packages slurmctld slurmd slurm-client munge)"
)


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster (binaries missing, not root): a reason to skip."""


class SlurmError(RuntimeError):
    """The cluster was installed but did not start or misbehaved: always a failure."""


def missing_binaries() -> list[str]:
    missing = [name for name, path in DAEMONS.items() if not os.access(path, os.X_OK)]
    return missing + [name for name in CLIENTS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmError("no MemTotal in /proc/meminfo")


def parse_record(text: str) -> dict[str, str]:
    """`scontrol show -o` output ("Key=Value Key=Value ...") as a dict; values may contain spaces."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", text.strip()):
        out.setdefault(m.group(1), m.group(2))
    return out


@dataclass(frozen=True)
class Node:
    name: str  # NodeName, and its hostname
    address: str  # NodeAddr
    netns: str | None  # its network namespace; None: this machine's own (one-node cluster)
    scratch: Path  # its node-local folder, as seen from this machine


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 1):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.net: Network | None = None
        self.nodes: list[Node] = []
        self.node_count = nodes
        # Where every node sees its own node-local folder (several nodes: a bind mount per node).
        self.local_scratch = self.root / "local-scratch"
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.logs = self.root / "log"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds = 0.0

    # ---------------------------------------------------------------- life cycle

    @property
    def node(self) -> str:
        """The first node's name (the only one of a one-node cluster)."""
        return self.nodes[0].name

    @classmethod
    def start(cls, root: str | Path, nodes: int = 1, timeout: float = 60) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and the slurmds, wait for the nodes to be idle.

        SlurmUnavailable when this machine cannot run it; SlurmError (with the daemons' logs) when it
        should have started but did not. On any error whatever was started is stopped again."""
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"SLURM/munge binaries not found ({', '.join(missing)}); {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("a private SLURM cluster needs root (slurmd runs jobs as their user)")
        cluster = cls(root, nodes)
        t0 = time.monotonic()
        try:
            cluster._make_nodes()
            cluster._write_files()
            cluster._start_munged(timeout)
            cluster._spawn("slurmctld", [DAEMONS["slurmctld"], "-D", "-i", "-f", str(cluster.conf)])
            cluster._wait(timeout, "slurmctld to answer", lambda: cluster._ok("scontrol", "ping"))
            for node in cluster.nodes:
                slurmd = [DAEMONS["slurmd"], "-D", "-N", node.name, "-f", str(cluster.conf)]
                cluster._spawn(f"slurmd-{node.name}", slurmd, node=node)
            names = ",".join(node.name for node in cluster.nodes)
            cluster._wait(timeout, f"nodes {names} to be idle", lambda: cluster.node_states() == ["idle"])
        except BaseException:
            cluster.stop()
            raise
        cluster.start_seconds = time.monotonic() - t0
        return cluster

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel leftover jobs, stop the slurmds, slurmctld and munged by their PIDs, remove the network."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        slurmds = [name for name in self.procs if name.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._kill_leftovers()
        if self.net is not None:
            self.net.remove()
            self.net = None

    def _make_nodes(self) -> None:
        """One node: this machine. Several: node1, node2, ... each a host of its own network."""
        scratch = self.root / "nodes"
        if self.node_count == 1:
            self.nodes = [Node(self.host, "127.0.0.1", None, scratch / self.host)]
        else:
            names = [f"node{i + 1}" for i in range(self.node_count)]
            self.net = Network.create(names)
            self.nodes = [Node(h.name, h.address, h.netns, scratch / h.name) for h in self.net.hosts]
        self.local_scratch.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.scratch.mkdir(parents=True, exist_ok=True)
            (self.root / "spool" / node.name).mkdir(parents=True, exist_ok=True)

    def _write_files(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as `munge`: its folder is its own, open for clients to reach the socket, the key private.
        self.root.chmod(0o755)
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.munge_dir, key):
            shutil.chown(path, "munge", "munge")
        self.conf.write_text(self._slurm_conf())

    def _slurm_conf(self) -> str:
        r, cpus, memory = self.root, os.cpu_count() or 1, int(_mem_total_mb() * 0.8)
        # Several nodes: slurmctld listens on every address; the nodes reach it on the bridge's.
        controller = self.net.gateway if self.net else "127.0.0.1"
        nodes = "".join(
            f"NodeName={n.name} NodeAddr={n.address} CPUs={cpus} RealMemory={memory} State=UNKNOWN\n"
            for n in self.nodes
        )
        names = ",".join(n.name for n in self.nodes)
        return f"""\
# Written by tests/slurm_cluster.py: a private {len(self.nodes)}-node cluster for the tests.
ClusterName=imagenet-ddp-test
SlurmctldHost={self.host}({controller})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job can start again only after its old credential expires (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=5
StateSaveLocation={r}/state
# %n: the node's name; each slurmd its own spool, pid file and log.
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
{nodes}PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_munged(self, timeout: float) -> None:
        d = self.munge_dir
        self._spawn(
            "munged",
            [
                "setpriv",
                "--reuid=munge",
                "--regid=munge",
                "--clear-groups",
                "--pdeathsig=TERM",  # setpriv sets it after changing user, which would clear it
                DAEMONS["munged"],
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={d / 'munge.key'}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
                f"--log-file={d / 'munged.log'}",
            ],
            wrapped=True,
        )

        def works() -> bool:
            cred = subprocess.run(["munge", "-n", "-S", self.munge_socket], capture_output=True)
            return (
                cred.returncode == 0
                and subprocess.run(
                    ["unmunge", "-S", self.munge_socket], input=cred.stdout, capture_output=True
                ).returncode
                == 0
            )

        self._wait(timeout, "munged to answer", works)

    def _spawn(self, name: str, argv: list[str], wrapped: bool = False, node: Node | None = None) -> None:
        if not wrapped:
            # If the test process dies without cleaning up, the daemon gets SIGTERM instead of lingering.
            argv = ["setpriv", "--pdeathsig=TERM", *argv]
        if node is not None and node.netns:
            argv = self.on_node_argv(node.name, argv)
        with open(self.logs / f"{name}.out", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def _wait(self, timeout: float, what: str, ready) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with status {proc.returncode}\n{self.logs_text()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs_text()}")
            time.sleep(0.2)

    def _cancel_all_jobs(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%A", check=False).stdout.strip()
        ):
            time.sleep(0.5)

    def _kill_leftovers(self) -> None:
        """slurmstepd and job processes outlive slurmd by design: kill those of this cluster, found by the
        SLURM_CONF they all inherit (jobs get the submitting environment)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mine in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue

    # ---------------------------------------------------------------- commands

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess:
        """A command against this cluster; SlurmError with its output when it fails and `check`."""
        result = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(argv)} exited with {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def _ok(self, *argv: str) -> bool:
        return self.run(*argv, check=False).returncode == 0

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout.strip()

    def node_states(self) -> list[str]:
        """The distinct states of the nodes (["idle"] when all are idle)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return sorted(set(out)) if len(out) == len(self.nodes) else out

    def on_node_argv(self, name: str, argv: list[str]) -> list[str]:
        """`argv` as run on node `name` (one process: its PID is the Popen's), with its node-local folder."""
        node = next(n for n in self.nodes if n.name == name)
        if self.net is None:
            return list(argv)
        return self.net.command(name, argv, mounts={str(node.scratch): str(self.local_scratch)})

    def on_node(self, name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` on node `name` with this cluster's environment; returns the finished process."""
        kwargs = {"capture_output": True, "text": True, "timeout": 60, **kwargs}
        return subprocess.run(self.on_node_argv(name, argv), env=self.env, **kwargs)

    def node_pids(self, name: str) -> list[int]:
        """The processes on node `name` (several nodes only: those in its namespace)."""
        assert self.net is not None, "a one-node cluster's node is this machine"
        return self.net.pids(name)

    def sbatch(self, *argv: str, env: dict | None = None, cwd=None, timeout: float = 300):
        """Submit (`argv`: sbatch options, script, its arguments); returns (job id, CompletedProcess).

        With --wait among the options sbatch returns when the job ends, with the job's exit status."""
        result = subprocess.run(
            ["sbatch", "--parsable", *argv],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        job_id = result.stdout.strip().split(";")[0].splitlines()[0] if result.stdout.strip() else ""
        if not job_id.isdigit():
            raise SlurmError(f"sbatch {' '.join(argv)} did not submit\n{result.stdout}\n{result.stderr}")
        return job_id, result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); sacct needs slurmdbd."""
        return parse_record(self.run("scontrol", "show", "job", "-o", job_id).stdout)

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        """Wait for the job to finish; its record (SlurmError with the cluster's logs on timeout)."""
        try:
            return self.wait_job(job_id, timeout=timeout)
        except SlurmError as e:
            raise SlurmError(f"{e}\n{self.logs_text()}") from None

    def wait_job(self, job_id: str, until=None, timeout: float = 120, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until `until(record)` is true (default: it finished); SlurmError on timeout.

        Faster than `sbatch --wait` for jobs longer than a few seconds: that polls after 2, 8, 32 s."""
        until = until or (lambda record: record["JobState"] in FINISHED)
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if until(record):
                return record
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id}: timed out after {timeout:.0f} s; last state {record}")
            time.sleep(poll)

    def logs_text(self, tail: int = 40) -> str:
        parts = []
        for path in sorted(self.logs.glob("*")) + sorted(self.munge_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


@contextmanager
def started(nodes: int = 1):
    """A cluster of `nodes` nodes in a fresh temp folder, for a fixture: a skip (a failure under CI=true)
    when this machine cannot run it; stopped and removed at the end, however the tests ended."""
    from tests.needs import unavailable

    # Not under pytest's tmp dir: munged (user munge) must be able to reach its socket through every parent.
    root = Path(tempfile.mkdtemp(prefix=f"imagenet-ddp-slurm{nodes}-"))
    try:
        try:
            cluster, why = SlurmCluster.start(root, nodes), None
        except (SlurmUnavailable, NetworkUnavailable, NetworkError) as e:  # NetworkError: no CAP_NET_ADMIN
            why = str(e)
        if why:
            unavailable(f"no {nodes}-node SLURM here: {why}")
        with cluster:
            print(f"{nodes}-node SLURM cluster up in {cluster.start_seconds:.1f} s ({root})")
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)
