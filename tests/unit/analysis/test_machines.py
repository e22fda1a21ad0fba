"""The report's machines section: each machine's share of the good replies between machine losses."""

from __future__ import annotations

from harness.analysis.machines import machine_lines, machine_shares, machines_section

MACHINES = [{"machine": 1, "worker": "tcp://10.0.0.11:1", "addr": "10.0.0.11", "hosts": [0, 2], "lost": None,
             "lost_at": None},
            {"machine": 2, "worker": "tcp://10.0.0.12:1", "addr": "10.0.0.12", "hosts": [1, 3],
             "lost": "machine-loss", "lost_at": 4.3}]


def _rows(ok_by_second: dict[int, list[int]]) -> list[dict]:
    return [{"t": t, "host": host, "ok": ok} for t, oks in ok_by_second.items() for host, ok in enumerate(oks)]


def test_shares_split_at_the_loss_and_leave_the_loss_second_out() -> None:
    rows = _rows({0: [10, 10, 10, 10], 3: [10, 30, 10, 30], 4: [50, 0, 50, 0], 5: [40, 0, 60, 0], 7: [1, 0, 1, 0]})
    stretches = machine_shares(MACHINES, rows, end=8.0)
    assert [(s["from"], s["to"]) for s in stretches] == [(0.0, 4.0), (5.0, 8.0)]
    assert stretches[0]["ok"] == {1: 40, 2: 80} and abs(stretches[0]["share"][1] - 1 / 3) < 1e-9
    assert stretches[1]["ok"] == {1: 102, 2: 0} and stretches[1]["share"] == {1: 1.0, 2: 0.0}


def test_no_losses_is_one_stretch_and_no_traffic_has_no_share() -> None:
    kept = [dict(m, lost=None, lost_at=None) for m in MACHINES]
    assert machine_shares(kept, [], end=3.0) == [{"from": 0.0, "to": 3.0, "ok": {1: 0, 2: 0},
                                                  "share": {1: None, 2: None}}]


def test_text_names_hosts_the_loss_and_a_takeover() -> None:
    section = machines_section({"machines": MACHINES}, _rows({0: [5, 5, 5, 5], 6: [9, 0, 9, 0]}), 8.0,
                               {0: "h0", 1: "h1", 2: "h2", 3: "h3"})
    assert section is not None
    section["takeovers"] = [{"t": 4.31, "shard": 1, "machine": 2, "counts_lost": [3, 5]}]
    text = "\n".join(machine_lines(section))
    assert "m2 10.0.0.12 (worker tcp://10.0.0.12:1): 2 hosts h1 h3; lost at 4.30s (machine-loss)" in text
    assert "0-4s: m1 50.0% m2 50.0% | 5-8s: m1 100.0% m2 0.0%" in text
    assert "driver shard 1 (m2) lost at 4.31s" in text and "seconds 3-4" in text
    assert machines_section({}, [], 8.0, {}) is None


def _placement(start: float, machines: list[dict]) -> dict:
    return {"kind": "placement", "t": start - 0.5, "detail": {"from": start, "machines": machines}}


def _gap(at: int) -> dict:
    return {"kind": "gap", "t": at - 0.05, "detail": {"resumed_at": at}}


PLACED = [dict(m, lost=None, lost_at=None) for m in MACHINES]


def test_a_trial_resumed_over_the_cluster_shows_each_stretch_where_it_ran() -> None:
    """Attempt 1 on the machines (m2 lost at 2.4 s), attempt 2 locally, attempt 3 on the machines with the
    hosts placed the other way round: each stretch with its own machines and shares, the last from 6 s."""
    swapped = [dict(PLACED[0], hosts=[1, 3]), dict(PLACED[1], hosts=[0, 2])]
    events = [_placement(0, PLACED), {"kind": "machine-loss", "t": 2.4, "detail": {"machine": 2}}, _gap(4),
              _gap(6), _placement(6, swapped)]
    rows = _rows({1: [5, 5, 5, 5], 3: [9, 0, 9, 0], 5: [1, 1, 1, 1], 7: [2, 3, 2, 3]})
    section = machines_section({"machines": swapped, "machines_from": 6}, rows, 8.0,
                               {0: "h0", 1: "h1", 2: "h2", 3: "h3"}, events)
    assert section is not None
    assert [(a["from"], a["to"], a["machines"] is None) for a in section["earlier"]] == \
        [(0.0, 4.0, False), (4.0, 6.0, True)]
    first = section["earlier"][0]
    assert [m["lost_at"] for m in first["machines"]] == [None, 2.4]
    assert [(s["from"], s["to"], s["ok"]) for s in first["shares"]] == [(0.0, 2.0, {1: 10, 2: 10}),
                                                                        (3.0, 4.0, {1: 18, 2: 0})]
    assert [(s["from"], s["to"], s["ok"]) for s in section["shares"]] == [(6.0, 8.0, {1: 6, 2: 4})]
    text = "\n".join(machine_lines(section))
    assert "0-4s (before a resume):\n    m1 10.0.0.11" in text
    assert "lost at 2.40s (machine-loss)" in text
    assert "4-6s (before a resume): on the command's machine (a local run)" in text
    assert "from 6s (resumed over the cluster):\n    m1 10.0.0.11 (worker tcp://10.0.0.11:1): 2 hosts h1 h3" in text
    assert "share of good replies by machine: 6-8s: m1 60.0% m2 40.0%" in text


def test_a_cluster_trial_resumed_locally_and_a_local_run_have_no_machines_of_their_own() -> None:
    events = [_placement(0, PLACED), _gap(3)]
    section = machines_section({}, _rows({1: [5, 5, 5, 5]}), 8.0, {}, events)
    assert section is not None and section["machines"] == [] and section["local_from"] == 3.0
    assert [(a["from"], a["to"]) for a in section["earlier"]] == [(0.0, 3.0)]
    assert "from 3s (resumed without --cluster): on the command's machine" in "\n".join(machine_lines(section))
    assert machines_section({}, [], 8.0, {}, [_gap(3)]) is None          # a local run resumed locally
    # a trial run over the cluster from the start and never resumed: as before (no stretches of attempts)
    plain = machines_section({"machines": PLACED}, [], 8.0, {}, [_placement(0, PLACED)])
    assert plain is not None and plain["earlier"] == [] and "before a resume" not in "\n".join(machine_lines(plain))


def test_an_attempt_stopped_before_writing_its_detail_is_read_from_its_placement_event() -> None:
    """The trial's stored detail is written when a trial ends: after a resumed attempt was killed, it is still
    an earlier attempt's (or empty). The last attempt is the last gap's, where it ran its placement event's."""
    # attempt 1 on the machines, ended by Ctrl-C (its detail stored); attempt 2 locally from 5 s, killed
    stale = {"machines": PLACED, "machines_from": 0}
    section = machines_section(stale, [], 10.0, {}, [_placement(0, PLACED), _gap(5)])
    assert section is not None and section["machines"] == [] and section["local_from"] == 5.0
    assert [(a["from"], a["to"], a["machines"] is None) for a in section["earlier"]] == [(0.0, 5.0, False)]
    # attempt 1 locally, stopped; attempt 2 on the machines from 5 s, killed (no detail of its own), m2 lost
    events = [_gap(5), _placement(5, PLACED), {"kind": "machine-lost", "t": 7.5,
                                                "detail": {"machine": 2, "why": "its link closed"}}]
    section = machines_section({}, [], 10.0, {}, events)
    assert section is not None and section["from"] == 5.0 and section["local_from"] is None
    assert [(m["machine"], m["lost"]) for m in section["machines"]] == [(1, None), (2, "its link closed")]
    assert [(a["from"], a["to"], a["machines"]) for a in section["earlier"]] == [(0.0, 5.0, None)]
