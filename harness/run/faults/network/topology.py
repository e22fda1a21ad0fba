"""Who talks to whom, and through which proxy: pure functions of the scenario.

Traffic flows on *links*: from the driver to each host in rotation, and from each host of a group to each
host of the groups it names as `backends:`. A link goes through the fault proxy when a network fault may
act on it (any host its fault may choose, or the two groups of a `between` fault); every other link is
direct, so a scenario without network faults has no proxy on any path.

A frontend group's hosts learn their backends' addresses from their command and config templates:
`{backends}` is the comma-separated `addr:port` list, and a line (or a command argument) that holds
`{backend.name}`, `{backend.host}`, `{backend.addr}`, `{backend.port}`, `{backend.index}` or `{backend.group}`
is repeated once per backend host (VCL backend definitions, nginx `server` lines). The port is the proxy's
for that link when it is proxied, so faults between groups apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.plan.streams import stream
from harness.scenario.model import NetFault, Scenario

DRIVER = "driver"
_BACKEND_FIELD = re.compile(r"\{backend\.(name|host|addr|port|index|group)\}")


@dataclass(frozen=True)
class LinkSpec:
    client: str        # DRIVER, or the name of the group whose hosts connect
    host: int          # the host connected to (index in the fleet)


@dataclass(frozen=True)
class Backend:
    name: str          # an identifier (VCL, nginx): the host name with other characters as '_'
    host: str          # the host's name (api-0)
    addr: str
    port: int          # what the frontend connects to: the proxy's port for this link, or the host's own
    index: int         # position in the frontend's backend list
    group: str


def group_of(scenario: Scenario) -> list[str]:
    """Each host's group name, in fleet order ('' in a fleet without groups)."""
    names: list[str] = []
    for group in scenario.host_groups:
        names += [group.name] * group.hosts
    return names


def host_names(scenario: Scenario) -> list[str]:
    names: list[str] = []
    for group in scenario.host_groups:
        names += [f"{group.name}-{i}" if group.name else f"h{len(names) + i}" for i in range(group.hosts)]
    return names


def all_links(scenario: Scenario) -> list[LinkSpec]:
    links = [LinkSpec(DRIVER, h) for g in scenario.host_groups if g.rotation for h in scenario.hosts_in((g.name,))]
    if not scenario.fleet.groups:
        links = [LinkSpec(DRIVER, h) for h in range(scenario.fleet.hosts)]
    for group in scenario.fleet.groups:
        for backend in group.backends:
            links += [LinkSpec(group.name, h) for h in scenario.hosts_in((backend,))]
    return links


def fault_hosts(scenario: Scenario, fault: NetFault) -> list[int]:
    """The hosts a fault on hosts acts on: all of its groups' (the whole fleet by default) or a seeded choice
    among them, fixed for the run."""
    pool = scenario.hosts_in(fault.groups)
    count = fault.hosts.resolve(len(pool))
    if count >= len(pool):
        return pool
    return sorted(stream(scenario.seed, f"net-fault:{fault.index}").sample(pool, count))


def _between(scenario: Scenario, fault: NetFault, link: LinkSpec) -> bool:
    assert fault.between is not None
    groups = group_of(scenario)
    return {link.client, groups[link.host]} == set(fault.between)


def fault_links(scenario: Scenario, fault: NetFault) -> list[LinkSpec]:
    """The links a fault acts on."""
    if fault.between is not None:
        return [link for link in all_links(scenario) if _between(scenario, fault, link)]
    chosen = set(fault_hosts(scenario, fault))
    return [link for link in all_links(scenario) if link.host in chosen]


def netns_hosts(scenario: Scenario) -> set[int]:
    """Hosts in network namespaces of their own (isolation: netns): reached on their own address."""
    return {h for g in scenario.host_groups if g.target.isolation.netns for h in scenario.hosts_in((g.name,))}


def proxied_links(scenario: Scenario) -> list[LinkSpec]:
    """Links that go through the proxy: those any network fault could act on (for a fault on hosts, any host
    of its pool: every such link pays the proxy's small cost, not just the chosen ones), and every link into a
    host in its own network namespace (the driver and the frontends speak to 127.0.0.1)."""
    wanted: set[LinkSpec] = {link for link in all_links(scenario) if link.host in netns_hosts(scenario)}
    for fault in scenario.net_faults:
        if fault.between is not None:
            wanted |= set(fault_links(scenario, fault))
        else:
            pool = set(scenario.hosts_in(fault.groups))
            wanted |= {link for link in all_links(scenario) if link.host in pool}
    return [link for link in all_links(scenario) if link in wanted]


def backends(scenario: Scenario, ports: list[int], via: dict[LinkSpec, int], addr: str = "127.0.0.1",
             addrs: list[str] | None = None, proxy_addrs: list[str] | None = None) -> dict[str, list[Backend]]:
    """Each frontend group's backend list, with the port to use: the proxy's (`via`) or the host's own.
    `addrs`: each host's address when it differs (hosts in their own network namespaces, or on other
    machines); `proxy_addrs`: where each host's links' proxy listens when not on `addr` (over a cluster: the
    host's machine)."""
    names = host_names(scenario)
    result: dict[str, list[Backend]] = {}
    for group in scenario.fleet.groups:
        entries: list[Backend] = []
        for backend in group.backends:
            for host in scenario.hosts_in((backend,)):
                link = LinkSpec(group.name, host)
                proxied = link in via
                entries.append(Backend(
                    name=re.sub(r"[^A-Za-z0-9_]", "_", names[host]), host=names[host],
                    addr=(proxy_addrs[host] if proxy_addrs else addr) if proxied else addrs[host] if addrs else addr,
                    port=via[link] if proxied else ports[host], index=len(entries), group=backend))
        if entries:
            result[group.name] = entries
    return result


def backend_list(entries: list[Backend]) -> str:
    return ",".join(f"{b.addr}:{b.port}" for b in entries)


def _fill(text: str, backend: Backend) -> str:
    return _BACKEND_FIELD.sub(lambda m: str(getattr(backend, m.group(1))), text)


def expand_lines(text: str, entries: list[Backend]) -> str:
    """A template with its backend lines repeated per backend, and {backends} filled in."""
    if "{backend" not in text:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        if _BACKEND_FIELD.search(line):
            out += [_fill(line, backend) for backend in entries]
        else:
            out.append(line)
    return "".join(out).replace("{backends}", backend_list(entries))


def expand_args(argv: list[str], entries: list[Backend]) -> list[str]:
    """Command arguments: one holding {backend.*} becomes one argument per backend; {backends} the list."""
    out: list[str] = []
    for arg in argv:
        if _BACKEND_FIELD.search(arg):
            out += [_fill(arg, backend) for backend in entries]
        else:
            out.append(arg.replace("{backends}", backend_list(entries)))
    return out
