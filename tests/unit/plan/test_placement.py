"""Where a real fleet's hosts go over cluster machines (harness.plan.placement) and which machines a
machine-loss takes (harness.plan.streams.choose_machines). Pure functions, small made-up fleets."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.plan.placement import hosts_on, place_hosts
from harness.plan.streams import choose_machines
from harness.scenario.loader import load_scenario_text
from harness.scenario.model import MachineLoss


def fleet(placement: str | None, *groups: tuple[str, int, str | None]):
    """A scenario whose fleet has these (name, hosts, placement) groups; none given: 1 plain group of hosts."""
    lines = ["name: placed", "target: {command: [./server, --port, '{port}']}", "fleet:"]
    if placement is not None:
        lines.append(f"  placement: {placement}")
    if len(groups) == 1 and groups[0][0] == "":
        lines.append(f"  hosts: {groups[0][1]}")
    else:
        lines.append("  groups:")
        for name, hosts, own in groups:
            lines.append(f"    - {{name: {name}, hosts: {hosts}" + (f", placement: {own}}}" if own else "}"))
    lines += ["load: [{hold: {for: 5s, rate: 10}}]", ""]
    return load_scenario_text("\n".join(lines), "placed.yaml")


def test_spread_deals_a_plain_fleet_round_robin():
    assert place_hosts(fleet(None, ("", 7, None)), 3) == [0, 1, 2, 0, 1, 2, 0]
    assert place_hosts(fleet("spread", ("", 2, None)), 4) == [0, 1]        # more machines than hosts


@pytest.mark.parametrize("machines", [1, 2, 3, 4, 5, 8])
def test_spread_groups_keep_the_whole_fleet_balanced(machines):
    placed = fleet(None, ("a", 3, None), ("b", 5, None), ("c", 1, None), ("d", 4, None))
    where = place_hosts(placed, machines)
    assert len(where) == placed.fleet.hosts == 13 and set(where) <= set(range(machines))
    counts = Counter(where)
    assert max(counts.values()) - min(counts[m] for m in range(machines)) <= 1
    # each group goes on where the previous one stopped (not from machine 0 again)
    assert where == [i % machines for i in range(13)]


def test_spread_groups_continue_the_dealing():
    placed = fleet("spread", ("a", 3, None), ("b", 3, None))
    assert place_hosts(placed, 2) == [0, 1, 0, 1, 0, 1]       # restarting per group would give 0 1 0 0 1 0
    assert hosts_on(place_hosts(placed, 2), 1) == [1, 3, 5]


def test_pack_fills_contiguous_blocks_from_machine_zero():
    assert place_hosts(fleet("pack", ("", 5, None)), 2) == [0, 0, 0, 1, 1]      # ceil(5/2) = 3 per machine
    assert place_hosts(fleet("pack", ("", 3, None)), 4) == [0, 1, 2]            # one each, the last unused
    assert place_hosts(fleet("pack", ("", 8, None)), 3) == [0, 0, 0, 1, 1, 1, 2, 2]
    packed = fleet("pack", ("a", 4, None), ("b", 2, None))
    assert place_hosts(packed, 2) == [0, 0, 1, 1, 0, 1]                          # each group from machine 0


def test_mixed_groups_follow_their_own_placement_else_the_fleets():
    placed = fleet("pack", ("front", 3, "spread"), ("cache", 4, None), ("db", 3, "spread"))
    # front dealt 0 1 2; cache packed (the fleet's) 2 per machine from 0; db goes on dealing after front: 0 1 2
    assert place_hosts(placed, 3) == [0, 1, 2, 0, 0, 1, 1, 0, 1, 2]
    spread = fleet("spread", ("front", 2, None), ("db", 4, "pack"), ("tail", 2, None))
    assert place_hosts(spread, 2) == [0, 1, 0, 0, 1, 1, 0, 1]


def test_placement_is_deterministic_and_covers_every_host():
    placed = fleet(None, ("a", 5, "pack"), ("b", 6, None), ("c", 2, "pack"))
    first = place_hosts(placed, 4)
    assert first == place_hosts(placed, 4) == place_hosts(fleet(None, ("a", 5, "pack"), ("b", 6, None),
                                                                ("c", 2, "pack")), 4)
    assert sorted(h for m in range(4) for h in hosts_on(first, m)) == list(range(13))


def test_one_machine_takes_every_host_and_none_is_an_error():
    placed = fleet(None, ("a", 2, "pack"), ("b", 3, None))
    assert place_hosts(placed, 1) == [0] * 5
    for machines in (0, -1):
        with pytest.raises(ValueError, match="at least one machine"):
            place_hosts(placed, machines)


def test_choose_machines_takes_the_named_machine_only_if_it_is_a_candidate():
    named = MachineLoss(index=0, at=6.0, machine=1, count=1)
    assert choose_machines(7, named, [0, 1, 2]) == [1]
    assert choose_machines(7, named, [0, 2]) == []         # already gone, or the cluster has fewer machines


def test_choose_machines_is_seeded_per_fault_and_sorted():
    loss = MachineLoss(index=2, at=6.0, machine=None, count=2)
    candidates = list(range(10))
    picked = choose_machines(11, loss, candidates)
    assert len(picked) == 2 and picked == sorted(picked) and set(picked) <= set(candidates)
    assert choose_machines(11, loss, list(reversed(candidates))) == picked    # the candidates' order is no input
    # other seeds and other faults pick otherwise (over 20 seeds, not one pair only)
    assert len({tuple(choose_machines(seed, loss, candidates)) for seed in range(20)}) > 5
    other = MachineLoss(index=3, at=6.0, machine=None, count=2)
    assert any(choose_machines(s, other, candidates) != choose_machines(s, loss, candidates) for s in range(20))
    assert choose_machines(11, MachineLoss(index=0, at=1.0, machine=None, count=5), [4, 2]) == [2, 4]
    assert choose_machines(11, loss, []) == []
