"""Everything about ranks: the launcher's environment, process-group set-up and teardown, reductions.

    torchrun --standalone --nproc_per_node=8 train_ddp.py --config configs/nvidia_resnet50.yaml
    srun --ntasks-per-node=8 python train_ddp.py --config ...     (SLURM variables only)
    python train_ddp.py --config configs/demo.yaml                (one process, no process group)

Ranks come from torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
Data is sharded by the global `rank`; the device is picked by `local_rank`. Before the process group
forms, the network interface it will use between nodes is checked (check_interface): a name this host
lacks, or the loopback interface, is a one-line error rather than a traceback or a hang.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imagenet_ddp.errors import UserError

# Exit status after a SIGTERM/SIGUSR1 stop with last.pt saved: EX_TEMPFAIL ("try again later") from
# sysexits.h, so a job script can tell "requeue me" from success (0) and from a crash (1).
EXIT_REQUEUE = 75


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> str:
    """First host of the allocation, as torchrun's c10d endpoint would be."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodes.split(",")[0]  # a single host or a simple list needs no scontrol


def read_env() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun, else SLURM, else one process.

    Under SLURM without torchrun this also sets MASTER_ADDR/MASTER_PORT for the env:// rendezvous."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world, int(env.get("LOCAL_WORLD_SIZE", world))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or -(-world // nodes))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        # A port derived from the job id: two jobs sharing a node do not collide.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local_world
    return 0, 0, 1, 1


def _elastic_store(world_size: int, timeout: datetime.timedelta):
    """Under torchrun, the store this worker group rendezvous through; None elsewhere.

    torchrun's agent serves one TCPStore for its whole life, restarts included, and a restarted group
    finds the keys of the group before it there (gloo's and nccl's peer addresses): a rank that reads
    a dead peer's address retries connecting to it until the collective timeout, so the restart hangs
    (seen with --max-restarts: "Connection refused" for minutes). Each group gets its own key prefix,
    numbered by a counter in the store that every worker of every group increments once: group g is
    workers g*world_size+1 ... (g+1)*world_size. (A counter, not TORCHELASTIC_RESTART_COUNT: nodes that
    restart because another node failed do not count that as one of their restarts.) A worker that dies
    before it gets here (during its imports) leaves the count short for every later group: their ranks
    then wait under different prefixes until the timeout, at every restart after that."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # init_process_group makes its own store from MASTER_ADDR/MASTER_PORT
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    group = (store.add("imagenet-ddp/workers-started", 1) - 1) // world_size
    return dist.PrefixStore(f"imagenet-ddp/group-{group}/", store)


def _is_loopback(interface: str) -> bool:
    """IFF_LOOPBACK from SIOCGIFFLAGS (/sys/class/net may show another network namespace's)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            request = struct.pack("256s", interface.encode()[:15])
            flags = struct.unpack("H", fcntl.ioctl(s.fileno(), 0x8913, request)[16:18])[0]
    except OSError:
        return interface == "lo"
    return bool(flags & 0x8)


def _loopback_address(host: str) -> bool | None:
    """Whether every address `host` resolves to is a loopback address; None when it does not resolve."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)}
    except OSError:
        return None
    return all(ipaddress.ip_address(a).is_loopback for a in found)


def check_interface(backend: str, world_size: int, local_world: int) -> None:
    """UserError when the backend would fail (an interface name this host lacks: gloo raises deep in
    init, NCCL fails or hangs) or hang (several nodes meeting over the loopback interface, which the
    other nodes cannot reach: gloo listens there when this host's name resolves to 127.0.x.x, as in
    many distributions' /etc/hosts, or when its variable names `lo`)."""
    var = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    value, host = os.environ.get(var, ""), socket.gethostname()
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:  # no way to list them here: leave the choice to the backend
        return
    listed = f"this host ({host}) has {', '.join(names)}"
    # All ranks on this machine (the rendezvous itself is on a loopback address): any interface works.
    multi_node = world_size > local_world and not _loopback_address(os.environ.get("MASTER_ADDR", host))
    if value:
        if backend == "nccl" and value.startswith("^"):
            return  # interfaces to avoid: NCCL picks among the others
        exact = backend == "gloo" or value.startswith("=")
        wanted = value.lstrip("=").split(",")
        chosen = [n for n in names if any(n == w if exact else n.startswith(w) for w in wanted)]
        if not chosen:
            raise UserError(
                f"{var}={value}: no such network interface; {listed}: set {var} to the interface "
                "that connects the nodes, or unset it"
            )
        if multi_node and all(_is_loopback(n) for n in chosen):
            raise UserError(
                f"{var}={value} is the loopback interface, which the other nodes cannot reach: set it to "
                f"the interface that connects the nodes; {listed}"
            )
    elif backend == "gloo" and multi_node and _loopback_address(host) is not False:
        how = "does not resolve" if _loopback_address(host) is None else "resolves to a loopback address"
        raise UserError(
            f"this host's name {host} {how}, so gloo would listen on the loopback interface, which the "
            f"other nodes cannot reach: set GLOO_SOCKET_IFNAME to the interface that connects the "
            f"nodes; {listed}"
        )


_store = None  # the group's key-value store (torchrun's agent or, without torchrun, rank 0 serves it)


def setup(timeout_s: float = 900) -> DistEnv:
    """Init the process group (nccl on CUDA, gloo on CPU) when there is more than one process."""
    rank, local_rank, world_size, local_world = read_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one host share its cores; oversubscribed ranks run many times slower.
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores // local_world))
    if world_size > 1:
        global _store
        check_interface("nccl" if device.type == "cuda" else "gloo", world_size, local_world)
        timeout = datetime.timedelta(seconds=timeout_s)
        _store = _elastic_store(world_size, timeout)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            store=_store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        if _store is None:  # the store init_process_group made (hosted by rank 0)
            _store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    return DistEnv(rank, local_rank, world_size, local_world, device)


def silent_ranks(rank: int, world_size: int, wait_s: float) -> list[int] | None:
    """After a collective failed here: the ranks that do not report a failure within `wait_s`.

    Every rank that sees a collective fail reports it in the store, leaves the process group (gloo:
    peers blocked on this rank then fail at once rather than at their timeout, and report too) and
    waits for the others' reports: the ranks still silent at the end are dead or hung. The store's
    host (rank 0 without torchrun) stays until the others have read the reports. None when the
    store cannot be reached (its host is the lost process)."""
    if _store is None:
        return None
    keys = [f"imagenet-ddp/collective-failed/{r}" for r in range(world_size)]
    read = "imagenet-ddp/collective-failed/read"
    try:
        _store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1)))
        _store.set(keys[rank], b"1")
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()  # closes this rank's connections
        try:
            _store.wait(keys, datetime.timedelta(seconds=wait_s))
            silent = []
        except (dist.DistStoreError, RuntimeError):  # some never reported
            silent = [r for r, key in enumerate(keys) if not _store.check([key])]
        _store.add(read, 1)
        if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            deadline = time.monotonic() + 5
            while _store.add(read, 0) < world_size - len(silent) and time.monotonic() < deadline:
                time.sleep(0.1)
        return silent
    except (dist.DistError, RuntimeError, OSError):
        return None


def sum_gradients_in_rank_order(model: torch.nn.parallel.DistributedDataParallel) -> None:
    """For train.deterministic with more than two ranks: DDP's all-reduce adds an element's gradients
    in an order set by where the element lies in its bucket, and DDP lays the buckets out again after
    its first step (in the order the gradients became ready). A run resumed from a checkpoint does its
    first step in the first layout, where the uninterrupted run was in the second: float addition is
    not associative, and the weights drift apart by ~1e-7 (with two ranks, a + b = b + a: no drift).
    This hook gathers every rank's gradients and adds them in rank order, wherever they lie: the same
    sums in both layouts, for world_size times a bucket's memory and an all-gather per bucket."""
    world_size = dist.get_world_size()
    if world_size <= 2:
        return

    def hook(_, bucket):
        mean = bucket.buffer().div_(world_size)  # as DDP's own all-reduce: divide, then add
        parts = [torch.empty_like(mean) for _ in range(world_size)]
        gathered = dist.all_gather(parts, mean, async_op=True).get_future()
        return gathered.then(lambda _: torch.stack(parts).sum(0))

    model.register_comm_hook(None, hook)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(timeout_s: float = 900):
    """`with distributed() as env:` the process group exists inside and is destroyed however it ends."""
    try:
        yield setup(timeout_s)
    finally:
        teardown()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (the identity with one process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one: how ranks agree to stop."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj) -> list:
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def nodes() -> list[list[int]]:
    """The global ranks of each node (one host, one torchrun or srun node), nodes in order of their first rank."""
    me = (socket.gethostname(), os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "0")
    groups: dict = {}
    for rank, node in enumerate(all_gather_object(me)):
        groups.setdefault(tuple(node), []).append(rank)
    return list(groups.values())


def post_and_wait(name: str, value: str | None, senders: list[int], timeout_s: float) -> list[str]:
    """`value` posted under `name` by each rank of `senders`; every rank waits for all of them and gets
    their values. Through the group's store with its own timeout, not a collective's (run.timeout_s):
    for waits longer than a step, such as copying a node's shards."""
    if not _active() or _store is None:
        return [value] if value is not None else []
    if value is not None:
        _store.set(f"imagenet-ddp/{name}/{dist.get_rank()}", value)
    keys = [f"imagenet-ddp/{name}/{rank}" for rank in senders]
    _store.wait(keys, datetime.timedelta(seconds=timeout_s))
    return [_store.get(key).decode() for key in keys]


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm statistics) on every rank, in place."""
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


# How a collective that lost its peer or ran past the timeout fails: nccl raises DistBackendError;
# gloo a plain RuntimeError, sometimes naming its source file ("gloo/transport/tcp/pair.cc ...
# Connection closed by peer", "Timed out waiting 5000ms for recv operation"), sometimes not
# ("Application timeout caused pair closure", from DDP's buffer broadcast in forward).
_PEER_LOST = ("timed out", "timeout", "pair closure", "connection reset", "connection closed", "broken pipe")
# Where such an error is raised from Python: torch.distributed, DDP's forward (its buffer broadcast),
# and the autograd engine (DDP's reducer all-reduces the gradients during backward).
_COLLECTIVE_CODE = (
    os.path.dirname(dist.__file__) + os.sep,
    os.path.dirname(torch.autograd.__file__) + os.sep,
    os.path.join(os.path.dirname(torch.nn.parallel.__file__), "distributed.py"),
)


def _raised_by_collective(error: BaseException) -> bool:
    """Whether the innermost Python frame of `error` is in torch.distributed, DDP or autograd."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(_COLLECTIVE_CODE)


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost its peer. A plain RuntimeError counts
    when it names gloo, or when gloo is this process group's backend and torch's collective code
    raised it: only then, since a device error raised in backward ("CUDA error: the launch timed
    out", a display GPU's watchdog) is no lost peer."""
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError) or isinstance(error, getattr(torch, "AcceleratorError", ())):
        return False
    text = str(error)
    gloo = "gloo" in text or (
        dist.is_initialized() and dist.get_backend() == "gloo" and _raised_by_collective(error)
    )
    return gloo and any(w in text.lower() for w in _PEER_LOST)


def lost_peer_line(error: BaseException, timeout_s: float, silent: list[int] | None) -> str:
    """One line for the user about a collective that lost its peer (is_lost_peer: another rank died
    or hangs, not this rank's fault, and a traceback through DDP's internals would not help).
    `silent`: the ranks that did not report the failure (silent_ranks), None when unknown."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    if silent:
        which = ", ".join(map(str, silent))
        many = len(silent) > 1
        return (
            f"rank{'s' if many else ''} {which} died or hung: {'they' if many else 'it'} did not report "
            f"the failed collective as the other ranks did (run.timeout_s={timeout_s} s; {reason})"
        )
    if silent == []:
        return (
            f"a collective failed on every rank and none is missing ({reason}): the network between "
            "nodes failed, or ranks called different collectives"
        )
    return (
        f"another rank died or did not answer a collective within run.timeout_s={timeout_s} s ({reason}); "
        "the launcher's summary names the rank it lost"
    )


def collective_failure(error: BaseException, env: DistEnv, timeout_s: float) -> str | None:
    """The one line to print when `error` is a failed collective (naming the ranks that did not
    report it, see silent_ranks), else None. Judged before silent_ranks leaves the process group."""
    if env.world_size == 1 or not is_lost_peer(error):
        return None
    return lost_peer_line(error, timeout_s, silent_ranks(env.rank, env.world_size, min(timeout_s, 10)))


def barrier() -> None:
    if _active():
        dist.barrier()


class StopSignal:
    """SIGTERM/SIGUSR1 (SLURM's warnings before a time limit or preemption) set a flag; the training loop
    asks `requested(env)` at step boundaries so all ranks stop together after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum  # only a flag: the handler may run in the middle of a collective

    def requested(self, device: torch.device) -> bool:
        return any_rank(self.received is not None, device)
