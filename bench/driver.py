"""How fast can one harness process drive an open-loop load against 8 echo hosts?

For each offered rate, runs a real fleet of 8 echo hosts for a few seconds (the harness's own
runner, store and driver) and reads back the send lag (intended -> actual send time), the achieved
rate and the errors. Prints a table and the highest rate whose p99 send lag stays under 1 ms.

    .venv/bin/python bench/driver.py [--seconds 5] [--rates 1000,2000,...]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.loader import load_scenario_text  # noqa: E402
from harness.runner import RunOptions, run_scenario  # noqa: E402

SCENARIO = """
name: bench-driver
seed: 1
target:
  root: {repo}
  command: [targets/echo/echo-server, --port, "{{port}}"]
fleet: {{hosts: 8, balancer: least-loaded}}
client: {{timeout: 1s, connections: 2}}
load:
  - {{hold: {{rate: {rate}, for: {seconds}s}}}}
"""


def measure(rate: int, seconds: float, out: Path) -> dict[str, float]:
    text = SCENARIO.format(repo=REPO, rate=rate, seconds=seconds)
    scenario = load_scenario_text(text, "bench.yaml", base=out)
    result = trio.run(run_scenario, scenario, RunOptions(out_dir=out, status=False))
    db = sqlite3.connect(str(result.run_dir / "run.db"))
    detail = json.loads(db.execute("SELECT detail FROM trials").fetchone()[0])
    offered, ok, errors, seconds_n = db.execute(
        "SELECT sum(offered), sum(ok), sum(timeout+conn_error+no_host+bad_reply), count(*) FROM samples").fetchone()
    db.close()
    lag = detail["send_lag_us"]
    return {"rate": rate, "offered": offered / seconds, "ok": ok / seconds, "errors": errors,
            "lag_p50_us": lag["50"], "lag_p99_us": lag["99"], "lag_p999_us": lag["99.9"], "lag_max_us": lag["100"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rates", default="1000,2000,4000,8000,12000,16000,20000,24000")
    args = parser.parse_args()
    subprocess.run(["make", "-s", "-C", str(REPO / "targets" / "echo")], check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (int(r) for r in args.rates.split(",")):
            rows.append(measure(rate, args.seconds, Path(tmp)))
            print(f"  rate {rate}: lag p99 {rows[-1]['lag_p99_us']} us, ok {rows[-1]['ok']:.0f}/s", file=sys.stderr)
    print(tabulate([[r["rate"], f"{r['offered']:.0f}", f"{r['ok']:.0f}", r["errors"], r["lag_p50_us"],
                     r["lag_p99_us"], r["lag_p999_us"], r["lag_max_us"]] for r in rows],
                   headers=["target rate/s", "offered/s", "ok/s", "errors", "lag p50 µs", "lag p99 µs",
                            "lag p99.9 µs", "lag max µs"]))
    good = [r["rate"] for r in rows if r["lag_p99_us"] < 1000 and r["errors"] == 0 and r["ok"] > 0.97 * r["rate"]]
    print(f"\nhighest rate with p99 send lag < 1 ms and no errors: {max(good) if good else 'none'}/s "
          f"(8 echo hosts, one harness process, {args.seconds:g}s per step)")


if __name__ == "__main__":
    main()
