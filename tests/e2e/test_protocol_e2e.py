"""Protocols end to end against small servers the test starts through the harness: what goes out on the
wire, and what happens when replies are not the protocol (never shifted onto later requests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HARNESS, query, write_scenario

SERVERS = Path(__file__).resolve().parents[1] / "fixtures" / "servers"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_keyless_template_is_sent_exactly_as_written(tmp_path: Path) -> None:
    capture = tmp_path / "wire.bin"
    scenario = write_scenario(tmp_path, f"""
name: keyless
target:
  command: [{sys.executable}, {SERVERS / 'capture_server.py'}, --port, "{{port}}", --capture, {capture}]
  request: "PING\\r\\n"
  expect_reply: "^\\\\+PONG"
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 200, for: 2s}}}}]
""")
    result = run(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    overall = json.loads(result.stdout)["trials"][0]["overall"]
    assert overall["sent"] > 200 and overall["ok"] == overall["sent"]
    # Byte for byte: every request is the template as written, nothing appended (no key, no newline).
    assert capture.read_bytes() == b"PING\r\n" * overall["sent"]


@pytest.mark.slow
def test_resp_reply_that_is_not_resp_is_a_protocol_error_not_a_shift(tmp_path: Path) -> None:
    """A server answering `$5\\r\\nab\\r\\n` (5 bytes announced, 2 sent) to every command: the parser reads
    the next reply's header as data, finds no CRLF, and calls it a protocol error: no reply is ever
    paired with a later request, and the connection's requests in flight are bad replies."""
    scenario = write_scenario(tmp_path, f"""
name: bad-resp
target:
  command: [{sys.executable}, {SERVERS / 'capture_server.py'}, --port, "{{port}}", --capture, {tmp_path / 'w'},
            --reply, "$5\\\\r\\\\nab\\\\r\\\\n", --per, "*"]
  protocol: resp
  request: [GET, "{{key}}"]
fleet: {{hosts: 1}}
client: {{timeout: 300ms, probe_interval: 100ms}}
load: [{{hold: {{rate: 100, for: 2s}}}}]
expect:
  - {{error_rate: "< 1%"}}
""")
    result = run(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]        # the expectation fails; nothing crashes
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    trial = report["trials"][0]
    assert trial["overall"]["ok"] == 0, "no garbage reply may be taken for a good one"
    assert trial["replies"]["bad_kinds"].get("protocol_error", 0) >= 1
    assert trial["overall"]["errors"]["bad_reply"] == trial["replies"]["bad_kinds"]["protocol_error"]
    errors = trial["protocol_errors"]
    assert errors and errors[0]["protocol"] == "resp"
    assert errors[0]["excerpt"].startswith("$5\r\nab\r\n$5")
    offered = trial["overall"]["offered"]
    errors_total = sum(trial["overall"]["errors"].values())
    assert offered == trial["overall"]["ok"] + errors_total, "every arrival is accounted for"
    run_dir = Path(report["run_dir"])
    assert query(run_dir, "SELECT count(*) AS n FROM events WHERE kind='protocol-error'")[0]["n"] >= 1
