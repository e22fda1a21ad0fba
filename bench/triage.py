"""Time from process death to a full Triage, for a small core and a ~100 MB core.

    .venv/bin/python bench/triage.py [--runs 5] [--mib 100]

For each size: compile tests/fixtures/crashers/crasher.c, crash it in a tmp host directory (RLIMIT_CORE
raised in the child), then time, from the moment wait() returns (the kernel has finished writing the
core before the parent is told of the death):
  find_core → secure_core (rename into a results dir) → triage_core (frames symbolized, class, bucket).
The crasher prints its own crash instant, so the core-dump time (crash → wait returns) is shown apart.
Memory: the Python process's RSS sampled every 2 ms during triage (peak and growth over the
baseline), and the peak RSS of the tools (eu-stack, gdb) it ran.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from harness.collect import compress_stored, core_pattern_status, find_core, secure_core, triage_core

ROOT = Path(__file__).resolve().parent.parent
CRASHER = ROOT / "tests" / "fixtures" / "crashers" / "crasher.c"


class RssSampler:
    """Peak RSS of this process and of its children while active (psutil, every interval)."""

    def __init__(self, interval: float = 0.002):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak_self = 0
        self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_self = max(self.peak_self, self.proc.memory_info().rss)
                for c in self.proc.children(recursive=True):
                    try:
                        self.peak_children = max(self.peak_children, c.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _raise_core_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def one_run(binary: Path, argv: list[str], work: Path) -> dict:
    host = work / "host"
    results = work / "results"
    host.mkdir(parents=True)
    since = time.time()
    p = subprocess.Popen([str(binary), *argv], cwd=host, preexec_fn=_raise_core_limit,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read() if p.stderr else ""
    p.wait()
    died = time.time()
    t0 = time.monotonic()
    crash_at = next((float(l.split()[1]) for l in err.splitlines() if l.startswith("crash-at ")), None)
    base_rss = psutil.Process().memory_info().rss
    with RssSampler() as rss:
        core = find_core(host, p.pid, since)
        if core is None:
            raise SystemExit(f"no core for {argv} in {host} (core_pattern {core_pattern_status().pattern!r})")
        t_find = time.monotonic()
        stored = secure_core(core, results, max_bytes=2 << 30, compress=False)
        t_secure = time.monotonic()
        tri = triage_core(stored.path, binary)
        t_done = time.monotonic()
    # Optional and after triage (which needs the raw core): what compression costs the runner's thread.
    z = None
    t_z = time.monotonic()
    if shutil.which("zstd"):
        z = compress_stored(stored)
    zstd_s = time.monotonic() - t_z
    if tri.errors:
        print(f"  triage errors: {tri.errors}", file=sys.stderr)
    return {
        "core_mb": stored.original_size / 1e6,
        "dump_s": (died - crash_at) if crash_at else float("nan"),
        "find_s": t_find - t0, "secure_s": t_secure - t_find, "triage_s": t_done - t_secure,
        "total_s": t_done - t0,
        "eu_stack_s": tri.timings.get("eu-stack", 0.0), "gdb_s": tri.timings.get("gdb", 0.0),
        "rss_base_mb": base_rss / 1e6, "rss_peak_mb": rss.peak_self / 1e6,
        "rss_growth_mb": (rss.peak_self - base_rss) / 1e6, "tools_rss_mb": rss.peak_children / 1e6,
        "class": tri.crash_class, "signature": tri.signature, "bucket": tri.bucket,
        "frames": len(tri.crashing_thread),
        "zstd_s": zstd_s if z else float("nan"), "zstd_mb": z.stored_size / 1e6 if z else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=100, help="memory the big crasher touches before crashing")
    args = ap.parse_args()
    for tool in ("gcc", "eu-stack", "gdb"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not installed (scripts/setup.sh)", file=sys.stderr)
            return 2
    status = core_pattern_status()
    if not status.findable:
        print(f"bench: core_pattern {status.pattern!r}: {status.advice}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        tmpd = Path(tmp)
        binary = tmpd / "crasher"
        subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o", str(binary), str(CRASHER)],
                       check=True)
        cases = [("small", ["small"]), (f"big ({args.mib} MiB touched)", ["big", str(args.mib)])]
        print(f"triage bench: {args.runs} runs per case, {os.cpu_count()} CPUs, "
              f"core_pattern {status.pattern!r}, times are medians [min–max]")
        for name, argv in cases:
            rows = [one_run(binary, argv, tmpd / f"{argv[0]}-{i}") for i in range(args.runs)]

            def med(k: str, unit: float = 1000.0, fmt: str = "{:.0f}") -> str:
                vals = [r[k] * unit for r in rows]
                return f"{fmt.format(statistics.median(vals))} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"

            r0 = rows[0]
            print(f"\n{name}: core {r0['core_mb']:.1f} MB → {r0['class']} · {r0['signature']} · bucket {r0['bucket']}"
                  f" · {r0['frames']} frames")
            print(f"  kernel core dump (crash → wait returns) ms   {med('dump_s')}")
            print(f"  death → full Triage ms                       {med('total_s')}")
            print(f"    find_core ms                               {med('find_s', fmt='{:.2f}')}")
            print(f"    secure_core (rename, 0600) ms              {med('secure_s', fmt='{:.2f}')}")
            print(f"    triage_core ms                             {med('triage_s')}")
            print(f"      eu-stack ms (concurrent with gdb)        {med('eu_stack_s')}")
            print(f"      gdb ms                                   {med('gdb_s')}")
            print(f"  after triage: compress_stored (zstd -3) ms   {med('zstd_s')} → {r0['zstd_mb']:.2f} MB")
            print(f"  python RSS: baseline MB {statistics.median(r['rss_base_mb'] for r in rows):.1f}, "
                  f"peak during triage MB {max(r['rss_peak_mb'] for r in rows):.1f} "
                  f"(growth ≤ {max(r['rss_growth_mb'] for r in rows):.1f} MB)")
            print(f"  tools peak RSS MB (eu-stack/gdb)             {max(r['tools_rss_mb'] for r in rows):.1f}")
        print(f"\npython ru_maxrss over the whole bench: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
