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
