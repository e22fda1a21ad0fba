"""Host ports are chosen outside the kernel's ephemeral range, so the harness's own client sockets
(which take ephemeral ports) can never occupy a restarting host's port."""

from __future__ import annotations

from pathlib import Path

from harness.run.fleet import _ephemeral_range, free_port, plan_hosts
from harness.scenario.model import Target


def test_ports_are_below_the_ephemeral_range_and_distinct(tmp_path: Path) -> None:
    low, _ = _ephemeral_range()
    assert all(free_port() < low for _ in range(50))
    target = Target(root=tmp_path, command=("x", "{port}"))
    hosts = plan_hosts(target, 64, tmp_path / "hosts", target.command, {})
    ports = [h.port for h in hosts]
    assert len(set(ports)) == 64 and all(p < low for p in ports)
    assert hosts[3].argv == ["x", str(hosts[3].port)]
