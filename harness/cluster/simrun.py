"""A simulated run spread over a Dask cluster: each trial (variant x repeat) is one task.

A trial is deterministic per seed and independent of every other trial, so a worker runs it exactly as
a local run does (harness.sim.run.Trial under a MockClock, in a child process: harness.cluster.trialproc),
with its store writes recorded (harness.cluster.record); the client replays them into the one run store on this machine, trial after
trial in the local run's order, so the store, the digests and `harness report` are a local run's. Only
wall-clock columns differ, and the store's meta row `cluster` says which worker ran which trial.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

from harness.cluster.connect import connect
from harness.analysis.report import build_finished_trial
from harness.cluster.record import replay
from harness.base.errors import HarnessError
from harness.plan.trialorder import trial_order
from harness.run.options import RunOptions, RunResult, new_run_id
from harness.base.safefs import create_run_dir
from harness.scenario.model import Scenario, Variant
from harness.store.runstore import RunStore


def run_trial(scenario: Scenario, variant: Variant, number: int, run_id: str) -> dict[str, Any]:
    """On a worker: one simulated trial, its writes recorded, in a child process (harness.cluster.trialproc
    says why). The worker's thread only waits for the child."""
    from distributed import get_worker
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}   # the nanny's, for itself
    child = subprocess.run([sys.executable, "-m", "harness.cluster.trialproc", str(os.getpid())],
                           input=pickle.dumps((scenario, variant, number, run_id), protocol=pickle.HIGHEST_PROTOCOL),
                           capture_output=True, env=env, check=False)
    if child.returncode != 0:
        tail = child.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"trial {number} ({variant.name}) process exited {child.returncode} on "
                           f"{socket.gethostname()}: {' | '.join(tail) or 'no output'}")
    outcome: dict[str, Any] = pickle.loads(child.stdout)
    outcome.update(worker=get_worker().address, host=socket.gethostname())
    return outcome


def run_simulation_on_cluster(scenario: Scenario, options: RunOptions, address: str) -> RunResult:
    assert scenario.fleet.simulated is not None
    trials = trial_order(scenario, options.variant, options.trials or scenario.trials)
    client = connect(address)
    try:
        return _run(client, address, scenario, options, trials)
    finally:
        client.close()


CANCELLED = concurrent.futures.CancelledError     # distributed.client.FutureCancelledError


def _run(client: Any, address: str, scenario: Scenario, options: RunOptions,
         trials: list[tuple[Variant, int]]) -> RunResult:
    from distributed import KilledWorker
    run_id = new_run_id(scenario.name)
    run_dir, lock = create_run_dir(options.out_dir, run_id, scenario.text)   # trusted results folder, 0700/0600
    store = RunStore(run_dir / "run.db", create=True)
    status, code = "interrupted", 130
    futures: list[Any] = []
    placed: dict[str, Any] = {}
    try:
        store.begin_run(run_id=run_id, scenario=scenario.name, scenario_file=scenario.file, seed=scenario.seed,
                        duration=scenario.duration, hosts=scenario.fleet.hosts, argv=options.argv,
                        phases=[(p.name, p.kind, p.start, p.end, p.rate_from, p.rate_to)
                                for p in scenario.load.phases], pid=os.getpid())
        workers = len(client.scheduler_info()["workers"])
        if options.status:
            print(f"cluster {address}: {len(trials)} trial(s) over {workers} worker(s)", file=sys.stderr, flush=True)
        started = time.perf_counter()
        # every trial at once: the scheduler hands them out in this order as workers free up
        futures = [client.submit(run_trial, scenario, variant, number, run_id, pure=False,
                                 key=f"harness-trial-{run_id}-{number}")
                   for number, (variant, _) in enumerate(trials, start=1)]
        watch = WorkerWatch(client, {future.key: number for number, future in enumerate(futures, start=1)})
        for number, ((variant, repeat), future) in enumerate(zip(trials, futures), start=1):
            while True:
                try:
                    outcome = future.result(timeout=1.0)
                    break
                except TimeoutError:
                    for loss in watch.poll():
                        store.set_meta("cluster", {"scheduler": address, "workers": workers, "trials": placed,
                                                   "lost_workers": watch.lost})
                        assigned = ", ".join(str(n) for n in loss["assigned"]) or "none"
                        print(f"harness: warning: cluster worker {loss['worker']} left during the run (trials "
                              f"assigned to it: {assigned}; the scheduler runs them again on another worker)",
                              file=sys.stderr, flush=True)
                except KilledWorker as exc:
                    code = 2
                    raise HarnessError(f"trial {number} ({variant.name}): the cluster lost the workers running "
                                       f"it ({exc})") from None
                except RuntimeError as exc:       # the trial's process failed on the worker: run_trial says how
                    code = 2
                    raise HarnessError(str(exc)) from None
                except CANCELLED:                 # the scheduler was lost (or cancelled the task)
                    code = 2
                    raise HarnessError(f"trial {number} ({variant.name}) was cancelled by the cluster at {address} "
                                       "(scheduler lost?)") from None
            store.begin_trial(number, variant.name, repeat, scenario.seed)
            store.trial_load_started(number, outcome["wall0"])
            try:
                replay(outcome["writes"], store)
            except BaseException:
                store.end_trial(number, "interrupted", {"simulated": True})
                raise
            store.end_trial(number, "complete", outcome["detail"])
            # its part of the report now, while the workers run the others (not all after the last one)
            build_finished_trial(run_dir, number)
            placed[str(number)] = {"worker": outcome["worker"], "host": outcome["host"], "pid": outcome["pid"],
                                   "wall_seconds": outcome["detail"]["wall_seconds"],
                                   "cpu_seconds": outcome["cpu_seconds"]}   # the trial process's, imports too
            store.set_meta("cluster", {"scheduler": address, "workers": workers, "trials": placed,
                                       "lost_workers": watch.lost})
            if options.status:
                print(f"trial {number}/{len(trials)} ({variant.name}) ran on {outcome['worker']} "
                      f"({outcome['host']}): {outcome['detail']['wall_seconds']:.1f}s; "
                      f"{time.perf_counter() - started:.1f}s since the first was sent", file=sys.stderr, flush=True)
        status, code = "complete", 0
    finally:
        if status != "complete" and futures:
            try:
                client.cancel(futures)
            except Exception:     # the cluster itself may be what failed: the store's verdict comes first
                pass
        store.end_run(status, code)
        store.close()
    return RunResult(run_id, run_dir, status, lock=lock)


class WorkerWatch:
    """Which workers left while trials ran, and which trials they were running: a worker that disappears
    is recorded (the store's meta row `cluster`, `lost_workers`) and said, never a silent retry."""

    def __init__(self, client: Any, trial_of: dict[str, int]):
        self.client = client
        self.trial_of = trial_of
        self.lost: list[dict[str, Any]] = []
        self.known = set(client.scheduler_info()["workers"])
        self.running: dict[str, list[int]] = {}

    def poll(self) -> list[dict[str, Any]]:
        try:
            now = set(self.client.scheduler_info()["workers"])
            processing = self.client.processing()
        except OSError:
            return []          # the scheduler itself is unreachable: the pending result will say so
        gone = []
        for worker in sorted(self.known - now):
            loss = {"worker": worker, "lost_wall": time.time(), "assigned": self.running.get(worker, [])}
            self.lost.append(loss)
            gone.append(loss)
        self.known = now
        self.running = {w: sorted(self.trial_of[k] for k in keys if k in self.trial_of)
                        for w, keys in processing.items()}
        return gone
