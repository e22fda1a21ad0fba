"""Fault windows from a trial's events when several machines arm one fault (--cluster: each machine's fault
proxy or cgroups act on its own hosts), and the fleet's network summary from each machine's proxy."""

from __future__ import annotations

from harness.analysis.faultreport import fault_windows, network_faults
from harness.present.html import fault_windows as html_windows
from harness.run.faults.network import merge_summaries


def _net(t: float, kind: str, machine: int | None, hosts: list[int], **extra: object) -> dict:
    detail = {"fault": 0, "fault_kind": "latency", "family": "network", "label": "latency 50 ms",
              "hosts": hosts, "links": [f"driver->h{h}" for h in hosts], **extra}
    if machine is not None:
        detail["machine"] = machine
    return {"t": t, "kind": kind, "host": None, "detail": detail}


def test_one_window_per_arm_over_machines_with_hosts_links_and_counts_joined() -> None:
    events = [
        _net(2.0003, "fault-arm", 2, [1, 3]),
        _net(2.0001, "fault-arm", 1, [0, 2]),
        _net(5.0002, "fault-disarm", 1, [0, 2], counts={"bytes_delayed": 100, "chunks": 4}),
        _net(5.0004, "fault-disarm", 2, [1, 3], counts={"bytes_delayed": 50, "chunks": 2}),
        # the second window: machine 1's arm comes after machine 2 disarmed it (clocks a little apart)
        _net(8.0, "fault-arm", 2, [1, 3]),
        _net(9.0, "fault-disarm", 2, [1, 3], counts={"bytes_delayed": 7}),
        _net(9.001, "fault-arm", 1, [0, 2]),
    ]
    windows = fault_windows(events, end=12.0, family="network")
    assert len(windows) == 2
    first, second = windows
    assert (first["from"], first["to"]) == (2.0001, 5.0004)
    assert first["hosts"] == [0, 1, 2, 3] and first["links"] == ["driver->h0", "driver->h1", "driver->h2", "driver->h3"]
    assert first["counts"] == {"bytes_delayed": 150, "chunks": 6}
    # machine 1 never disarmed its second arm: the window runs to the trial's end
    assert (second["from"], second["to"]) == (8.0, 12.0) and second["hosts"] == [0, 1, 2, 3]
    assert second["counts"] == {"bytes_delayed": 7}
    names = {h: f"h{h}" for h in range(4)}
    (fault,) = network_faults(events, {}, 12.0, names)
    assert fault["hosts"] == ["h0", "h1", "h2", "h3"] and len(fault["windows"]) == 2


def test_one_machine_is_as_before_a_rearm_is_a_new_window() -> None:
    events = [_net(1.0, "fault-arm", None, [0]), _net(2.0, "fault-disarm", None, [0], counts={"chunks": 1}),
              _net(3.0, "fault-arm", None, [0]), _net(3.0, "fault-disarm", None, [0], counts={"chunks": 2})]
    windows = fault_windows(events, end=9.0, family="network")
    assert [(w["from"], w["to"], w["counts"]) for w in windows] == [(1.0, 2.0, {"chunks": 1}),
                                                                     (3.0, 3.0, {"chunks": 2})]


def test_the_html_timeline_draws_a_fault_armed_on_two_machines_once() -> None:
    events = [_net(6.0001, "fault-arm", 1, [0]), _net(6.0001, "fault-disarm", 1, [0]),
              _net(6.0004, "fault-arm", 2, [1]), _net(6.0004, "fault-disarm", 2, [1]),
              _net(8.0, "fault-arm", 1, [0]), _net(8.5, "fault-disarm", 1, [0])]
    spans = [(w.start, w.end) for w in html_windows(events, end=10.0)]
    assert spans == [(6.0001, 6.0004), (8.0, 8.5)]


def test_network_summaries_of_two_machines_sum_their_counts_and_keep_every_link() -> None:
    one = {"faults": {"0": {"bytes_delayed": 10, "connections_reset": 1}, "1": {}},
           "links": {"driver->h0": {"port": 1, "connections": 3}}}
    two = {"faults": {"0": {"bytes_delayed": 5, "connections_reset": 2}, "1": {"connections_refused": 4}},
           "links": {"driver->h1": {"port": 2, "connections": 1}}}
    merged = merge_summaries([one, two])
    assert merged["faults"] == {"0": {"bytes_delayed": 15, "connections_reset": 3}, "1": {"connections_refused": 4}}
    assert set(merged["links"]) == {"driver->h0", "driver->h1"}


def test_a_machine_lost_while_armed_ends_its_part_of_the_window_there() -> None:
    events = [
        _net(2.0, "fault-arm", 1, [0]), _net(2.001, "fault-arm", 2, [1]),
        {"t": 4.0, "kind": "machine-loss", "host": None, "detail": {"machine": 2, "hosts": [1]}},
        _net(6.001, "fault-disarm", 1, [0], counts={"chunks": 3}),
    ]
    (window,) = fault_windows(events, end=11.0, family="network")
    assert (window["from"], window["to"]) == (2.0, 6.001) and window["lost"] == [2]
    assert window["counts"] == {"chunks": 3}          # machine 2's part is not known: not made up
    assert [(w.start, w.end) for w in html_windows(events, end=11.0)] == [(2.0, 6.001)]
    # every machine holding it lost: the window ends with the last loss
    events = [_net(2.0, "fault-arm", 2, [1]),
              {"t": 4.5, "kind": "machine-lost", "host": None, "detail": {"machine": 2, "hosts": [1]}}]
    (window,) = fault_windows(events, end=11.0, family="network")
    assert (window["from"], window["to"]) == (2.0, 4.5)


def test_two_faults_with_one_label_stay_two_windows_in_the_html_timeline() -> None:
    one = _net(2.0, "fault-arm", None, [0])
    other = {**_net(4.0, "fault-arm", None, [1]), "detail": {**_net(4.0, "fault-arm", None, [1])["detail"], "fault": 1}}
    events = [one, other, _net(5.0, "fault-disarm", None, [0]),
              {**other, "t": 9.0, "kind": "fault-disarm"}]
    assert sorted((w.start, w.end) for w in html_windows(events, end=10.0)) == [(2.0, 5.0), (4.0, 9.0)]
