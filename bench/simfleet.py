"""What does a simulated fleet cost? Wall time and peak memory for 1k, 10k and 100k hosts over an
8-hour virtual night (scenarios/nye-fleet-10k.yaml with the load scaled to the fleet, so every
size sees the same load per host).

Each case runs in its own process (so peak RSS is its own): the whole simulated run, store
included (harness.sim.run.run_to_dir), but not the report. Two nights: "survives" (64 MiB
budgets: the fleet rides out the spike, the common quiet tick) and "cascades" (48 MiB: the fleet
dies at midnight and crash-loops, a few crashes per host, each one a Python-level event).

    .venv/bin/python bench/simfleet.py [--hosts 1000,10000,100000] [--nights survives,cascades]
                                       [--tracemalloc]

--tracemalloc adds the traced peak of Python and numpy allocations (slower: it runs each case again).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCENARIO = REPO / "scenarios" / "nye-fleet-10k.yaml"
BUDGETS = {"survives": "64MiB", "cascades": "48MiB"}


def child(hosts: int, night: str, traced: bool) -> dict:
    import tracemalloc
    from dataclasses import replace

    from harness.loader import load_scenario
    from harness.loadshape import LoadShape, PhaseSpec
    from harness.sim import params
    from harness.sim.run import run_to_dir

    scenario = load_scenario(SCENARIO)
    scale = hosts / scenario.fleet.hosts
    specs = [replace(spec, rate_from=None if spec.rate_from is None else spec.rate_from * scale,
                     rate_to=None if spec.rate_to is None else spec.rate_to * scale) for spec in scenario.load.specs]
    model = params.override(scenario.fleet.simulated, {"hosts": str(hosts), "memory.budget": BUDGETS[night]})
    scenario = replace(scenario, load=LoadShape.build(specs, scenario.duration),
                       fleet=replace(scenario.fleet, hosts=hosts, simulated=model), variants=())
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_dir = run_to_dir(scenario, Path(out))
        wall = time.perf_counter() - started
        import sqlite3
        db = sqlite3.connect(str(run_dir / "run.db"))
        detail = json.loads(db.execute("SELECT detail FROM trials").fetchone()[0])
        db_bytes = sum(p.stat().st_size for p in run_dir.glob("run.db*"))
        db.close()
    result = {"hosts": hosts, "night": night, "wall": wall, "sim_wall": detail["wall_seconds"],
              "crashes": detail["crashes"], "alive_end": detail["hosts_alive_end"],
              "min_alive": detail["hosts_alive_min"], "db_bytes": db_bytes,
              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if traced:
        result["traced_peak"] = tracemalloc.get_traced_memory()[1]
    return result


def run_case(hosts: int, night: str, traced: bool) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", str(hosts), night] + (["--traced"] if traced else []),
                             capture_output=True, text=True, cwd=REPO)
    if process.returncode != 0:
        raise SystemExit(f"case {hosts} {night} failed:\n{process.stderr}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1000,10000,100000")
    parser.add_argument("--nights", default="survives,cascades")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("HOSTS", "NIGHT"), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.traced)))
        return
    rows = []
    for night in args.nights.split(","):
        for hosts in (int(h) for h in args.hosts.split(",")):
            r = run_case(hosts, night, False)
            traced = run_case(hosts, night, True)["traced_peak"] if args.tracemalloc else None
            rows.append([night, f"{hosts:,}", f"{r['wall']:.1f}", f"{r['wall'] / 28800 * 1e6:.0f}",
                         f"{r['wall'] / 28800 / hosts * 1e9:.0f}", f"{r['maxrss_kib'] / 1024:.0f}",
                         f"{traced / 2**20:.0f}" if traced is not None else "-", f"{r['crashes']:,}",
                         f"{r['min_alive']:,}", f"{r['db_bytes'] / 2**20:.1f}"])
            print(tabulate([rows[-1]], tablefmt="plain"), file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["night", "hosts", "wall s", "us/tick", "ns/host-tick", "peak RSS MiB",
                                  "traced MiB", "crashes", "min alive", "run.db MiB"]))


if __name__ == "__main__":
    main()
