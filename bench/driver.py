"""How fast does the harness drive an open-loop load, beside Locust, against the same echo server?

In one sitting, against one C echo server (targets/echo), for each repeat:
- the harness with one driver (`client.workers: 1`) and with `workers: auto`: a real run (runner, store,
  driver) at increasing offered rates; the figure kept is the highest rate whose p99 send lag (intended ->
  actual send) stays under 1 ms with >= 99.9 % of requests ok;
- Locust (closed loop, 16 users, one process, a raw-socket user: send a line, read its echo), installed by
  this script into a venv of its own (never a dependency of the package): its requests per second;
- the ratios harness / Locust.
Then the driver alone, saturated (a plan far above what it sends), in requests per second of its own CPU time
(beside Locust's requests per CPU-second): a figure a busy machine disturbs much less than latency. Then, with
workers: auto and 4 echo hosts, one host is killed and the bench prints how long after the kill
every worker had taken it out of rotation (from the run's `host-out` events).

The machine's load average is printed with each figure: numbers from a busy machine are not the
harness's. Repeat (--repeat) and read the spread.

    .venv/bin/python bench/driver.py [--seconds 5] [--repeat 3] [--rates 20000,30000,...] [--workers 1,auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.run.driverpool import resolve_workers  # noqa: E402
from harness.run.fleet import free_port  # noqa: E402
from harness.scenario.loader import load_scenario_text  # noqa: E402
from harness.run.runner import run_scenario  # noqa: E402
from harness.run.options import RunOptions  # noqa: E402

ECHO = REPO / "targets" / "echo" / "echo-server"
SCENARIO = """
name: bench-driver
seed: 1
target:
  root: {repo}
  command: [targets/echo/echo-server, --port, "{{port}}"]
fleet: {{hosts: {hosts}, balancer: least-loaded}}
client: {{timeout: 1s, connections: {connections}, workers: {workers}}}
load:
  - {{hold: {{rate: {rate}, for: {seconds}s}}}}
"""
FAILOVER = """
faults:
  - {{kind: host-loss, how: kill, at: {at}s, hosts: 1, down_for: 60s}}
"""

LOCUST_FILE = """
import socket
import time

from locust import User, constant, task


class Echo(User):
    \"\"\"A closed-loop client of the echo server: one line out, its echo back, again.\"\"\"

    wait_time = constant(0)

    def on_start(self):
        host, port = self.host.removeprefix("tcp://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    @task
    def echo(self):
        start = time.perf_counter()
        self.sock.sendall(b"GET k1\\n")
        while b"\\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data
        _, _, self.buffer = self.buffer.partition(b"\\n")
        self.environment.events.request.fire(request_type="echo", name="line", response_length=7,
                                             response_time=(time.perf_counter() - start) * 1000,
                                             exception=None, context={})
"""


def load() -> float:
    return os.getloadavg()[0]


def measure(rate: int, seconds: float, workers: str, hosts: int, connections: int, out: Path,
            failover_at: float | None = None) -> dict[str, float]:
    text = SCENARIO.format(repo=REPO, rate=rate, seconds=seconds, workers=workers, hosts=hosts,
                           connections=connections)
    if failover_at is not None:
        text += FAILOVER.format(at=failover_at)
    scenario = load_scenario_text(text, "bench.yaml", base=out)
    before = load()
    result = trio.run(run_scenario, scenario, RunOptions(out_dir=out, status=False))
    db = sqlite3.connect(str(result.run_dir / "run.db"))
    detail = json.loads(db.execute("SELECT detail FROM trials").fetchone()[0])
    offered, ok, errors = db.execute(
        "SELECT sum(offered), sum(ok), sum(timeout+conn_error+no_host+bad_reply) FROM samples").fetchone()
    events = db.execute("SELECT t, kind, host, detail FROM events").fetchall()
    db.close()
    lag = detail["send_lag_us"]
    row = {"rate": rate, "workers": detail.get("driver_workers", 1), "offered": offered / seconds,
           "ok": ok / seconds, "ok_fraction": ok / offered if offered else 0.0, "errors": errors,
           "lag_p50_us": lag["50"], "lag_p99_us": lag["99"], "lag_max_us": lag["100"],
           "load": (before + load()) / 2}
    if failover_at is not None:
        kill = next(t for t, kind, _, _ in events if kind == "host-loss")
        victim = json.loads(next(d for _, kind, _, d in events if kind == "host-loss"))["hosts"][0]
        outs = {json.loads(d).get("worker", 0): t for t, kind, host, d in events
                if kind == "host-out" and host == victim}
        row["moved_after_s"] = max(outs.values()) - kill if len(outs) == row["workers"] else float("nan")
        row["moved_workers"] = len(outs)
    return row


async def _saturate(port: int, rate: float, seconds: float) -> dict[str, float]:
    """The driver alone (no runner), one echo host, a plan far above what it can send: what it sends per
    second of its own CPU time. Less sensitive to a busy machine than any latency figure."""
    from harness.run.balancer import Balancer
    from harness.run.driver import Driver
    from harness.scenario.loadshape import LoadShape, PhaseSpec
    from harness.plan.streams import PlanSpec
    from harness.scenario.model import Client, Keys, Target
    driver = Driver(Target(root=REPO, command=("echo",)), Client(timeout=1.0, connections=4), [port], Balancer(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.serve)
        driver.host_ready(0, 1)
        while not driver.balancer.in_rotation[0]:
            await trio.sleep(0.01)
        shape = LoadShape.build([PhaseSpec("hold", None, seconds, rate_to=rate)])
        cpu, wall = time.process_time(), time.monotonic()
        start = trio.current_time() + 0.01
        await driver.run_load(PlanSpec(shape, Keys(), 1), start)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        counters = driver.swap_counters()
        nursery.cancel_scope.cancel()
    return {"sent": counters.sent, "ok": counters.ok, "cpu": cpu, "wall": wall, "per_cpu_second": counters.sent / cpu}


def capacity(seconds: float) -> dict[str, float]:
    port = free_port()
    echo = subprocess.Popen([str(ECHO), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return trio.run(_saturate, port, 300_000.0, seconds)
    finally:
        echo.terminate()
        echo.wait(timeout=10)


def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)


def good(row: dict[str, float]) -> bool:
    return row["lag_p99_us"] < 1000 and row["ok_fraction"] >= 0.999


def ladder(rates: list[int], seconds: float, workers: str, hosts: int, connections: int, out: Path,
           rows: list[dict[str, float]]) -> dict[str, float] | None:
    """Rates in order until two in a row fail past a good one: the best good row."""
    best, misses = None, 0
    for rate in rates:
        row = measure(rate, seconds, workers, hosts, connections, out)
        rows.append(row)
        print(f"  workers {workers}: rate {rate}: lag p99 {row['lag_p99_us']} us, ok {row['ok']:.0f}/s, "
              f"load {row['load']:.2f}", file=sys.stderr)
        if good(row):
            best, misses = row, 0
        else:
            misses += 1
            if misses >= 2 and best is not None:
                break
    return best


def locust_python() -> Path:
    """A venv of its own for Locust (a bench-only tool: the package never depends on it)."""
    venv = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness")) / "bench-locust"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import locust"], capture_output=True).returncode != 0:
        print("bench: installing locust into its own venv", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "locust"], check=True)
    return python


def run_locust(seconds: float, workdir: Path) -> dict[str, float]:
    port = free_port()
    echo = subprocess.Popen([str(ECHO), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        python = locust_python()
        (workdir / "locustfile.py").write_text(LOCUST_FILE)
        prefix = workdir / "locust"
        before = load()
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([str(python), "-m", "locust", "-f", str(workdir / "locustfile.py"), "--headless", "-u", "16",
                        "-r", "16", "-t", f"{int(seconds)}s", "--host", f"tcp://127.0.0.1:{port}", "--csv",
                        str(prefix), "--only-summary"], capture_output=True, check=False, cwd=workdir)
        with open(f"{prefix}_stats.csv") as handle:
            header = handle.readline().strip().split(",")
            for line in handle:
                fields = line.strip().split(",")
                if fields[1] == "Aggregated":
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
                    requests = float(fields[header.index("Request Count")])
                    return {"rate": float(fields[header.index("Requests/s")]), "requests": requests,
                            "per_cpu_second": requests / cpu if cpu else float("nan"),
                            "failures": float(fields[header.index("Failure Count")]), "load": (before + load()) / 2}
        raise SystemExit("bench: no Locust summary")
    finally:
        echo.terminate()
        echo.wait(timeout=10)


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} (min {min(values):.0f}, max {max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rates", default="20000,25000,30000,35000,40000,45000,50000,55000,60000,65000,70000,"
                                           "75000,80000,90000,100000")
    parser.add_argument("--workers", default="1,auto", help="driver worker settings to measure")
    parser.add_argument("--hosts", type=int, default=1, help="echo hosts the harness drives (Locust: one)")
    parser.add_argument("--connections", type=int, default=4, help="the harness's connections per host")
    parser.add_argument("--no-locust", action="store_true")
    parser.add_argument("--no-failover", action="store_true")
    args = parser.parse_args()
    subprocess.run(["make", "-s", "-C", str(REPO / "targets" / "echo")], check=True)
    rates = [int(r) for r in args.rates.split(",")]
    settings = args.workers.split(",")
    rows: list[dict[str, float]] = []
    best: dict[str, list[dict[str, float]]] = {w: [] for w in settings}
    locust: list[dict[str, float]] = []
    failover: list[dict[str, float]] = []
    saturated: list[dict[str, float]] = []
    print(f"cores usable: {len(os.sched_getaffinity(0))} (workers: auto = {resolve_workers('auto')}); "
          f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for repeat in range(args.repeat):
            for setting in settings:
                top = ladder(rates, args.seconds, setting, args.hosts, args.connections, out, rows)
                if top is not None:
                    best[setting].append(top)
            if not args.no_locust:
                locust.append(run_locust(args.seconds * 2, out))
                print(f"  locust: {locust[-1]['rate']:.0f}/s ({locust[-1]['per_cpu_second']:.0f} per CPU-second), "
                      f"load {locust[-1]['load']:.2f}", file=sys.stderr)
            saturated.append(capacity(2.0))
            print(f"  driver saturated: {saturated[-1]['per_cpu_second']:.0f} requests per CPU-second",
                  file=sys.stderr)
        if not args.no_failover:
            row = measure(4000, 4, "auto", 4, 2, out, failover_at=2.0)
            failover.append(row)
    print(tabulate([[r["workers"], r["rate"], f"{r['offered']:.0f}", f"{r['ok']:.0f}", r["errors"], r["lag_p50_us"],
                     r["lag_p99_us"], r["lag_max_us"], f"{r['load']:.2f}"] for r in rows],
                   headers=["workers", "target rate/s", "offered/s", "ok/s", "errors", "lag p50 µs", "lag p99 µs",
                            "lag max µs", "load avg"]))
    print()
    summary = []
    for setting in settings:
        rates_ok = [r["ok"] for r in best[setting]]
        summary.append([f"harness, workers: {setting}", spread(rates_ok),
                        " ".join(f"{r['load']:.2f}" for r in best[setting])])
    if locust:
        summary.append(["Locust (16 users, closed loop, 1 process)", spread([r["rate"] for r in locust]),
                        " ".join(f"{r['load']:.2f}" for r in locust)])
    print(tabulate(summary, headers=["driver (one echo server)", "req/s (harness: p99 send lag < 1 ms, >= 99.9% ok)",
                                     "load avg"]))
    if locust:
        for setting in settings:
            pairs = [b["ok"] / l["rate"] for b, l in zip(best[setting], locust)]
            if pairs:
                print(f"ratio harness (workers: {setting}) / Locust, per repeat: "
                      f"{', '.join(f'{p:.2f}x' for p in pairs)}")
    if saturated:
        print(f"\nsaturated (a plan of 300,000/s for 2 s, one echo host, the driver alone): "
              f"{spread([r['per_cpu_second'] for r in saturated])} requests per CPU-second of the driver"
              + (f"; Locust: {spread([r['per_cpu_second'] for r in locust])} per CPU-second of its process" if locust
                 else ""))
    for row in failover:
        print(f"\nfailover (workers: auto = {row['workers']}, 4 echo hosts, 4000/s): a killed host was out of "
              f"{row['moved_workers']} of {row['workers']} workers' rotation {row['moved_after_s'] * 1000:.1f} ms "
              f"after the kill")


if __name__ == "__main__":
    main()
