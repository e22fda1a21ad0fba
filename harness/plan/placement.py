"""Which cluster machine each host of a real fleet runs on (pure): `fleet.placement` and a group's own.

Machines are numbered 0.. in the order of the cluster's workers as the runtime lists them (harness/cluster).
- spread: a group's hosts are dealt round-robin over the machines; each spread group goes on dealing where the
  previous spread group stopped, so a fleet of spread groups is balanced as a whole (counts differ by at most
  one), not just each group.
- pack: a group's hosts in contiguous blocks of ceil(hosts / machines), machine 0 first (so a group of 3 on 4
  machines uses machines 0-2 with one each, and a group of 5 on 2 uses 3 + 2). A pack group does not move the
  spread groups' dealing.
"""

from __future__ import annotations

import math

from harness.scenario.model import Group, Scenario


def placement_of(scenario: Scenario, group: Group) -> str:
    """A group's placement: its own, else the fleet's."""
    return group.placement or scenario.fleet.placement


def place_hosts(scenario: Scenario, machines: int) -> list[int]:
    """For each host index 0..fleet.hosts-1, the 0-based machine it runs on."""
    if machines < 1:
        raise ValueError(f"hosts need at least one machine to run on, got {machines}")
    where = [0] * scenario.fleet.hosts
    dealt = 0          # spread hosts dealt so far, over every spread group: where the next one goes
    for group in scenario.host_groups:
        hosts = scenario.hosts_in((group.name,))
        if placement_of(scenario, group) == "pack":
            per_machine = math.ceil(len(hosts) / machines)
            for position, host in enumerate(hosts):
                where[host] = position // per_machine
        else:
            for host in hosts:
                where[host] = dealt % machines
                dealt += 1
    return where


def hosts_on(placement: list[int], machine: int) -> list[int]:
    """The hosts a placement puts on one machine, in host order."""
    return [host for host, on in enumerate(placement) if on == machine]
