"""Cost of the fault shim per call: ns per malloc+free pair and per pthread_mutex_lock+unlock pair.

Configurations: bare; shim loaded with nothing armed; shim armed but not firing (an alloc slot with a
tiny probability on a size range the loop never hits, an alloc budget far away, and a lock slot with
a tiny probability that the loop's locks are eligible for); and libfiu's `fiu-run -x` when installed.
Each configuration runs the C loop in bench/shim_overhead.c several times (each run reports its
fastest of 5 batches), interleaved round-robin so that machine noise hits all of them alike; the
table shows the median and the minimum over the runs, the ratio of the medians to bare, and the added
nanoseconds per call, from the medians and from the minima ((x - bare x) / 2: a pair is two calls, of
which only malloc and lock consult the armed slots). On a shared machine the minimum is the better
estimate of what the code costs; the median shows what a noisy neighbour adds.

Usage: .venv/bin/python bench/shim_overhead.py [--reps 9] [--pairs 5000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.shim.build import ensure_shim, find_compiler  # noqa: E402
from harness.shim.control import ControlFile, FaultSlot  # noqa: E402

HERE = Path(__file__).resolve().parent


def build_loop(tmp: Path) -> Path:
    exe = tmp / "shim_overhead"
    # -fno-builtin: otherwise the compiler may drop a malloc/free pair whose memory is never used
    subprocess.run([*find_compiler(), "-O2", "-fno-builtin", "-o", str(exe), str(HERE / "shim_overhead.c"),
                    "-pthread"], check=True)
    return exe


def configs(tmp: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    shim = str(ensure_shim())
    idle = ControlFile.create(tmp / "idle.ctl", seed=1, host_index=0)
    armed = ControlFile.create(tmp / "armed.ctl", seed=1, host_index=0)
    armed.arm(0, FaultSlot(kind="alloc", mode="random", probability=1e-9, min_size=1 << 30))
    armed.arm(1, FaultSlot(kind="alloc", mode="budget", budget=1 << 40))
    armed.arm(2, FaultSlot(kind="lock", mode="random", probability=1e-12))
    out = [
        ("bare", [], {}),
        ("shim, nothing armed", [], {"LD_PRELOAD": shim, **idle.environ()}),
        ("shim, armed, not firing", [], {"LD_PRELOAD": shim, **armed.environ()}),
    ]
    fiu = shutil.which("fiu-run")
    if fiu:
        out.append(("fiu-run -x (libfiu)", [fiu, "-x"], {}))
    idle.close()
    armed.close()
    return out


def run(exe: Path, prefix: list[str], env: dict[str, str], op: str, pairs: int) -> float:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "HARNESS_SHIM_CONTROL")}
    full.update(env)
    out = subprocess.run([*prefix, str(exe), op, str(pairs)], env=full, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="runs per configuration (default 9)")
    ap.add_argument("--pairs", type=int, default=5_000_000, help="pairs per run (default 5e6)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as d:
        tmp = Path(d)
        exe = build_loop(tmp)
        cfgs = configs(tmp)
        rows = []
        for op, label in (("malloc", "malloc+free"), ("lock", "lock+unlock")):
            samples: dict[str, list[float]] = {name: [] for name, _, _ in cfgs}
            for _ in range(args.reps):
                for name, prefix, env in cfgs:
                    samples[name].append(run(exe, prefix, env, op, args.pairs))
            bare, bare_min = statistics.median(samples["bare"]), min(samples["bare"])
            for name, _, _ in cfgs:
                med, lo = statistics.median(samples[name]), min(samples[name])
                rows.append((label, name, med, lo, med / bare, (med - bare) / 2, (lo - bare_min) / 2))
    print(f"{'pair':<12} {'configuration':<26} {'median ns':>10} {'min ns':>8} {'ratio':>6} "
          f"{'+ns/call med':>13} {'+ns/call min':>13}")
    for label, name, med, lo, ratio, added, added_min in rows:
        print(f"{label:<12} {name:<26} {med:>10.2f} {lo:>8.2f} {ratio:>6.2f} {added:>13.2f} {added_min:>13.2f}")
    print(f"({args.reps} interleaved runs of {args.pairs} pairs each, best of 5 batches per run; "
          "+ns/call = (x - bare x) / 2 for x = median, min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
