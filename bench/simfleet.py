"""What does a simulated fleet cost? Two benchmarks.

The default: whole `harness run` commands, each in its own process (store, text report and HTML report
included, as a user runs them), repeated: wall time, CPU time, peak RSS of the harness process (its own
rusage from wait4), the crashes, and the trial's digest (SHA-256 over its samples, events, crash rows
and crash counts), which must be the same in every repeat (same seed, same night):

    .venv/bin/python bench/simfleet.py [--repeat 2] [--cases 12k-cascade,10k,10k-64mib]

  12k-cascade  scenarios/nye-fleet-12k-cascade.yaml: 12,000 hosts, 8 h, cascades at the midnight spike
  10k          scenarios/nye-fleet-10k.yaml --variant hosts-10k: 10,000 hosts, 48 MiB budgets (cascades)
  10k-64mib    scenarios/nye-fleet-10k.yaml --variant hosts-10k-64mib: 64 MiB budgets (survives)

--scaling: the simulation alone (harness.sim.run.run_to_dir, no report) for 1k, 10k and 100k hosts over
the NYE night with the load scaled to the fleet, one night that survives (64 MiB budgets) and one that
cascades (48 MiB), as docs/simulation.md's cost table:

    .venv/bin/python bench/simfleet.py --scaling [--hosts 1000,10000,100000] [--nights survives,cascades]
                                       [--tracemalloc]

The machine is shared: each case prints the load average before it, and the spread over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
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
CASES = {
    "12k-cascade": ["scenarios/nye-fleet-12k-cascade.yaml"],
    "10k": ["scenarios/nye-fleet-10k.yaml", "--variant", "hosts-10k"],
    "10k-64mib": ["scenarios/nye-fleet-10k.yaml", "--variant", "hosts-10k-64mib"],
}


# --- whole `harness run` commands ------------------------------------------------------------------

def run_command(case: str) -> dict:
    """One `harness run` in a child process; its own wall time, CPU time and peak RSS."""
    harness = Path(sys.executable).with_name("harness")
    with tempfile.TemporaryDirectory() as out:
        argv = [str(harness), "run", *CASES[case], "--out", out, "--quiet"]
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            started = time.perf_counter()
            child = subprocess.Popen(argv, cwd=REPO, stdout=stdout, stderr=stderr)
            try:
                # wait4: this child's own rusage (RUSAGE_CHILDREN would give the largest of all children)
                _, status, usage = os.wait4(child.pid, 0)
            except BaseException:
                child.terminate()              # the bench was stopped: so is its harness run
                child.wait()
                raise
            wall = time.perf_counter() - started
            code = os.waitstatus_to_exitcode(status)
            child.returncode = code
            stderr.seek(0)
            if code not in (0, 1):        # 1: an expectation failed, still a complete run
                raise SystemExit(f"{' '.join(argv)} exited {code}:\n{stderr.read().decode()[-3000:]}")
            report_bytes = stdout.tell()
        run_dir = next(p for p in Path(out).iterdir() if (p / "run.db").exists())
        db = sqlite3.connect(str(run_dir / "run.db"))
        details = [json.loads(row[0]) for row in db.execute("SELECT detail FROM trials ORDER BY id")]
        db.close()
        db_bytes = sum(p.stat().st_size for p in run_dir.glob("run.db*"))
    return {"case": case, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_kib": usage.ru_maxrss,
            "crashes": sum(d["crashes"] for d in details), "crash_rows": sum(d.get("crash_rows", 0) for d in details),
            "sim_wall": sum(d["wall_seconds"] for d in details), "digest": ",".join(d["digest"][:16] for d in details),
            "min_alive": min(d["hosts_alive_min"] for d in details), "db_mib": db_bytes / 2**20,
            "report_kib": report_bytes / 1024, "exit": code}


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def commands(cases: list[str], repeat: int) -> None:
    rows = []
    for case in cases:
        runs = []
        for i in range(repeat):
            load = os.getloadavg()[0]
            run = run_command(case)
            runs.append(run)
            print(f"{case} #{i + 1}: wall {run['wall']:.1f}s cpu {run['cpu']:.1f}s peak RSS "
                  f"{run['rss_kib'] / 1024:.0f} MiB (simulation {run['sim_wall']:.1f}s), crashes {run['crashes']:,} ({run['crash_rows']:,} "
                  f"stored as rows), digest {run['digest']}, load average before {load:.1f}",
                  file=sys.stderr, flush=True)
        digests = {r["digest"] for r in runs}
        rows.append([case, spread([r["wall"] for r in runs], ".1f"), spread([r["cpu"] for r in runs], ".1f"),
                     spread([r["sim_wall"] for r in runs], ".1f"),
                     spread([r["rss_kib"] / 1024 for r in runs], ".0f"), f"{runs[0]['crashes']:,}",
                     f"{runs[0]['min_alive']:,}", f"{runs[0]['db_mib']:.1f}", runs[0]["digest"],
                     "yes" if len(digests) == 1 else f"NO ({len(digests)} different)"])
    print(tabulate(rows, headers=["case", "wall s", "cpu s", "simulation s", "peak RSS MiB", "crashes",
                                  "min alive", "run.db MiB", "digest", "same digest"]))
    print(f"({repeat} run(s) each; ranges are min-max over the runs)")


# --- the simulation alone, by fleet size --------------------------------------------------------

def child(hosts: int, night: str, traced: bool) -> dict:
    import tracemalloc
    from dataclasses import replace

    from harness.scenario.loader import load_scenario
    from harness.scenario.loadshape import LoadShape
    from harness.scenario import simparams as params
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
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as out:
        run_dir = run_to_dir(scenario, Path(out))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        db = sqlite3.connect(str(run_dir / "run.db"))
        detail = json.loads(db.execute("SELECT detail FROM trials").fetchone()[0])
        db_bytes = sum(p.stat().st_size for p in run_dir.glob("run.db*"))
        db.close()
    result = {"hosts": hosts, "night": night, "wall": wall, "cpu": cpu, "sim_wall": detail["wall_seconds"],
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


def scaling(hosts_list: list[int], nights: list[str], tracemalloc: bool) -> None:
    rows = []
    for night in nights:
        for hosts in hosts_list:
            print(f"{night} {hosts:,}: load average before {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            r = run_case(hosts, night, False)
            traced = run_case(hosts, night, True)["traced_peak"] if tracemalloc else None
            rows.append([night, f"{hosts:,}", f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{r['wall'] / 28800 * 1e6:.0f}",
                         f"{r['wall'] / 28800 / hosts * 1e9:.0f}", f"{r['maxrss_kib'] / 1024:.0f}",
                         f"{traced / 2**20:.0f}" if traced is not None else "-", f"{r['crashes']:,}",
                         f"{r['min_alive']:,}", f"{r['db_bytes'] / 2**20:.1f}"])
            print(tabulate([rows[-1]], tablefmt="plain"), file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["night", "hosts", "wall s", "cpu s", "us/tick", "ns/host-tick", "peak RSS MiB",
                                  "traced MiB", "crashes", "min alive", "run.db MiB"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--scaling", action="store_true", help="the simulation alone, by fleet size")
    parser.add_argument("--hosts", default="1000,10000,100000")
    parser.add_argument("--nights", default="survives,cascades")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("HOSTS", "NIGHT"), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # killed: unwind, so the temporary results directories are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.traced)))
    elif args.scaling:
        scaling([int(h) for h in args.hosts.split(",")], args.nights.split(","), args.tracemalloc)
    else:
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if unknown:
            parser.error(f"unknown case {unknown[0]!r} (cases: {', '.join(CASES)})")
        commands(args.cases.split(","), args.repeat)


if __name__ == "__main__":
    main()
