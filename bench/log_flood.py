"""What draining flooding targets' output costs the driver.

Runs the same open-loop load against 4 echo hosts three times: quiet hosts; hosts that each also run
`yes` into /dev/null (the CPU the writers take, without the harness draining anything); and hosts whose
`yes` writes into their stdout (a full-speed writer: the pipe is drained as fast as the kernel fills it)
while the harness keeps every log within log_max. Prints the driver's send lag (intended -> actual send time),
the achieved rate and errors, what the pump read and dropped, and the harness's CPU time, side by side.

    .venv/bin/python bench/log_flood.py [--seconds 8] [--rate 4000] [--log-max 4MiB]
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.scenario.loader import load_scenario_text  # noqa: E402
from harness.run.runner import run_scenario  # noqa: E402
from harness.run.options import RunOptions  # noqa: E402

SCENARIO = """
name: bench-log-flood
seed: 1
target:
  root: {repo}
  command: {command}
  log_max: {log_max}
fleet: {{hosts: 4, balancer: least-loaded}}
client: {{timeout: 1s, connections: 2}}
load:
  - {{hold: {{rate: {rate}, for: {seconds}s}}}}
"""
QUIET = '[targets/echo/echo-server, --port, "{port}"]'
FLOOD = '[sh, -c, "yes full-speed-writer-of-the-log-flood-bench & exec {root}/targets/echo/echo-server --port {port}"]'
# The same writers with their output sent elsewhere: what the CPU they take costs, without the pump.
ELSEWHERE = ('[sh, -c, "yes full-speed-writer-of-the-log-flood-bench > /dev/null & '
             'exec {root}/targets/echo/echo-server --port {port}"]')


def measure(command: str, rate: int, seconds: float, log_max: str, out: Path) -> dict[str, float]:
    text = SCENARIO.format(repo=REPO, command=command, rate=rate, seconds=seconds, log_max=log_max)
    scenario = load_scenario_text(text, "bench.yaml", base=out)
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = trio.run(run_scenario, scenario, RunOptions(out_dir=out, status=False))
    after = resource.getrusage(resource.RUSAGE_SELF)
    db = sqlite3.connect(str(result.run_dir / "run.db"))
    detail = json.loads(db.execute("SELECT detail FROM trials").fetchone()[0])
    ok, errors = db.execute("SELECT sum(ok), sum(timeout+conn_error+no_host+bad_reply) FROM samples").fetchone()
    dropped = [json.loads(d) for (d,) in db.execute("SELECT detail FROM events WHERE kind='log-dropped'")]
    db.close()
    lag = detail["send_lag_us"]
    largest = max((p.stat().st_size for p in result.run_dir.glob("hosts/t1/h*/std*.log*")), default=0)
    return {"ok": ok / seconds, "errors": errors, "lag_p50_us": lag["50"], "lag_p99_us": lag["99"],
            "lag_p999_us": lag["99.9"], "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "written_mb": sum(d["written"] for d in dropped) / 1e6,
            "dropped_mb": sum(d["stdout"] + d["stderr"] for d in dropped) / 1e6, "largest_log_mb": largest / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=4000)
    parser.add_argument("--log-max", default="4MiB")
    args = parser.parse_args()
    subprocess.run(["make", "-s", "-C", str(REPO / "targets" / "echo")], check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in (("quiet", QUIET), ("yes > /dev/null", ELSEWHERE), ("yes > stdout (pump)", FLOOD)):
            r = measure(command, args.rate, args.seconds, args.log_max, Path(tmp))
            rows.append([name, f"{r['ok']:.0f}", r["errors"], r["lag_p50_us"], r["lag_p99_us"], r["lag_p999_us"],
                         f"{r['cpu_s']:.1f}", f"{r['written_mb']:.0f}", f"{r['dropped_mb']:.0f}",
                         f"{r['largest_log_mb']:.2f}"])
    print(tabulate(rows, headers=["hosts", "ok/s", "errors", "lag p50 µs", "lag p99 µs", "lag p99.9 µs",
                                  "harness CPU s", "logs written MB", "dropped MB", "largest log MB"]))
    print(f"\n4 echo hosts, {args.rate}/s for {args.seconds:g}s, log_max {args.log_max}; harness CPU includes "
          f"start-up and the pump thread")


if __name__ == "__main__":
    main()
