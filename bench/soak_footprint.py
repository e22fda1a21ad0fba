"""The harness's own footprint under an accelerated soak: is its RSS (and fd count) flat?

Runs a small real fleet (4 estats hosts, open-loop load, random allocation failures that crash a host
every few seconds -> cores + gdb/eu-stack triage + restarts, a host kill every 45 s) with rollups
starting after 30 s instead of an hour (`--rollup-after 30s --rollup-every 60s`: a 60-row window each
minute, as in a real soak), and prints the harness process's RSS / fds / threads every 30 s plus the
Theil-Sen slope of its own samples (harness.analysis.trends.run_trends(run)["harness"]).

    python bench/soak_footprint.py                       # the harness as it is, 8 minutes
    python bench/soak_footprint.py --mode both           # before the fix, then after
    python bench/soak_footprint.py --duration 5m --rate 400

`--mode before` runs the harness with harness.base.hist.release_histogram made a no-op, i.e. as it was
before the fix (hdrh histograms, which are reference cycles, are freed only when the cyclic GC runs,
so a rollup holds every decoded histogram of its window at once); `after` runs it as it is; `both`
runs before, then after. One run at a time: the machine is small and the numbers are about the
harness, not the fleet.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from harness.analysis.trends import fit_series, run_trends  # noqa: E402

SCENARIO = """\
name: soak-footprint
seed: 4242
target:
  root: {root}
  build: [make, -s, -C, targets/estats]
  command: [targets/estats/estats-server, --port, "{{port}}", --estats, "on", --service-ms, "20",
            --scratch-kb, "16", --stats-kb, "4"]
  restart: {{policy: always, backoff: 1s, max_backoff: 2s}}
  expect_reply: "^OK"
fleet: {{hosts: 4, balancer: least-loaded}}
client: {{timeout: 1s, connections: 2}}
load:
  - {{ramp: {{from: 50, to: {rate}, over: 10s}}}}
  - {{hold: {{for: 10h}}}}
faults:
  - {{kind: alloc-fail, mode: random, probability: {probability}%, min_size: 1KiB}}
  - {{kind: host-loss, every: 45s, from: 20s, hosts: 1, how: kill, down_for: 3s}}
"""


LAUNCH = "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))"
# As before the fix: histograms done with are left to the cyclic GC.
LAUNCH_BEFORE = ("import sys, harness.base.hist, harness.run.driver; harness.base.hist.release_histogram = "
                 "harness.run.driver.release_histogram = lambda h: None; from harness.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def run_once(mode: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"results-{mode}"
    scenario = work / "soak-footprint.yaml"
    scenario.write_text(SCENARIO.format(root=ROOT, rate=args.rate, probability=args.probability), encoding="utf-8")
    env = dict(os.environ)
    argv = [sys.executable, "-c", LAUNCH_BEFORE if mode == "before" else LAUNCH, "run", str(scenario), "--duration", args.duration, "--quiet", "--no-html",
            "--rollup-after", "30s", "--rollup-every", args.rollup_every, "--out", str(out)]
    print(f"== mode {mode}: harness {' '.join(argv[3:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    rows = []
    while proc.poll() is None:
        try:
            with me.oneshot():
                rss, fds, threads = me.memory_info().rss, me.num_fds(), me.num_threads()
        except psutil.Error:
            break
        rows.append((time.monotonic() - started, rss, fds, threads))
        print(f"  {rows[-1][0]:6.0f}s  rss {mib(rss):>7} MiB  fds {fds:3d}  threads {threads:2d}", flush=True)
        try:
            proc.wait(timeout=args.every)
        except subprocess.TimeoutExpired:
            pass
    stdout, stderr = proc.communicate()
    if proc.returncode not in (0, 1):
        print(stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"harness exited {proc.returncode}")
    run_dir = next(p for p in out.iterdir() if (p / "run.db").exists())
    harness = run_trends(run_dir)["harness"]
    rss, fds = harness["metrics"]["rss"], harness["metrics"]["fds"]
    import sqlite3
    db = sqlite3.connect(run_dir / "run.db")
    crashes = db.execute("SELECT count(*) FROM crashes").fetchone()[0]
    triaged = db.execute("SELECT count(*) FROM triage").fetchone()[0]
    rolled = db.execute("SELECT count(*) FROM samples WHERE span>1").fetchone()[0]
    if not rss or rss.get("slope") is None:
        # Under MIN_SECONDS of samples the combined verdict is "too short" without a slope: fit the one
        # series the same way run_trends does (warm-up skipped, per-minute medians, Theil-Sen), unjudged.
        wall, values = zip(*db.execute("SELECT wall, rss FROM harness_samples ORDER BY wall").fetchall())
        t = np.array(wall) - wall[0]
        rss = fit_series(t, t, np.array(values, dtype=float), "bytes")
    db.close()
    result = {"mode": mode, "run": str(run_dir), "samples": harness["samples"], "crashes": crashes,
              "triaged": triaged, "rolled_rows": rolled,
              "rss_first": rows[1][1] if len(rows) > 1 else None, "rss_last": rows[-1][1] if rows else None,
              "rss_max": max(r[1] for r in rows) if rows else None,
              "fds": (min(r[2] for r in rows[1:]), max(r[2] for r in rows[1:])) if len(rows) > 1 else (0, 0),
              "slope": rss, "fds_slope": fds}
    print(f"  {mode}: {crashes} crashes, {triaged} triaged, {rolled} rolled-up rows, {harness['samples']} harness "
          f"samples; rss {mib(result['rss_first'])} -> {mib(result['rss_last'])} MiB (max {mib(result['rss_max'])}), "
          f"fds {result['fds'][0]}-{result['fds'][1]}", flush=True)
    print(f"  {mode}: harness rss slope {fmt_slope(rss)}; fds {fds['text'] if fds else '-'}", flush=True)
    return result


def fmt_slope(fit: dict | None) -> str:
    if not fit or fit.get("slope") is None:
        return "-"
    return (f"{fit['slope'] / 2**20:+.1f} MiB/h [{fit['low'] / 2**20:+.1f}, {fit['high'] / 2**20:+.1f}] "
            f"({fit['text']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("before", "after", "both"), default="after")
    parser.add_argument("--duration", default="8m")
    parser.add_argument("--rate", type=int, default=400, help="steady requests/s")
    parser.add_argument("--probability", default="0.01", help="alloc-fail probability in percent")
    parser.add_argument("--rollup-every", default="60s", help="rollup window (the default's size: 60 rows)")
    parser.add_argument("--every", type=float, default=30.0, help="print the harness's RSS this often (s)")
    parser.add_argument("--work", type=Path, default=None, help="where results go (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="soak-footprint-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [run_once(m, args, work) for m in (("before", "after") if args.mode == "both" else (args.mode,))]
    print("\nmode    crashes  rss first -> last (max) MiB   fds      harness rss slope (95% interval)")
    for r in results:
        print(f"{r['mode']:6}  {r['crashes']:7d}  {mib(r['rss_first']):>7} -> {mib(r['rss_last']):>7} "
              f"({mib(r['rss_max']):>7})  {r['fds'][0]}-{r['fds'][1]:<5}  {fmt_slope(r['slope'])}")
    print(f"results in {work}")


if __name__ == "__main__":
    main()
