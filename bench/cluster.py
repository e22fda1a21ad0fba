"""A simulated sweep, local vs `--cluster`: wall time of each whole `harness run` command, the speed-up, and
every variant's digest (equal, or the bench fails).

    .venv/bin/python bench/cluster.py [--scenario scenarios/nye-fleet-10k.yaml] [--workers 2] [--repeat 1]
                                      [--order local,cluster]

The cluster is started here as an operator starts one (`dask scheduler`, then `dask worker --nthreads 1`
per worker, each its own process tree on loopback) and stopped by process group; its start-up is not in
the cluster run's wall time (a cluster is started once and runs many sweeps). Both runs write their store,
text report (and no HTML page: HARNESS_HTML=off for both). The machine is shared: the load average before
each run is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent


def start_cluster(workers: int, folder: Path) -> tuple[str, list[subprocess.Popen]]:
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = folder / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.time() + 120
    while not scheduler_file.exists():
        if time.time() > deadline:
            raise SystemExit("the scheduler did not start within 120 s")
        time.sleep(0.05)
    for _ in range(workers):
        procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1", "--local-directory", str(folder),
                                       "--death-timeout", "60"], start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    address = json.loads(scheduler_file.read_text())["address"]
    from distributed import Client
    with Client(address, timeout=60) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, procs


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def tree_cpu(procs: list[subprocess.Popen]) -> float:
    """CPU seconds (user + system) used so far by the cluster's processes and their children."""
    import psutil
    total = 0.0
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            for member in [root, *root.children(recursive=True)]:
                times = member.cpu_times()      # children_*: the trial processes a worker started and reaped
                total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
    return total


def harness_run(scenario: Path, out: Path, cluster: str | None, procs: list[subprocess.Popen],
                extra: list[str]) -> dict:
    argv = [str(Path(sys.executable).with_name("harness")), "run", str(scenario), "--out", str(out), "--quiet",
            *extra]
    if cluster:
        argv += ["--cluster", cluster]
    load = os.getloadavg()[0]
    cluster_cpu = tree_cpu(procs)
    scheduler_before = tree_cpu(procs[:1])
    children = os.times()
    started = time.perf_counter()
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HARNESS_HTML": "off"})
    wall = time.perf_counter() - started
    after = os.times()
    cpu = after.children_user + after.children_system - children.children_user - children.children_system
    workers_cpu = tree_cpu(procs) - cluster_cpu if cluster else 0.0
    scheduler_cpu = tree_cpu(procs[:1]) - scheduler_before if cluster else 0.0
    if run.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {run.returncode}:\n{run.stderr[-3000:]}")
    run_dir = next(p for p in out.iterdir() if (p / "run.db").exists())
    db = sqlite3.connect(str(run_dir / "run.db"))
    trials = {variant: json.loads(detail) for variant, detail in
              db.execute("SELECT variant, detail FROM trials ORDER BY id")}
    placed = db.execute("SELECT value FROM meta WHERE key='cluster'").fetchone()
    trial_cpu = sum(t["cpu_seconds"] for t in json.loads(placed[0])["trials"].values()) if placed else None
    db.close()
    shutil.rmtree(run_dir)
    return {"wall": wall, "load": load, "exit": run.returncode, "cpu": cpu, "workers_cpu": workers_cpu,
            "trial_cpu": trial_cpu, "scheduler_cpu": scheduler_cpu,
            "digests": {v: d["digest"] for v, d in trials.items()},
            "trial_seconds": sum(d["wall_seconds"] for d in trials.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "nye-fleet-10k.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--order", default="local,cluster")
    parser.add_argument("--variant", help="run only this variant (default: the whole sweep)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))   # unwind: the cluster is stopped
    folder = Path(tempfile.mkdtemp(prefix="harness-bench-cluster-"))
    procs: list[subprocess.Popen] = []
    try:
        started = time.perf_counter()
        address, procs = start_cluster(args.workers, folder)
        print(f"cluster of {args.workers} workers at {address}: up in {time.perf_counter() - started:.1f}s",
              file=sys.stderr, flush=True)
        results: dict[str, list[dict]] = {"local": [], "cluster": []}
        for i in range(args.repeat):
            for how in args.order.split(","):
                r = harness_run(args.scenario.resolve(), folder, address if how == "cluster" else None, procs,
                                ["--variant", args.variant] if args.variant else [])
                results[how].append(r)
                print(f"{how} #{i + 1}: wall {r['wall']:.1f}s (trials' own time {r['trial_seconds']:.1f}s), CPU "
                      f"{r['cpu']:.1f}s in the harness command + {r['workers_cpu']:.1f}s in the cluster (scheduler "
                      f"{r['scheduler_cpu']:.1f}s"
                      + (f", trial processes {r['trial_cpu']:.1f}s" if r["trial_cpu"] is not None else "") + "), "
                      f"exit {r['exit']}, load average before {r['load']:.1f}", file=sys.stderr, flush=True)
    finally:
        stop_cluster(procs)
        shutil.rmtree(folder, ignore_errors=True)
    local, spread = results["local"], results["cluster"]
    reference = local[0]["digests"]
    same = all(r["digests"] == reference for r in local + spread)
    rows = [[variant, digest[:16], "yes" if all(r["digests"].get(variant) == digest for r in local + spread)
             else "NO"] for variant, digest in reference.items()]
    print(tabulate(rows, headers=["variant", "digest", "same local and cluster"]))
    best_local = min(r["wall"] for r in local)
    best_cluster = min(r["wall"] for r in spread)
    print()
    print(tabulate([["local", " ".join(f"{r['wall']:.1f}" for r in local), f"{best_local:.1f}", ""],
                    [f"--cluster ({args.workers} workers)", " ".join(f"{r['wall']:.1f}" for r in spread),
                     f"{best_cluster:.1f}", f"{best_local / best_cluster:.2f}x"]],
                   headers=["run", "wall s (each)", "best s", "speed-up (best/best)"]))
    if not same:
        raise SystemExit("digests differ between runs")


if __name__ == "__main__":
    main()
