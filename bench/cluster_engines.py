"""Dask distributed or Ray for `--cluster`? Measured on this machine, each engine in a venv of its own
(a bench-only install under $HARNESS_CACHE, default ~/.cache/harness/bench-<engine>):

    .venv/bin/python bench/cluster_engines.py [--engines dask,ray] [--round-trips 200] [--messages 100]

For each engine, a local cluster as an operator would start one (scheduler/head plus 2 workers/nodes, each
its own process tree started by its own command line, 1 CPU each) and a client:
  install MiB   the engine's packages (the venv's size minus an empty venv's)
  start s       from launching the scheduler and both workers to the client seeing 2 workers
  idle MiB      RSS of one idle worker's process tree (Dask: nanny + worker; Ray: the node's raylet,
                its agents and the worker processes it keeps), and of the scheduler/head's tree
  task ms       round-trip of a trivial task (submit, wait for the result), median and p99 of N sequential
  stream ms     a long-running task pinned to one worker (Dask: an actor pushing into a distributed.Queue;
                Ray: an actor method that is a streaming generator) emitting a message every 20 ms:
                latency from emit to the client's receipt, median and p99
The processes are started in their own sessions and stopped by their process ids (never `ray stop`,
which stops every Ray process on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

CACHE = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))
PACKAGES = {"dask": ["distributed"], "ray": ["ray"]}

# Runs in the engine's own venv: starts the cluster, measures, stops it, prints one JSON line.
PROBE = r'''
import json, os, signal, socket, statistics, subprocess, sys, tempfile, time
import psutil

engine, venv_bin, round_trips, messages = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
procs = []

def start(argv, **kw):
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw)
    procs.append(p)
    return p

def tree_rss(pid):
    try:
        root = psutil.Process(pid)
        members = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for m in members:
        try:
            total += m.memory_info().rss
        except psutil.Error:
            pass
    return total

def pcts(values):
    values = sorted(values)
    return statistics.median(values) * 1e3, values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

def stop_all():
    # by process id: each command's session, then anything of ours still there
    pids = set()
    for p in procs:
        try:
            pids |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
        except psutil.Error:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    time.sleep(1)
    for pid in pids | {p.pid for p in procs}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

# stopped by the bench (timeout, Ctrl-C): unwind, so the finally below stops the cluster
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
result = {"engine": engine}
tmp = tempfile.mkdtemp()
try:
    if engine == "dask":
        from distributed import Client, Queue
        sched_file = os.path.join(tmp, "scheduler.json")
        t0 = time.perf_counter()
        scheduler = start([f"{venv_bin}/dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                           "--no-dashboard", "--scheduler-file", sched_file])
        workers = [start([f"{venv_bin}/dask", "worker", "--scheduler-file", sched_file, "--nthreads", "1",
                          "--no-dashboard", "--host", "127.0.0.1", "--local-directory", tmp]) for _ in range(2)]
        while not os.path.exists(sched_file):
            time.sleep(0.01)
        client = Client(scheduler_file=sched_file, timeout=60)
        client.wait_for_workers(2, timeout=120)
        result["start_s"] = time.perf_counter() - t0
        time.sleep(3)
        result["worker_idle_mib"] = tree_rss(workers[0].pid) / 2**20
        result["scheduler_mib"] = tree_rss(scheduler.pid) / 2**20
        result["client_mib"] = psutil.Process().memory_info().rss / 2**20
        def inc(x):
            return x + 1
        rts = []
        for i in range(round_trips):
            t = time.perf_counter()
            client.submit(inc, i, pure=False).result()
            rts.append(time.perf_counter() - t)
        result["task_ms"] = pcts(rts)

        class Streamer:
            def run(self, queue_name, n):
                from distributed import Queue
                import time
                q = Queue(queue_name)
                for i in range(n):
                    q.put({"i": i, "t": time.time()})
                    time.sleep(0.02)
                return n
        target = sorted(client.scheduler_info()["workers"])[1]
        actor = client.submit(Streamer, actor=True, workers=[target]).result()
        queue = Queue("stream")
        running = actor.run("stream", messages)
        lat = []
        for _ in range(messages):
            msg = queue.get(timeout=30)
            lat.append(time.time() - msg["t"])
        running.result()
        result["stream_ms"] = pcts(lat)
        result["stream_how"] = "actor + distributed.Queue"
        client.close()
    else:
        import ray
        port = free_port()
        t0 = time.perf_counter()
        # a loopback-only cluster: no usage reports, and no token (Ray >= 2.5x generates one per head and
        # keeps it under ~/.ray; the bench leaves nothing behind in the home directory)
        os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        ray_env = dict(os.environ)
        head = start([f"{venv_bin}/ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                      "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false",
                      "--temp-dir", os.path.join(tmp, "ray")], env=ray_env)
        address = f"127.0.0.1:{port}"
        workers = []
        deadline = time.time() + 120
        while True:    # a worker node started before the head's GCS listens gives up at once
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("ray: the head did not listen within 120 s")
                time.sleep(0.05)
        while True:
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        # one node after the other, once the head listens (nodes started with the head never joined here:
        # docs/cluster.md)
        for n in (1, 2):
            workers.append(start([f"{venv_bin}/ray", "start", "--block", "--address", address,
                                  "--node-ip-address", "127.0.0.1", "--num-cpus", "1"], env=ray_env))
            while sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")) < n:
                if time.time() > deadline:
                    raise SystemExit(f"ray: worker node {n} did not join within 120 s")
                time.sleep(0.05)
        result["start_s"] = time.perf_counter() - t0

        @ray.remote(num_cpus=1)
        def inc(x):
            return x + 1
        ray.get(inc.remote(0))   # the first task starts a worker process: count its start in idle memory
        time.sleep(3)
        result["worker_idle_mib"] = max(tree_rss(w.pid) for w in workers) / 2**20
        result["scheduler_mib"] = tree_rss(head.pid) / 2**20
        result["client_mib"] = psutil.Process().memory_info().rss / 2**20
        rts = []
        for i in range(round_trips):
            t = time.perf_counter()
            ray.get(inc.remote(i))
            rts.append(time.perf_counter() - t)
        result["task_ms"] = pcts(rts)

        @ray.remote(num_cpus=1)
        class Streamer:
            def run(self, n):
                import time
                for i in range(n):
                    yield {"i": i, "t": time.time()}
                    time.sleep(0.02)
        actor = Streamer.remote()
        lat = []
        for ref in actor.run.options(num_returns="streaming").remote(messages):
            msg = ray.get(ref)
            lat.append(time.time() - msg["t"])
        result["stream_ms"] = pcts(lat)
        result["stream_how"] = "actor + streaming generator"
        ray.shutdown()
finally:
    stop_all()
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
print(json.dumps(result))
'''


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def engine_venv(engine: str) -> tuple[Path, float]:
    """The engine's venv (created and installed once); its install size in MiB."""
    venv = CACHE / f"bench-{engine}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = "import distributed" if engine == "dask" else "import ray"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        print(f"bench: installing {' '.join(PACKAGES[engine])} into {venv}", file=sys.stderr, flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *PACKAGES[engine], "psutil"], check=True)
    with tempfile.TemporaryDirectory() as empty:
        subprocess.run([sys.executable, "-m", "venv", empty], check=True)
        subprocess.run([f"{empty}/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "psutil"], check=True, capture_output=True)
        base = du(Path(empty))
    return venv, (du(venv) - base) / 2**20


def probe(engine: str, round_trips: int, messages: int) -> dict:
    venv, size = engine_venv(engine)
    print(f"{engine}: load average before {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    child = subprocess.Popen([str(venv / "bin" / "python"), "-c", PROBE, engine, str(venv / "bin"),
                              str(round_trips), str(messages)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, _ = child.communicate(timeout=600)
    except BaseException:
        child.send_signal(signal.SIGTERM)      # the probe's finally stops the cluster it started
        child.wait()
        raise
    if child.returncode != 0:
        raise SystemExit(f"{engine} probe exited {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["install_mib"] = size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="dask,ray")
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rows = []
    for engine in args.engines.split(","):
        if engine not in PACKAGES:
            parser.error(f"unknown engine {engine!r} (engines: {', '.join(PACKAGES)})")
        for _ in range(args.repeat):
            r = probe(engine, args.round_trips, args.messages)
            print(json.dumps(r), file=sys.stderr, flush=True)
            rows.append([engine, f"{r['install_mib']:.0f}", f"{r['start_s']:.1f}", f"{r['worker_idle_mib']:.0f}",
                         f"{r['scheduler_mib']:.0f}", f"{r['client_mib']:.0f}",
                         f"{r['task_ms'][0]:.2f} / {r['task_ms'][1]:.2f}",
                         f"{r['stream_ms'][0]:.2f} / {r['stream_ms'][1]:.2f}", r["stream_how"]])
    print(tabulate(rows, headers=["engine", "install MiB", "start s", "idle worker MiB", "scheduler MiB",
                                  "client MiB", "task ms p50/p99", "stream ms p50/p99", "streaming with"]))


if __name__ == "__main__":
    main()
