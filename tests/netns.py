"""Several "hosts" on one machine for multi-node tests: each a network namespace with its own address,
hostname and /etc/hosts, joined by a bridge whose address is this machine's as the hosts see it.

    with Network.create(["node1", "node2"]) as net:        # needs root and iproute2 (`ip`)
        net.hosts[0].address                                # 10.X.Y.2; the bridge (this machine) is .1
        subprocess.run(net.command("node1", ["hostname"]))  # prints node1
        subprocess.run(net.command("node2", ["ls", "/scratch"], mounts={"/tmp/node2": "/scratch"}))

Every host has one interface, IFNAME, with its address; each resolves the hosts' names (only
there: a hosts file of this network bind-mounted over /etc/hosts in the host's own mount namespace).
Nothing of this machine's own network or /etc/hosts changes. The bridge, the namespaces and the
hosts file are removed by `remove()` (also when `create` fails half way); processes started in a
namespace are the caller's to stop. (Not `ip netns exec`: it mounts a new /sys, without the cgroup
filesystems slurmd needs.)
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

IFNAME = "ddp0"  # the interface between the hosts: the same name in every namespace


class NetworkUnavailable(RuntimeError):
    """This machine cannot make namespaces (not root, no `ip`/`unshare`): a reason to skip."""


class NetworkError(RuntimeError):
    """Making the namespaces failed on a machine that should allow it: always a failure."""


@dataclass(frozen=True)
class Host:
    name: str  # its hostname, and its name in the other hosts' /etc/hosts
    address: str  # on IFNAME
    netns: str  # the network namespace (`ip netns exec NETNS ...`)


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetworkError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def _free_subnet(tag: int) -> ipaddress.IPv4Network:
    """A /24 in 10.213-10.252 that no interface here uses (the tag spreads concurrent test runs)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for i in range(4000):
        n = (tag + i) % 10000
        net = ipaddress.ip_network(f"10.{213 + n // 250}.{n % 250}.0/24")
        if f"10.{213 + n // 250}.{n % 250}." not in used:
            return net
    raise NetworkError("no free 10.x.y.0/24 subnet for the test network")


_made = itertools.count()  # networks made by this process: each its own names


class Network:
    def __init__(self, names: list[str], tag: int):
        self.tag = f"idp{tag % 100000}{chr(97 + next(_made) % 26)}"  # interface names: 15 characters at most
        self.bridge = f"{self.tag}br"
        subnet = _free_subnet(tag)
        addresses = list(subnet.hosts())
        self.gateway = str(addresses[0])  # the bridge: this machine, seen from the hosts
        self.prefix = subnet.prefixlen
        self.hosts = [Host(name, str(addresses[i + 1]), f"{self.tag}-{name}") for i, name in enumerate(names)]
        self._made: list[tuple[str, str]] = []  # ("netns" | "link" | "dir", name), to undo in reverse

    @classmethod
    def create(cls, names: list[str]) -> Network:
        if os.geteuid() != 0:
            raise NetworkUnavailable("network namespaces need root")
        missing = [
            tool for tool in ("ip", "nsenter", "unshare", "hostname", "mount") if shutil.which(tool) is None
        ]
        if missing:
            raise NetworkUnavailable(f"{', '.join(missing)} not found (iproute2, util-linux)")
        net = cls(names, os.getpid())
        try:
            net._make()
        except BaseException:
            net.remove()
            raise
        return net

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/{self.prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        etc = Path(tempfile.mkdtemp(prefix=f"{self.tag}-etc-"))
        self._made.append(("dir", str(etc)))
        self.hosts_file = etc / "hosts"
        self.hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        )
        self.hosts_file.chmod(0o644)
        etc.chmod(0o755)
        for i, host in enumerate(self.hosts):
            _ip("netns", "add", host.netns)
            self._made.append(("netns", host.netns))
            outside = f"{self.tag}v{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", IFNAME, "netns", host.netns)
            self._made.append(("link", outside))
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.prefix}", "dev", IFNAME)
            _ip("-n", host.netns, "link", "set", IFNAME, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def command(self, name: str, argv: list[str], mounts: dict[str, str] | None = None) -> list[str]:
        """`argv` as run on host `name`: in its namespace, with its hostname, `mounts` ({source: target}
        bind mounts seen by it alone). One process: nsenter, unshare and sh exec into `argv` (its PID is
        the PID of the Popen)."""
        host = self.host(name)
        mounts = {str(self.hosts_file): "/etc/hosts", **(mounts or {})}
        script = [f"hostname {shlex.quote(host.name)}"]
        script += [f"mount --bind {shlex.quote(s)} {shlex.quote(t)}" for s, t in mounts.items()]
        script.append('exec "$@"')
        enter = ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--mount", "--uts"]
        return [*enter, "sh", "-c", " && ".join(script), "sh", *argv]

    def pids(self, name: str) -> list[int]:
        """The processes running in host `name`'s namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.host(name).netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def remove(self) -> None:
        """Undo what was made, newest first; deleting a namespace deletes its end of the veth pair."""
        while self._made:
            kind, name = self._made.pop()
            if kind == "dir":
                shutil.rmtree(name, ignore_errors=True)
            elif kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
