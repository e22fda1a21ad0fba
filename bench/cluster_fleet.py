"""A real fleet over a local cluster whose workers are "machines" (each in its own network namespace), as the
tests make them: how fast a lost machine's share moves to the other one, and what the load looked like.

    .venv/bin/python bench/cluster_fleet.py [--hosts 8] [--rate 2000] [--repeat 1] [--load-from machines,command]

Each run: echo hosts spread over 2 machines, a constant rate for 16 s, machine 2 lost at 8 s. Printed per run:
the wall time of the command; from the loss to the last shard dropping a host of it (host-out events) and to a
standby taking over the lost shard's share; offered and ok per second around the loss; the send lag (p99) and
latency (p99) before and after. Needs root (namespaces) and the cluster extra.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests")]

import netns_machines as netns  # noqa: E402
from dask_local import cluster  # noqa: E402

SCENARIO = """
name: bench-cluster-fleet
seed: 11
target:
  root: {repo}
  build: [make, -s, -C, targets/echo]
  command: [targets/echo/echo-server, --port, "{{port}}", --host, "{{addr}}"]
  ready: {{tcp: "{{port}}", timeout: 10s}}
fleet: {{hosts: {hosts}, placement: spread}}
client: {{timeout: 500ms, connections: 2, load_from: {load_from}}}
load:
  - {{ramp: {{from: {rate}, to: {rate}, over: 1s}}}}
  - {{hold: {{for: 15s}}}}
faults:
  - {{kind: machine-loss, at: 8s, machine: 2}}
"""


def rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def one(address: str, folder: Path, hosts: int, rate: int, load_from: str) -> None:
    scenario = folder / f"fleet-{load_from}.yaml"
    scenario.write_text(SCENARIO.format(repo=REPO, hosts=hosts, rate=rate, load_from=load_from), encoding="utf-8")
    out = folder / f"results-{load_from}-{time.monotonic_ns()}"
    out.mkdir(mode=0o700)
    began = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "harness", "run", str(scenario), "--out", str(out), "--quiet",
                          "--cluster", address], cwd=REPO, capture_output=True, text=True,
                         env={"HARNESS_HTML": "off", **dict(__import__("os").environ)})
    wall = time.perf_counter() - began
    (run_dir,) = [p for p in out.iterdir() if (p / "run.db").exists()]
    db = run_dir / "run.db"
    detail = json.loads(rows(db, "SELECT detail FROM trials")[0][0])
    lost = next(m for m in detail["machines"] if m["lost"])
    lost_hosts = set(lost["hosts"])
    loss_t = rows(db, "SELECT t FROM events WHERE kind='machine-loss'")[0][0]
    outs = [t for t, host in rows(db, "SELECT t, host FROM events WHERE kind='host-out'") if host in lost_hosts
            and t >= loss_t]
    takeover = rows(db, "SELECT t FROM events WHERE kind='driver-takeover'")
    samples = rows(db, "SELECT t, offered, ok, p99 FROM samples ORDER BY t")
    print(f"load_from={load_from} hosts={hosts} rate={rate}/s: exit {run.returncode}, wall {wall:.1f}s; "
          f"machine {lost['machine']} lost at {loss_t:.3f}s; last host-out of its hosts "
          f"+{(max(outs) - loss_t) * 1e3:.1f} ms ({len(outs)} events); "
          + (f"standby took over +{(takeover[0][0] - loss_t) * 1e3:.1f} ms; " if takeover else "")
          + f"send lag p99 {detail['send_lag_us']['99'] / 1e3:.1f} ms; clocks: "
          + ", ".join(f"m{m['machine']} CLOCK_MONOTONIC {m['monotonic_offset_ms']:+.3f} ms (rtt {m['clock_rtt_ms']:.3f})"
                      for m in detail["machines"]))
    for t, offered, ok, p99 in samples:
        if 5 <= t <= 12:
            print(f"    t={t:2d}s offered {offered:5d} ok {ok:5d} p99 {p99 * 1e3 if p99 is not None else float('nan'):6.1f} ms")
    if run.returncode != 0:
        print(run.stderr[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--load-from", default="machines,command")
    args = parser.parse_args()
    reason = netns.available()
    if reason:
        sys.exit(f"bench/cluster_fleet.py: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-fleet-", dir="/root" if Path("/root").is_dir() else None))
    with netns.machines(2) as made:
        workers = [(made.exec_prefix(i), address) for i, address in enumerate(made.addresses)]
        with cluster(made.bridge_address, workers) as address:
            for _ in range(args.repeat):
                for load_from in args.load_from.split(","):
                    one(address, folder, args.hosts, args.rate, load_from)
    subprocess.run(["rm", "-rf", str(folder)], check=False)


if __name__ == "__main__":
    main()
