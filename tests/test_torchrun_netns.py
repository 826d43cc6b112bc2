"""torchrun across two hosts without SLURM, as docs/clusters.md shows it: one `torchrun --nnodes=2
--rdzv-backend=c10d --rdzv-endpoint=HOST:29400` per host, HOST the first host's name. The hosts are
two network namespaces with their own addresses and hostnames (tests/netns.py); and the check of the
network interface the process group will use (imagenet_ddp.dist.check_interface).

    python -m pytest tests/test_torchrun_netns.py      # as root (network namespaces); ~30 s

Without root the two-host test is skipped, except when CI is set: then it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imagenet_ddp.checkpoint import load
from imagenet_ddp.dist import _is_loopback, check_interface
from imagenet_ddp.errors import UserError
from tests.needs import unavailable
from tests.netns import Network, NetworkError, NetworkUnavailable
from tests.test_train import make_tiny_shards, small_run
from tests.test_train_ddp import REPO, environment, metrics

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def network():
    try:
        net = Network.create(["node1", "node2"])
    except (NetworkUnavailable, NetworkError) as e:  # NetworkError: root without CAP_NET_ADMIN
        unavailable(f"no network namespaces here: {e}")
    with net:
        yield net


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


def on_both(network, argv: list[str], env: dict, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`argv` started on node1 and node2 at once; their exit statuses and outputs."""
    procs = {
        name: subprocess.Popen(
            network.command(name, argv),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the test can end all it started
        )
        for name in ("node1", "node2")
    }
    done = []
    try:
        for name, proc in procs.items():
            out = proc.communicate(timeout=timeout)[0]
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, f"--- {name}\n{out}"))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return done


def test_torchrun_on_two_hosts_with_a_c10d_rendezvous_on_the_first_trains_to_the_end(
    network, shards, tmp_path
):
    run_dir = tmp_path / "run"
    # The documented command, two processes per host; the interface is found from the hostname.
    launch = ["--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29400"]
    argv = [TORCHRUN, *launch, "--rdzv-id=netns", "train_ddp.py", "--config", "configs/demo.yaml"]
    argv += small_run(
        shards, run_dir, "train.epochs=1", "train.batch_size=4", "model.name=mobilenet_v3_small"
    )
    env = {k: v for k, v in environment(tmp_path).items() if not k.endswith("_SOCKET_IFNAME")}
    done = on_both(network, argv, env)
    logs = "\n".join(d.stdout for d in done)
    assert [d.returncode for d in done] == [0, 0], logs
    assert [m["step"] for m in metrics(run_dir)] == [96 // (4 * 4)], logs
    placed = [r["host"] for r in load(run_dir / "last.pt")["ranks"]]
    assert placed[0] == placed[1] != placed[2] == placed[3] and set(placed) == {"node1", "node2"}, placed


# ---------------------------------------------------------------------------- check_interface


@pytest.fixture
def across_nodes(monkeypatch):
    """This process as one of 4 ranks on 2 nodes meeting at another host's address."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.11.12.13")
    return monkeypatch


def interfaces() -> tuple[list[str], list[str]]:
    """(loopback, others) among this host's interfaces."""
    names = [name for _, name in socket.if_nameindex()]
    return [n for n in names if _is_loopback(n)], [n for n in names if not _is_loopback(n)]


def test_an_interface_this_host_lacks_is_named_with_those_it_has(across_nodes):
    across_nodes.setenv("GLOO_SOCKET_IFNAME", "nonexistent0")
    with pytest.raises(
        UserError, match=r"^GLOO_SOCKET_IFNAME=nonexistent0: no such network interface; "
    ) as e:
        check_interface("gloo", 4, 2)
    assert all(name in str(e.value) for _, name in socket.if_nameindex())
    across_nodes.setenv("NCCL_SOCKET_IFNAME", "nonexistent")  # NCCL's are prefixes
    with pytest.raises(UserError, match=r"^NCCL_SOCKET_IFNAME=nonexistent: no such network interface"):
        check_interface("nccl", 4, 2)


def test_an_existing_interface_passes_and_the_loopback_one_only_on_one_machine(across_nodes):
    loopback, others = interfaces()
    if not others:
        pytest.skip("this host has no interface but the loopback one")
    across_nodes.setenv("GLOO_SOCKET_IFNAME", others[0])
    check_interface("gloo", 4, 2)  # the negative control: no error
    across_nodes.setenv("NCCL_SOCKET_IFNAME", others[0][:2])  # a prefix
    check_interface("nccl", 4, 2)
    across_nodes.setenv("NCCL_SOCKET_IFNAME", "^docker,lo")  # interfaces to avoid
    check_interface("nccl", 4, 2)
    across_nodes.setenv("GLOO_SOCKET_IFNAME", loopback[0])
    with pytest.raises(UserError, match=rf"^GLOO_SOCKET_IFNAME={loopback[0]} is the loopback interface"):
        check_interface("gloo", 4, 2)
    check_interface("gloo", 2, 2)  # one node: loopback is fine
    across_nodes.setenv("MASTER_ADDR", "127.0.0.1")  # all "nodes" on this machine
    check_interface("gloo", 4, 2)


def test_a_hostname_on_a_loopback_address_is_named_before_gloo_would_hang_on_it(across_nodes):
    across_nodes.setattr(socket, "gethostname", lambda: "localhost")  # 127.0.0.1 in every /etc/hosts
    with pytest.raises(
        UserError, match=r"^this host's name localhost resolves to a loopback address, so gloo"
    ):
        check_interface("gloo", 4, 2)
    across_nodes.setattr(socket, "gethostname", lambda: "no-such-host.invalid")
    with pytest.raises(UserError, match=r"^this host's name no-such-host\.invalid does not resolve"):
        check_interface("gloo", 4, 2)
    others = interfaces()[1]
    if others:  # the variable set: gloo does not look at the hostname
        across_nodes.setenv("GLOO_SOCKET_IFNAME", others[0])
        check_interface("gloo", 4, 2)
