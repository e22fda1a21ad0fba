"""--cluster: simulated trials spread over a real local Dask cluster (a scheduler and two workers, each its
own process tree, started here and stopped by process group), with results identical to a local run;
and the one-line error when the optional dependency cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns_machines as netns
from dask_local import cluster as _cluster
from conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness"]

SWEEP = """
name: cluster-sweep
seed: 7
target: {command: [model]}
fleet:
  balancer: least-loaded
  simulated:
    hosts: 6
    capacity: 100/s
    service_time: 100ms
    queue: 40
    memory: {base: 8MiB, per_request: 256KiB, budget: 12MiB, spread: 25%}
    hazard: {base: 0.002/s, scale: 0.05/s, exponent: 2}
    restart: {time: 5s}
    warmup: {for: 10s, from: 40%}
    retries: {max: 2, budget: 20%}
client: {timeout: 1s}
load:
  - {ramp: {from: 100, to: 450, over: 30s}}
  - {hold: {for: 20s}}
  - {spike: {factor: 2.5, for: 20s, name: midnight}}
  - {hold: {for: 20s, name: after}}
variants:
  - {name: six}
  - {name: eight, args: {hosts: 8}}
  - {name: big-budget, args: {memory.budget: 16MiB}}
expect:
  - {variant: eight, crashes: 0, phase: midnight}
"""


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """A scheduler and two workers on loopback; the scheduler's address."""
    with _cluster("127.0.0.1", [([], "127.0.0.1"), ([], "127.0.0.1")]) as address:
        yield address


def _run(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    scenario = tmp / "sweep.yaml"          # one file for both runs: the report names it
    scenario.write_text(SWEEP, encoding="utf-8")
    out = Path(tempfile.mkdtemp(prefix="results-", dir=tmp)) if extra or env else tmp / "results"
    run = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(out), "--json", "--quiet", *extra],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, **(env or {})})
    runs = [p for p in out.iterdir() if (p / "run.db").exists()] if out.exists() else []
    assert len(runs) == 1, run.stderr
    return run, runs[0]


def _rows(run_dir: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(str(run_dir / "run.db"))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


WALL_KEYS = {"id", "run_id", "started", "ended", "load_started", "wall", "wall_seconds", "argv", "run_dir", "path",
             "harness", "harness_footprint", "html"}


def _without_walls(value: object) -> object:
    """The report minus what a rerun on the same machine changes too: wall-clock times, ids, paths."""
    if isinstance(value, dict):
        return {k: _without_walls(v) for k, v in value.items() if k not in WALL_KEYS}
    if isinstance(value, list):
        return [_without_walls(v) for v in value]
    return value


def _digests(run_dir: Path) -> dict[str, str]:
    return {v: json.loads(d)["digest"] for v, d in _rows(run_dir, "SELECT variant, detail FROM trials")}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """The sweep run locally, once: (folder of its scenario file, the command's result, its run folder)."""
    folder = tmp_path_factory.mktemp("local-sweep")
    return (folder, *_run(folder))


@pytest.mark.slow
def test_a_sweep_on_the_cluster_is_the_local_sweep(local_sweep: tuple, dask_cluster: str) -> None:
    folder, local, local_dir = local_sweep
    spread, spread_dir = _run(folder, "--cluster", dask_cluster)
    assert local.returncode == spread.returncode == 1, spread.stderr    # the same expectation fails in both
    digests = _digests(local_dir)
    assert len(set(digests.values())) == 3                              # three different nights ...
    assert _digests(spread_dir) == digests                              # ... each the same on the cluster
    assert _rows(local_dir, "SELECT count(*) FROM crashes")[0][0] > 0
    for table, columns in (("samples", "*"), ("crash_counts", "*"), ("crash_hosts", "*"), ("event_counts", "*"),
                           ("events", "trial, t, kind, host, pid, detail"),
                           ("crashes", "trial, t, host, pid, signal, detail"),
                           ("triage", "crash_class, signature, bucket, data")):
        assert _rows(local_dir, f"SELECT {columns} FROM {table} ORDER BY 1, 2, 3") == \
            _rows(spread_dir, f"SELECT {columns} FROM {table} ORDER BY 1, 2, 3"), table
    assert _without_walls(json.loads(local.stdout)) == _without_walls(json.loads(spread.stdout))
    # where each trial ran, kept in the store: both workers took a share
    placed = json.loads(_rows(spread_dir, "SELECT value FROM meta WHERE key='cluster'")[0][0])
    assert placed["scheduler"] == dask_cluster and sorted(placed["trials"]) == ["1", "2", "3"]
    assert len({t["worker"] for t in placed["trials"].values()}) == 2
    assert _rows(local_dir, "SELECT value FROM meta WHERE key='cluster'") == []
    report = subprocess.run([*HARNESS, "report", str(spread_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert report.returncode == 1 and "big-budget" in report.stdout


@pytest.mark.slow
def test_harness_cluster_env_names_the_cluster(tmp_path: Path, dask_cluster: str) -> None:
    run, run_dir = _run(tmp_path, "--variant", "eight", env={"HARNESS_CLUSTER": dask_cluster})
    assert run.returncode == 1, run.stderr
    assert json.loads(_rows(run_dir, "SELECT value FROM meta WHERE key='cluster'")[0][0])["scheduler"] == dask_cluster


@pytest.mark.slow
def test_a_sweep_over_workers_in_their_own_network_namespaces(local_sweep: tuple) -> None:
    """Two workers, each in its own network namespace (its own stack, an address the test assigns, reachable
    only over the test's bridge): the trials are spread over both and the results are the local run's."""
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    folder, local, local_dir = local_sweep
    with netns.machines(2) as machines:
        root_addresses = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        assert all(f"inet {a}/" not in root_addresses for a in machines.addresses)   # not this stack's
        workers = [(machines.exec_prefix(i), address) for i, address in enumerate(machines.addresses)]
        with _cluster(machines.bridge_address, workers) as address:
            spread, spread_dir = _run(folder, "--cluster", address)
    assert spread.returncode == local.returncode == 1, spread.stderr
    assert _digests(spread_dir) == _digests(local_dir)
    placed = json.loads(_rows(spread_dir, "SELECT value FROM meta WHERE key='cluster'")[0][0])
    hosts = {t["worker"].split("://")[1].rsplit(":", 1)[0] for t in placed["trials"].values()}
    assert hosts == set(machines.addresses)                    # each "machine" ran a share
    assert _without_walls(json.loads(local.stdout)) == _without_walls(json.loads(spread.stdout))


LONGER = SWEEP.replace("hosts: 6\n", "hosts: 300\n").replace("hosts: 8}", "hosts: 350}").replace(
    "budget: 12MiB, spread", "budget: 14MiB, spread").replace(
    "hazard: {base: 0.002/s, scale: 0.05/s, exponent: 2}", "hazard: {base: 0.00002/s, scale: 0.001/s, exponent: 2}")
LONGER = LONGER[:LONGER.index("load:")] + """load:
  - {ramp: {from: 15000, to: 25000, over: 15m}}
  - {spike: {factor: 1.3, for: 3m, name: midnight}}
variants:
  - {name: six}
  - {name: eight, args: {hosts: 350}}
  - {name: big-budget, args: {memory.budget: 16MiB}}
"""


@pytest.mark.slow
def test_a_worker_lost_mid_trial_is_recorded_and_its_trial_runs_elsewhere(tmp_path: Path) -> None:
    """A worker machine lost (nanny and worker SIGKILLed) while it runs a trial: the scheduler runs the trial
    on the other worker, the results are still the local run's, and the loss is said and kept in the store."""
    distributed = pytest.importorskip("distributed")
    scenario = tmp_path / "longer.yaml"
    scenario.write_text(LONGER, encoding="utf-8")
    local = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "local"), "--quiet"],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert local.returncode == 0, local.stderr
    with _cluster("127.0.0.1", [([], "127.0.0.1"), ([], "127.0.0.1")]) as address, \
            distributed.Client(address, timeout=60) as observer:
        run = subprocess.Popen([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "cluster"), "--quiet",
                                "--cluster", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO)
        try:
            def busy_worker() -> str | None:
                return next((w for w, keys in observer.processing().items()
                             if any(str(k).startswith("harness-trial-") for k in keys)), None)
            victim = wait_for(busy_worker, timeout=300)
            pid = observer.run(os.getpid, workers=[victim])[victim]
            os.killpg(os.getpgid(pid), signal.SIGKILL)          # the whole "machine": nanny and worker
            out, err = run.communicate(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 0, err
    assert f"harness: warning: cluster worker {victim} left during the run" in err
    local_dir = next((tmp_path / "local").iterdir())
    spread_dir = next((tmp_path / "cluster").iterdir())
    assert _digests(spread_dir) == _digests(local_dir)
    placed = json.loads(_rows(spread_dir, "SELECT value FROM meta WHERE key='cluster'")[0][0])
    assert [loss["worker"] for loss in placed["lost_workers"]] == [victim]
    assert sorted(placed["trials"]) == ["1", "2", "3"]


@pytest.mark.slow
def test_a_worker_with_other_harness_code_is_refused_in_one_line(tmp_path: Path) -> None:
    """A worker that imports a harness whose sources differ from this one's (a copy with one line added, first
    on its PYTHONPATH) would compute other results: the run is refused before any trial is sent."""
    copy = tmp_path / "other"
    shutil.copytree(REPO / "harness", copy / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "harness" / "sim" / "engine.py", "a", encoding="utf-8") as handle:
        handle.write("\n# another version\n")
    scenario = tmp_path / "sweep.yaml"
    scenario.write_text(SWEEP, encoding="utf-8")
    other = ["env", f"PYTHONPATH={copy}"]
    with _cluster("127.0.0.1", [(other, "127.0.0.1")]) as address:
        run = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "results"), "--quiet",
                              "--cluster", address], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: cluster worker tcp://127.0.0.1:"), run.stderr
    assert "runs other harness code than this machine" in lines[0]
    assert not (tmp_path / "results").exists()


def test_a_recorded_trial_replays_through_the_stores_own_calls(tmp_path: Path) -> None:
    """What a worker sends back is replayed through RunStore's own calls, in order; nothing else."""
    from harness.cluster.record import RecordingStore, replay
    from harness.store.runstore import RunStore
    recorder = RecordingStore()
    assert not hasattr(recorder, "db")          # no connection to write anything else through
    recorder.record_triage_rows([("u1", "c", "s", "b", 0, None, "{}")])
    recorder.write_batch(1, event_counts=[(0, "exit", 2)])
    recorder.write_batch(1, event_counts=[(0, "exit", 3)])
    store = RunStore(tmp_path / "run.db", create=True)
    try:
        replay(recorder.writes, store)
        assert [tuple(r) for r in store.query("SELECT uid, bucket FROM triage")] == [("u1", "b")]
        assert [tuple(r) for r in store.query("SELECT trial, t, kind, count FROM event_counts")] == [(1, 0, "exit", 5)]
        recorder.writes.calls.append(("sql", ("DROP TABLE crashes", [])))
        with pytest.raises(ValueError):
            replay(recorder.writes, store)
    finally:
        store.close()


# Blocks the import for real: a None entry in sys.modules makes `import distributed` raise ImportError.
BLOCKED = ("import sys; sys.modules['distributed'] = None; from harness.cli import main; "
           "sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_without_the_engine_one_line_says_how_to_install_it(tmp_path: Path, how: str) -> None:
    scenario = tmp_path / "sweep.yaml"
    scenario.write_text(SWEEP, encoding="utf-8")
    base = ["run", str(scenario), "--out", str(tmp_path / "results"), "--quiet"]
    argv, env = list(base), dict(os.environ)
    if how == "flag":
        argv += ["--cluster", "tcp://127.0.0.1:8786"]
    else:
        env["HARNESS_CLUSTER"] = "tcp://127.0.0.1:8786"
    run = subprocess.run([sys.executable, "-c", BLOCKED, *argv], capture_output=True, text=True, cwd=REPO,
                         timeout=60, env=env)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "harness: error: --cluster needs Dask distributed, an optional dependency: pip install 'harness[cluster]'"]
    assert not (tmp_path / "results").exists()          # nothing started
    # the same process without the block runs locally when no cluster is named
    env.pop("HARNESS_CLUSTER", None)
    plain = subprocess.run([sys.executable, "-c", BLOCKED, *base, "--variant", "six"],
                           capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert plain.returncode == 0, plain.stderr


@pytest.mark.parametrize("command", ["soak", "resume"])
def test_soak_and_resume_take_cluster_and_say_how_to_install_it_too(tmp_path: Path, command: str) -> None:
    scenario = tmp_path / "sweep.yaml"
    scenario.write_text(SWEEP, encoding="utf-8")
    target = [str(scenario), "--out"] if command == "soak" else ["latest", "--results"]
    run = subprocess.run([sys.executable, "-c", BLOCKED, command, *target, str(tmp_path / "results"),
                          "--cluster", "tcp://127.0.0.1:8786"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "harness: error: --cluster needs Dask distributed, an optional dependency: pip install 'harness[cluster]'"]
