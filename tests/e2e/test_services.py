"""Real third-party services from Debian (installed by scripts/setup.sh, started by the harness, each host
on its own port in its own folder, never as a system service): nginx, Varnish, redis-server, memcached,
each under a short mixed load through its own protocol."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import HARNESS, REPO, query, write_scenario

SCENARIOS = REPO / "scenarios"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def need(program: str) -> None:
    # Not a skip: the project's set-up installs these, and a missing one is a broken set-up.
    assert shutil.which(program) or Path(f"/usr/sbin/{program}").exists(), f"{program} is not installed (scripts/setup.sh)"


def short_run(tmp_path: Path, text: str) -> dict:
    scenario = write_scenario(tmp_path, text)
    result = run(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"], tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return json.loads(result.stdout)


def ok_ratio(trial: dict) -> float:
    overall = trial["overall"]
    return overall["ok"] / overall["offered"]


LOAD = """
load:
  - {hold: {rate: 400, for: 3s, name: hold}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_nginx_get_post_mix(tmp_path: Path, workers: int) -> None:
    """(With two driver workers too: per-request counts, histograms and statuses merged from both.)"""
    need("nginx")
    report = short_run(tmp_path, f"""
name: t-nginx
target:
  root: {SCENARIOS}
  command: [nginx, -p, "{{dir}}", -c, "{{dir}}/nginx.conf", -e, "{{dir}}/error.log"]
  files: {{nginx.conf: services/nginx.conf}}
  protocol: http
  requests:
    - {{name: get, weight: 80, request: "GET /item/{{key}}", expect_status: 200}}
    - {{name: post, weight: 20, request: {{method: POST, path: /submit, body: "{{value}}"}}, value_size: 100,
       expect_status: 201}}
  ready: {{http: /health, status: 200}}
fleet: {{hosts: 2}}
client: {{workers: {workers}}}
{LOAD}
expect:
  - {{error_rate: "< 0.1%", request: post}}
  - {{p99_latency: "< 2s", request: get, phase: hold}}
""")
    trial = report["trials"][0]
    assert ok_ratio(trial) >= 0.999
    requests = trial["requests"]
    assert set(requests) == {"get", "post"}
    assert requests["get"]["overall"]["ok"] > 3 * requests["post"]["overall"]["ok"] > 0
    assert trial["replies"]["status"] == {"200": requests["get"]["overall"]["ok"],
                                          "201": requests["post"]["overall"]["ok"]}
    assert {e["request"] for e in report["expectations"]} == {"get", "post"}
    assert all(e["held"] for e in report["expectations"])
    assert requests["get"]["overall"]["offered"] + requests["post"]["overall"]["offered"] == \
        trial["overall"]["offered"]
    assert trial["detail"]["driver_workers"] == workers


@pytest.mark.slow
def test_varnish_answers_from_vcl_and_a_404_can_be_expected(tmp_path: Path) -> None:
    need("varnishd")
    report = short_run(tmp_path, f"""
name: t-varnish
target:
  root: {SCENARIOS}
  command: [varnishd, -F, -a, "127.0.0.1:{{port}}", -f, "{{dir}}/default.vcl", -n, "{{dir}}/varnish",
            -s, "malloc,32m", -j, none, -T, none]
  files: {{default.vcl: services/varnish.vcl}}
  protocol: http
  requests:
    - {{name: item, weight: 90, request: "GET /item/{{key}}", expect_status: 2xx}}
    - {{name: missing, weight: 10, request: "GET /x/{{key}}", expect_status: 404}}
  ready: {{http: /health, status: 200, timeout: 30s}}
  stop_grace: 5s
fleet: {{hosts: 2}}
{LOAD}
expect:
  - {{error_rate: "< 0.1%", request: missing}}
""")
    trial = report["trials"][0]
    assert ok_ratio(trial) >= 0.999
    assert trial["replies"]["status"]["404"] == trial["requests"]["missing"]["overall"]["ok"] > 0
    assert report["expectations"][0]["held"]


@pytest.mark.slow
def test_redis_every_get_matches_the_key_set_up(tmp_path: Path) -> None:
    need("redis-server")
    report = short_run(tmp_path, """
name: t-redis
target:
  command: [redis-server, --port, "{port}", --bind, 127.0.0.1, --save, "", --appendonly, no, --dir, "{dir}"]
  protocol: resp
  value_size: 16
  requests:
    - {name: get, weight: 90, request: [GET, "{key}"], expect: "^{key}:"}
    - {name: incr, weight: 10, request: [INCR, "n:{key}"], expect: "^:[0-9]+$"}
  setup:
    - {request: [SET, "{key}", "{key}:{value}"], keys: all, expect: "^\\\\+OK$"}
  ready: {request: PING, expect: "^\\\\+PONG$"}
fleet: {hosts: 2}
client: {keys: {space: 2000}}
""" + LOAD + """
expect:
  - {error_rate: "== 0%", request: get}
""")
    trial = report["trials"][0]
    get = trial["requests"]["get"]["overall"]
    # Every GET of a key loaded by set-up got its own bulk reply: each value starts with its key.
    assert get["ok"] == get["sent"] > 500 and get["errors"]["bad_reply"] == 0
    assert trial["replies"]["bad_kinds"] == {}
    assert [s["requests"] for s in trial["setup"] if s["kind"] == "setup"] == [2000, 2000]
    assert report["expectations"][0]["held"]


@pytest.mark.slow
def test_memcached_get_set_with_setup(tmp_path: Path) -> None:
    need("memcached")
    report = short_run(tmp_path, """
name: t-memcached
target:
  command: [memcached, -l, 127.0.0.1, -p, "{port}", -U, "0", -m, "32", -u, root]
  protocol: memcached
  value_size: 20
  requests:
    - {name: get, weight: 80, request: "get {key}\\r\\n", expect: "^{key}:"}
    - {name: set, weight: 15, request: "set {key} 0 0\\r\\n{key}:{value}\\r\\n", expect: "^STORED$"}
    - {name: miss, weight: 5, request: "get none-{seq}\\r\\n", expect: "^END$"}
  setup:
    - {request: "set {key} 0 0\\r\\n{key}:{value}\\r\\n", keys: all, expect: "^STORED$"}
  ready: {request: "version\\r\\n", expect: "^VERSION "}
fleet: {hosts: 2}
client: {keys: {space: 1000}}
""" + LOAD + """
expect:
  - {error_rate: "== 0%", request: get}
""")
    trial = report["trials"][0]
    assert ok_ratio(trial) >= 0.999
    assert set(trial["requests"]) == {"get", "set", "miss"}
    assert trial["requests"]["get"]["overall"]["ok"] == trial["requests"]["get"]["overall"]["sent"]
    assert report["expectations"][0]["held"]


@pytest.mark.slow
def test_nginx_host_loss_moves_the_share_within_a_second(tmp_path: Path) -> None:
    need("nginx")
    report = short_run(tmp_path, f"""
name: t-nginx-loss
seed: 3
target:
  root: {SCENARIOS}
  command: [nginx, -p, "{{dir}}", -c, "{{dir}}/nginx.conf", -e, "{{dir}}/error.log"]
  files: {{nginx.conf: services/nginx.conf}}
  protocol: http
  request: "GET /item/{{key}}"
  ready: {{http: /health}}
fleet: {{hosts: 4, balancer: round-robin}}
load:
  - {{hold: {{rate: 400, for: 6s}}}}
faults:
  - {{kind: host-loss, at: 2s, hosts: 1, how: kill, down_for: 30s}}
""")
    trial = report["trials"][0]
    killed = trial["host_losses"][0]["hosts"][0]
    rows = query(Path(report["run_dir"]), "SELECT t, host, sent FROM host_samples WHERE trial=1")
    sent = {(r["t"], r["host"]): r["sent"] for r in rows}
    before = sum(sent[(t, h)] for t in (0, 1) for h in range(4)) / 4   # per host, over 2 s
    assert all(sent[(t, h)] > 30 for t in (0, 1) for h in range(4))
    # Within the second of the kill the killed host stops getting requests; the survivors take its share.
    assert sent[(2, killed)] < 0.1 * before / 2
    assert all(sent[(t, killed)] == 0 for t in (3, 4))
    for host in set(range(4)) - {killed}:
        assert sent[(3, host)] + sent[(4, host)] > 1.15 * before   # expected 4/3
    assert trial["overall"]["ok"] / trial["overall"]["offered"] > 0.99
