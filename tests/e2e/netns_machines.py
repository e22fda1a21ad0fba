"""Stand-ins for machines: network namespaces joined by a bridge, with addresses the test assigns.

    bridge (root namespace, ADDRESS .1) --- veth --- namespace 1 (.11)
                                        --- veth --- namespace 2 (.12) ...

Each namespace has its own network stack (its own loopback, its own address on the bridge's subnet and no
route anywhere else), so a process started in it with `ip netns exec` is reachable only on its address,
as on another machine. Everything is created under names with a random tag and removed at the end.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Machines:
    bridge_address: str             # the root namespace's address on the subnet (the scheduler's side)
    namespaces: list[str]
    addresses: list[str]            # each namespace's address

    def exec_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[index]]


def available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    import os
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface on this machine uses (several test runs may be going on)."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        second, third = secrets.randbelow(200) + 50, secrets.randbelow(250) + 1
        if f"inet 10.{second}.{third}." not in used:
            return ipaddress.ip_network(f"10.{second}.{third}.0/24")
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test namespaces")


@contextmanager
def machines(count: int) -> Iterator[Machines]:
    tag = secrets.token_hex(3)
    subnet = _free_subnet()
    hosts = list(subnet.hosts())
    bridge = f"hxbr{tag}"
    namespaces = [f"hx{tag}m{i}" for i in range(count)]
    made: list[tuple[str, str]] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{hosts[0]}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        addresses = []
        for i, ns in enumerate(namespaces):
            _ip("netns", "add", ns)
            made.append(("netns", ns))
            outside, inside = f"hx{tag}o{i}", f"hx{tag}i{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            made.append(("link", outside))               # deleting one end deletes the pair
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            address = str(hosts[10 + i])
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            addresses.append(address)
        yield Machines(str(hosts[0]), namespaces, addresses)
    finally:
        for kind, name in reversed(made):
            subprocess.run(["ip", kind, "del", name] if kind == "netns" else ["ip", "link", "del", name],
                           capture_output=True, timeout=30)
