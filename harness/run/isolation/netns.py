"""A network namespace per host (`isolation: netns`), for targets that insist on a fixed port: every host can
bind the same port on its own address.

Each host gets a named namespace (`ip netns add harness-<owner>-<spawner>-<n>`: named after its harness, so
that the watchdog and the next run can remove those of a harness that died) and a veth pair: the outer end in
the harness's namespace with 10.213.X.Y+1/30, the inner end in the host's with +2, its `{addr}`. The target
enters the namespace between fork and exec. The harness reaches it on that address: the driver's links to it
go through the fault proxy (which connects to the inner address), readiness and set-up go there directly.
Removing the namespace removes the veth pair with it. Uses the `ip` command of iproute2 (argv lists).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
PREFIX = "harness-"
POOL = ipaddress.ip_network("10.213.0.0/16")
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why network namespaces cannot be had here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces (/proc/self/ns/net is missing)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip() or f'exit {result.returncode}'}")


def _used_blocks() -> set[int]:
    """The /30 blocks of the pool already holding an address on this machine (another harness's hosts), or
    inside a route of this machine's (a network that uses part of 10.213.0.0/16: its addresses stay reachable)."""
    result = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=30)
    used = set()
    for match in re.finditer(r"inet (10\.213\.\d+\.\d+)/", result.stdout):
        used.add((int(ipaddress.ip_address(match.group(1))) - int(POOL.network_address)) // 4)
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            timeout=30)
    for match in re.finditer(r"^(?:\S+ )?(10\.213\.\d+\.\d+(?:/\d+)?) ", routes.stdout, re.MULTILINE):
        network = ipaddress.ip_network(match.group(1), strict=False)
        if network.subnet_of(POOL) and network.prefixlen < 30:    # (the harness's own veth routes are /30)
            first = (int(network.network_address) - int(POOL.network_address)) // 4
            used.update(range(first, first + max(1, network.num_addresses // 4)))
    return used


@dataclass
class HostNet:
    name: str            # the namespace (/run/netns/NAME)
    outer_if: str
    inner_if: str
    outer_ip: str        # the harness's end
    inner_ip: str        # the host's address
    fd: int              # an open handle on the namespace, for setns() in the child

    def enter(self) -> None:
        """In the child, between fork and exec."""
        if _libc.setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {self.name}")

    def describe(self) -> dict[str, str]:
        return {"netns": self.name, "addr": self.inner_ip, "veth": f"{self.outer_if}/{self.inner_if}"}

    def remove(self) -> bool:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            _ip("netns", "del", self.name)    # the veth pair goes with the namespace
        except OSError:
            return not os.path.exists(os.path.join(NETNS_DIR, self.name))
        return True


class NetNamespaces:
    """The network namespaces of one spawner."""

    def __init__(self, token: str):
        self.token = token
        self.nets: list[HostNet] = []
        self._serial = 0
        self._rng = random.Random(secrets.randbits(64))

    def create(self) -> HostNet:
        self._serial += 1
        name = f"{PREFIX}{self.token}-{self._serial}"
        tag = secrets.token_hex(3)
        outer_if, inner_if = f"hx{tag}o", f"hx{tag}i"   # at most 15 characters (IFNAMSIZ)
        used = _used_blocks() | {(int(ipaddress.ip_address(n.outer_ip)) - int(POOL.network_address)) // 4
                                 for n in self.nets}
        free = [b for b in self._rng.sample(range(POOL.num_addresses // 4), 64) if b not in used]
        if not free:
            raise OSError("no free /30 in 10.213.0.0/16 for a host's veth pair")
        base = int(POOL.network_address) + 4 * free[0]
        outer_ip, inner_ip = str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))
        _ip("netns", "add", name)
        try:
            _ip("link", "add", outer_if, "type", "veth", "peer", "name", inner_if, "netns", name)
            _ip("addr", "add", f"{outer_ip}/30", "dev", outer_if)
            _ip("link", "set", outer_if, "up")
            _ip("-n", name, "addr", "add", f"{inner_ip}/30", "dev", inner_if)
            _ip("-n", name, "link", "set", inner_if, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            raise
        net = HostNet(name, outer_if, inner_if, outer_ip, inner_ip, fd)
        self.nets.append(net)
        return net

    def release(self, net: HostNet) -> bool:
        if net in self.nets:
            self.nets.remove(net)
        return net.remove()

    def close(self) -> list[str]:
        stuck = [n.name for n in list(self.nets) if not self.release(n)]
        return stuck
