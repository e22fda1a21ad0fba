"""What the fault proxy costs with no fault armed: requests/s, p50/p99 latency and the harness's CPU per request
through the proxy against the direct path, in one run (the two paths interleaved at each offered rate).

Both paths are the harness's own runner, driver and store against a real fleet of echo hosts; the proxied one
has a network fault whose window never opens (`{kind: stall, from: 1h}`), so every driver link goes through the
proxy (harness/run/faults/network) and nothing is ever armed. Latency is measured from each request's intended send time,
merged over the run from the stored HDR histograms.

    .venv/bin/python bench/proxy.py [--seconds 4] [--rates 1000,4000,8000,12000] [--hosts 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import trio
from hdrh.histogram import HdrHistogram
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.scenario.loader import load_scenario_text  # noqa: E402
from harness.run.runner import RunOptions, run_scenario  # noqa: E402

SCENARIO = """
name: bench-proxy-{path}
seed: 1
target:
  root: {repo}
  command: [targets/echo/echo-server, --port, "{{port}}"]
  isolation: none
fleet: {{hosts: {hosts}, balancer: least-loaded}}
client: {{timeout: 1s, connections: 2}}
load:
  - {{hold: {{rate: {rate}, for: {seconds}s}}}}
{faults}
"""
NEVER_ARMED = "faults: [{kind: stall, from: 1h}]   # the proxy on every driver link, nothing armed"


def measure(path: str, rate: int, seconds: float, hosts: int, out: Path) -> dict[str, float]:
    text = SCENARIO.format(path=path, repo=REPO, rate=rate, seconds=seconds, hosts=hosts,
                           faults=NEVER_ARMED if path == "proxy" else "")
    scenario = load_scenario_text(text, "bench.yaml", base=out)
    cpu = time.process_time()
    result = trio.run(run_scenario, scenario, RunOptions(out_dir=out, status=False))
    cpu = time.process_time() - cpu
    db = sqlite3.connect(str(result.run_dir / "run.db"))
    rows = db.execute("SELECT offered, ok, timeout + conn_error + no_host + bad_reply, hist FROM samples").fetchall()
    db.close()
    total = HdrHistogram(1, 3_600_000_000, 3)
    for _, _, _, hist in rows:
        if hist:
            total.add(HdrHistogram.decode(hist))
    ok = sum(r[1] for r in rows)
    return {"offered": sum(r[0] for r in rows) / seconds, "ok": ok / seconds, "errors": sum(r[2] for r in rows),
            "p50_us": total.get_value_at_percentile(50), "p99_us": total.get_value_at_percentile(99),
            "cpu_us_per_req": cpu / max(ok, 1) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rates", default="1000,4000,8000,12000")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per path and rate (interleaved)")
    args = parser.parse_args()
    (REPO / "targets" / "echo" / "echo-server").exists() or sys.exit("build the targets first: make -C targets")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (int(r) for r in args.rates.split(",")):
            results: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
            for _ in range(args.repeats):
                for path in ("direct", "proxy"):
                    results[path].append(measure(path, rate, args.seconds, args.hosts, Path(tmp)))
            median = {path: {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
                      for path, runs in results.items()}
            d, p = median["direct"], median["proxy"]
            rows.append([rate, f"{d['ok']:.0f}", f"{p['ok']:.0f}", int(d["errors"]), int(p["errors"]),
                         f"{d['p50_us'] / 1e3:.2f}", f"{p['p50_us'] / 1e3:.2f}", f"{(p['p50_us'] - d['p50_us']) / 1e3:+.2f}",
                         f"{d['p99_us'] / 1e3:.2f}", f"{p['p99_us'] / 1e3:.2f}", f"{(p['p99_us'] - d['p99_us']) / 1e3:+.2f}",
                         f"{d['cpu_us_per_req']:.0f}", f"{p['cpu_us_per_req']:.0f}"])
            print(f"rate {rate}: done", file=sys.stderr)
    print(tabulate(rows, headers=["offered/s", "ok/s direct", "ok/s proxy", "errors direct", "errors proxy",
                                  "p50 ms direct", "p50 ms proxy", "added p50", "p99 ms direct", "p99 ms proxy",
                                  "added p99", "harness CPU us/req direct", "proxy"]))


if __name__ == "__main__":
    main()
