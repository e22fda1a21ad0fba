"""One simulated trial in a process of its own, started by a cluster worker's task (harness.cluster.simrun).

Why a child and not the worker's own thread: a Dask worker runs tasks in a thread beside its event loop and
a statistical profiler that samples that thread every 10 ms, and its nanny sets MALLOC_TRIM_THRESHOLD_ so
every free returns memory to the kernel; measured on the nye-fleet-10k night, the same trial then cost about
twice the CPU time it costs in a plain process (bench/cluster.py, docs/cluster.md). In a child it costs what
it costs locally, whatever the worker's configuration, and a crash of the model cannot take the worker down.

Protocol: stdin carries the pickled (scenario, variant, number, run_id) from the worker; stdout gets the
pickled outcome (the recorded writes, the trial's detail, its wall-clock start).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def main() -> int:
    parent = int(sys.argv[1])
    # dies with the worker that started it (a worker lost mid-trial leaves no orphan computing)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 70
    import trio
    import trio.testing

    from harness.cluster.record import RecordingStore
    from harness.sim.run import Trial
    scenario, variant, number, run_id = pickle.loads(sys.stdin.buffer.read())
    store = RecordingStore()
    trial = Trial(scenario, variant, number, store, run_id, False, "")  # type: ignore[arg-type]
    detail = trio.run(trial.run, clock=trio.testing.MockClock(autojump_threshold=0))
    sys.stdout.buffer.write(pickle.dumps({"writes": store.writes, "detail": detail, "wall0": trial.wall0,
                                          "pid": os.getpid(), "cpu_seconds": round(time.process_time(), 3)},
                                         protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
