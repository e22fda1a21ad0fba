"""The fault shim against real processes: small C/C++ programs (tests/fixtures/shim_c/) built into a temporary
directory and run with LD_PRELOAD=<shim> and HARNESS_SHIM_CONTROL=<control file>. No mocks: every
assertion compares what a program saw with what the mode prescribes and with the shim's counters."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.shim.build import ShimBuildError, ensure_shim
from harness.shim.control import ENV_VAR, FUNCTIONS, ControlFile, FaultSlot
from harness.shim.interpose import check_interposable, mapped_objects, shim_loaded

C_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "shim_c"
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
JEMALLOC = LIBDIR / "libjemalloc.so.2"
TCMALLOC = LIBDIR / "libtcmalloc_minimal.so.4"
TIMEOUT = 60  # generous: a loaded CI machine must never make these fail

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD shim is Linux-only")


def _cc(*argv: str | Path) -> None:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a private cache: the build itself is under test
    return ensure_shim(cache=tmp_path_factory.mktemp("shim-cache"))


@pytest.fixture(scope="session")
def progs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shim-progs")
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed"
    _cc(cc, "-O1", "-fPIC", "-shared", "-o", d / "libshimlib.so", C_DIR / "shimlib.c", "-pthread")
    _cc(cc, "-O1", "-Wall", "-o", d / "shimprog", C_DIR / "shimprog.c", f"-L{d}", "-lshimlib",
        "-Wl,-rpath,$ORIGIN", "-pthread", "-ldl")
    _cc(cc, "-O1", "-o", d / "embedded", C_DIR / "embedded_alloc.c")
    out = {"lib": d / "libshimlib.so", "prog": d / "shimprog", "embedded": d / "embedded"}
    if subprocess.run([cc, "-static", "-o", d / "static", C_DIR / "embedded_alloc.c"],
                      capture_output=True).returncode == 0:
        out["static"] = d / "static"
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx:
        _cc(cxx, "-O2", "-o", d / "shimcxx", C_DIR / "shimcxx.cc")
        out["cxx"] = d / "shimcxx"
    return out


@pytest.fixture()
def ctl(tmp_path: Path):
    with ControlFile.create(tmp_path / "shim.ctl", seed=42, host_index=3) as c:
        yield c


def env_for(shim: Path, ctl: ControlFile | None, preload_after: tuple[Path, ...] = (),
            preload_before: tuple[Path, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV_VAR)}
    env["LD_PRELOAD"] = ":".join(str(p) for p in (*preload_before, shim, *preload_after))
    if ctl is not None:
        env.update(ctl.environ())
    return env


def run(args: list, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def field(out: str, key: str) -> list[str]:
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == key:
            return parts[1:]
    raise AssertionError(f"no {key!r} line in {out!r}")


def fails(out: str) -> list[int]:
    return [int(x.split(":")[0]) for x in field(out, "fails")]


def every(n: int, upto: int) -> list[int]:
    return list(range(n, upto + 1, n))


# ---------------------------------------------------------------------------------------- build


def test_build_is_cached_and_leaves_no_temporaries(shim: Path) -> None:
    again = ensure_shim(cache=shim.parent)
    assert again == shim and shim.stat().st_size > 0
    # the library, named by its content's hash, and the pointer to it for this source/compiler/flags
    names = sorted(p.name for p in shim.parent.iterdir())
    assert len(names) == 2 and shim.name in names and [n for n in names if n.endswith(".sha256")]
    assert (shim.parent.stat().st_mode & 0o777) == 0o700


def test_build_errors_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return undeclared_thing; }\n")
    with pytest.raises(ShimBuildError) as e:
        ensure_shim(source=broken, cache=tmp_path / "c1")
    msg = str(e.value)
    assert "\n" not in msg and "undeclared_thing" in msg and "error" in msg
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(ShimBuildError, match="no C compiler"):
        ensure_shim(cache=tmp_path / "c2")


# ------------------------------------------------------------------------------ pass-through


@pytest.mark.slow
def test_without_control_the_shim_is_a_transparent_pass_through(shim: Path, progs, tmp_path: Path) -> None:
    out = run([progs["prog"], "alloc", "malloc", 777, 200], env_for(shim, None)).stdout
    assert fails(out) == [] and field(out, "errno") == ["ok"]
    env = env_for(shim, None)
    env[ENV_VAR] = str(tmp_path / "missing.ctl")
    proc = run([progs["prog"], "lock", "pthread_mutex_lock", 50], env)
    assert fails(proc.stdout) == [] and "cannot open control file" in proc.stderr


def test_nothing_armed_still_counts(shim: Path, progs, ctl: ControlFile) -> None:
    run([progs["prog"], "alloc", "malloc", 777, 1000], env_for(shim, ctl))
    c = ctl.counters()
    assert c.loaded and c.attached == 1 and c.injected == 0
    assert c.calls["malloc"] >= 1000 and c.calls["free"] >= 1000
    (p,) = c.processes
    assert p.shim_first and p.live_tracked and p.exited and p.malloc_from == "libc.so.6"


# -------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("fn", ["malloc", "calloc", "realloc", "reallocarray", "posix_memalign",
                                "aligned_alloc", "memalign", "valloc"])
def test_nth_fails_exactly_calls_n_2n_3n(shim: Path, progs, ctl: ControlFile, fn: str) -> None:
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=3, functions=frozenset({fn}), min_size=777, max_size=777))
    out = run([progs["prog"], "alloc", fn, 777, 20], env_for(shim, ctl)).stdout
    assert fails(out) == [3, 6, 9, 12, 15, 18]
    assert field(out, "errno") == ["ok"]  # NULL with errno ENOMEM (posix_memalign: returns ENOMEM)
    c = ctl.counters()
    assert (c.slots[0].eligible, c.slots[0].injected) == (20, 6)
    assert c.calls[fn] >= 20


def test_first_and_last_injection_times_are_monotonic_clock(shim: Path, progs, ctl: ControlFile) -> None:
    """The harness places a window's injections on the trial's clock from these (time.monotonic_ns)."""
    import time
    before = time.monotonic_ns()
    run([progs["prog"], "alloc", "malloc", 777, 20], env_for(shim, ctl))
    assert ctl.counters().slots[0].first_ns == 0 == ctl.counters().slots[0].last_ns   # nothing armed: none
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=3, functions=frozenset({"malloc"}), min_size=777,
                         max_size=777))
    run([progs["prog"], "alloc", "malloc", 777, 20], env_for(shim, ctl))
    after = time.monotonic_ns()
    c = ctl.counters().slots[0]
    assert c.injected == 6 and before < c.first_ns < c.last_ns < after
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=1000, functions=frozenset({"malloc"})))
    assert (ctl.counters().slots[0].first_ns, ctl.counters().slots[0].last_ns) == (0, 0)   # re-armed: zeroed


def test_after_fails_every_call_after_the_first_n(shim: Path, progs, ctl: ControlFile) -> None:
    ctl.arm(2, FaultSlot(kind="alloc", mode="after", after=5, functions=frozenset({"malloc"}),
                         min_size=777, max_size=777))
    out = run([progs["prog"], "alloc", "malloc", 777, 12], env_for(shim, ctl)).stdout
    assert fails(out) == [6, 7, 8, 9, 10, 11, 12]
    assert (ctl.counters().slots[2].eligible, ctl.counters().slots[2].injected) == (12, 7)


def test_times_caps_the_number_of_failures(shim: Path, progs, ctl: ControlFile) -> None:
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=2, times=3, min_size=777, max_size=777))
    out = run([progs["prog"], "alloc", "calloc", 777, 20], env_for(shim, ctl)).stdout
    assert fails(out) == [2, 4, 6]
    assert ctl.counters().slots[0].injected == 3


def test_size_range_limits_eligible_calls(shim: Path, progs, ctl: ControlFile) -> None:
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=1, functions=frozenset({"malloc"}),
                         min_size=100, max_size=200, callers=("exe",)))
    out = run([progs["prog"], "sizes", 50, 99, 100, 150, 200, 201, 5000, 120], env_for(shim, ctl)).stdout
    assert fails(out) == [3, 4, 5, 8]
    assert ctl.counters().slots[0].eligible == 4


def test_budget_fails_when_live_bytes_plus_request_would_exceed(shim: Path, progs, ctl: ControlFile) -> None:
    budget, block = 2_000_000, 100_000
    ctl.arm(1, FaultSlot(kind="alloc", mode="budget", budget=budget))
    p = subprocess.Popen([str(progs["prog"]), "budget", str(block)], env=env_for(shim, ctl), text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline().split()  # "failed K last_usable U errno E"
        assert line[:1] == ["failed"], line
        k, last_usable, err = int(line[1]), int(line[3]), int(line[5])
        c = ctl.counters()   # read while the process holds its blocks
        (proc,) = c.processes
        live = proc.live_bytes  # published at the injection
        assert err == errno.ENOMEM and 15 <= k <= 21
        assert live + block > budget                 # the failing call would have exceeded it
        assert live - last_usable + block <= budget  # the call before it did not
        assert proc.peak_bytes >= live and c.live_bytes == live
        assert c.slots[1].injected == 1 and c.slots[1].eligible >= k
    finally:
        p.communicate("\n", timeout=TIMEOUT)
    assert p.returncode == 0


def random_run(shim: Path, progs, path: Path, seed: int, n: int, p: float) -> tuple[list[int], int]:
    with ControlFile.create(path, seed=seed, host_index=0) as c:
        c.arm(0, FaultSlot(kind="alloc", mode="random", probability=p, functions=frozenset({"malloc"}),
                           min_size=777, max_size=777))
        out = run([progs["prog"], "alloc", "malloc", 777, n], env_for(shim, c)).stdout
        f = fails(out)
        assert int(field(out, "count")[0]) == len(f) == c.counters().slots[0].injected
        assert c.counters().slots[0].eligible == n
        return f, n


def test_random_is_reproducible_per_seed_and_near_p(shim: Path, progs, tmp_path: Path) -> None:
    n, p = 20_000, 0.05
    a, _ = random_run(shim, progs, tmp_path / "a.ctl", 7, n, p)
    b, _ = random_run(shim, progs, tmp_path / "b.ctl", 7, n, p)
    other, _ = random_run(shim, progs, tmp_path / "c.ctl", 8, n, p)
    assert a == b
    assert a != other
    sigma = (n * p * (1 - p)) ** 0.5  # binomial: 6 sigma leaves a false alarm about once in 5e8 runs
    for f in (a, other):
        assert abs(len(f) - n * p) < 6 * sigma, (len(f), n * p, sigma)


def test_random_probability_zero_and_one(shim: Path, progs, ctl: ControlFile) -> None:
    ctl.arm(0, FaultSlot(kind="alloc", mode="random", probability=1.0, min_size=777, max_size=777))
    assert fails(run([progs["prog"], "alloc", "malloc", 777, 30], env_for(shim, ctl)).stdout) == every(1, 30)
    ctl.arm(0, FaultSlot(kind="alloc", mode="random", probability=0.0, min_size=777, max_size=777))
    assert fails(run([progs["prog"], "alloc", "malloc", 777, 30], env_for(shim, ctl)).stdout) == []
    assert ctl.counters().slots[0].eligible == 30


# -------------------------------------------------------------------------------------- locks


@pytest.mark.parametrize("fn,err", [
    ("pthread_mutex_lock", errno.EDEADLK), ("pthread_mutex_lock", errno.EOWNERDEAD),
    ("pthread_mutex_trylock", errno.EBUSY), ("pthread_mutex_timedlock", errno.ETIMEDOUT),
    ("pthread_rwlock_rdlock", errno.EAGAIN), ("pthread_rwlock_wrlock", errno.EDEADLK),
    ("pthread_rwlock_tryrdlock", errno.EBUSY), ("pthread_rwlock_trywrlock", errno.EINVAL),
])
def test_lock_errors_return_the_errno_without_taking_the_lock(shim: Path, progs, ctl: ControlFile,
                                                             fn: str, err: int) -> None:
    ctl.arm(4, FaultSlot(kind="lock", mode="nth", nth=2, functions=frozenset({fn}), errno=err))
    out = run([progs["prog"], "lock", fn, 10], env_for(shim, ctl)).stdout
    assert field(out, "fails") == [f"{i}:{err}" for i in every(2, 10)]
    assert field(out, "not_taken") == ["ok"]  # errorcheck unlock said EPERM / trywrlock succeeded
    c = ctl.counters()
    assert (c.slots[4].eligible, c.slots[4].injected) == (10, 5)
    assert c.calls[fn] >= 10


def test_lock_caller_filter_spares_other_modules(shim: Path, progs, ctl: ControlFile) -> None:
    lock = frozenset({"pthread_mutex_lock"})
    ctl.arm(0, FaultSlot(kind="lock", mode="nth", nth=1, functions=lock))  # default: the executable only
    out = run([progs["prog"], "liblock", 20], env_for(shim, ctl)).stdout
    assert field(out, "exe_fails") == ["20"] and field(out, "lib_fails") == ["0"]
    assert ctl.counters().slots[0].matched_ranges == 1
    ctl.arm(0, FaultSlot(kind="lock", mode="nth", nth=1, functions=lock, callers=("libshimlib",)))
    out = run([progs["prog"], "liblock", 20], env_for(shim, ctl)).stdout
    assert field(out, "exe_fails") == ["0"] and field(out, "lib_fails") == ["20"]
    ctl.arm(0, FaultSlot(kind="lock", mode="nth", nth=1, functions=lock, callers=("any",)))
    out = run([progs["prog"], "liblock", 20], env_for(shim, ctl)).stdout
    assert field(out, "exe_fails") == ["20"] and field(out, "lib_fails") == ["20"]


def test_alloc_caller_filter_exe_spares_libc_internal_allocations(shim: Path, progs, ctl: ControlFile) -> None:
    # every malloc from the executable fails, yet stdio (libc's own malloc of its buffer) still works
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=1, functions=frozenset({"malloc"}), callers=("exe",)))
    out = run([progs["prog"], "alloc", "malloc", 64, 25], env_for(shim, ctl)).stdout
    assert fails(out) == every(1, 25)


# ---------------------------------------------------------------------------- live control


@pytest.mark.parametrize("what,fault", [
    ("malloc", FaultSlot(kind="alloc", mode="nth", nth=1, min_size=4321, max_size=4321)),
    ("lock", FaultSlot(kind="lock", mode="nth", nth=1, errno=errno.EAGAIN)),
])
def test_arming_and_disarming_take_effect_in_a_running_process(shim: Path, progs, ctl: ControlFile, what: str,
                                                   fault: FaultSlot) -> None:
    # first a slot that cannot match, so the process has already taken snapshots before the change
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=1, min_size=1, max_size=1))
    p = subprocess.Popen([str(progs["prog"]), "poll", what], env=env_for(shim, ctl), text=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert shim_loaded(p.pid) and shim_loaded(p.pid, shim)
        ctl.arm(5, fault)                                        # every call fails from now on ...
        assert p.stdout.readline().startswith("failed at ")      # (blocks until the process saw it)
        ctl.disarm(5)                                            # ... until this
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0 and out.startswith("recovered at "), (out, err)
    assert ctl.counters().slots[5].injected >= 1


# ---------------------------------------------------------------------------- composition


@pytest.mark.parametrize("lib,name", [(JEMALLOC, "jemalloc"), (TCMALLOC, "tcmalloc")])
def test_composes_with_a_preloaded_allocator_after_the_shim(shim: Path, progs, ctl: ControlFile, lib: Path,
                                                            name: str) -> None:
    if not lib.exists():
        pytest.skip(f"{lib} not installed")
    p = subprocess.Popen([str(progs["prog"]), "allocator", "20"], env=env_for(shim, ctl, preload_after=(lib,)),
                         text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "ready"
        objs = mapped_objects(p.pid)
        assert str(lib.resolve()) in objs and shim_loaded(p.pid, shim)   # both really loaded
        (proc,) = ctl.counters().processes
        assert proc.pid == p.pid and proc.shim_first and name in proc.malloc_from
        ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=4, functions=frozenset({"malloc"}),
                             min_size=777, max_size=777))
        out, err = p.communicate("go\n", timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert field(out, f"{name}_grew") == ["1"]   # the allocator's own statistics saw our malloc
    assert fails(out) == every(4, 20)
    assert ctl.counters().processes[0].live_tracked


def test_allocator_before_the_shim_is_detected(shim: Path, progs, ctl: ControlFile) -> None:
    if not JEMALLOC.exists():
        pytest.skip("jemalloc not installed")
    run([progs["prog"], "alloc", "malloc", 64, 10], env_for(shim, ctl, preload_before=(JEMALLOC,)))
    (proc,) = ctl.counters().processes
    assert not proc.shim_first and "jemalloc" in proc.bound_from
    assert ctl.counters().calls["malloc"] == 0  # the shim never saw a malloc


def test_threads_and_fork_survive_injection(shim: Path, progs, ctl: ControlFile) -> None:
    ctl.arm(0, FaultSlot(kind="alloc", mode="random", probability=0.002, functions=frozenset({"malloc"}),
                         callers=("exe",)))
    ctl.arm(1, FaultSlot(kind="lock", mode="random", probability=0.002, errno=errno.EAGAIN))
    out = run([progs["prog"], "mt", 4, 20_000], env_for(shim, ctl)).stdout
    parent = int(field(out, "parent")[2])
    child = int(field(out, "child")[2])
    assert field(out, "child_status") == ["0"]
    c = ctl.counters()
    assert c.attached == 2 and len(c.processes) == 2          # the forked child attached too
    assert c.slots[0].injected + c.slots[1].injected == parent + child > 0
    assert c.calls["malloc"] >= 4 * 20_000                    # joined threads flushed their counts
    assert c.calls["pthread_mutex_lock"] >= 4 * 20_000


# ------------------------------------------------------------------------------------------ C++


@pytest.mark.parametrize("mode,fn", [("new", "operator new"), ("new[]", "operator new[]"),
                                     ("nothrow", "operator new nothrow"),
                                     ("nothrow[]", "operator new[] nothrow"), ("string", "_Znwm")])
def test_cxx_operator_new(shim: Path, progs, ctl: ControlFile, mode: str, fn: str) -> None:
    if "cxx" not in progs:
        pytest.skip("no C++ compiler")
    size = 999 if mode == "string" else 1000  # std::string(999) asks operator new for 1000 bytes
    ctl.arm(0, FaultSlot(kind="alloc", mode="nth", nth=3, functions=frozenset({fn}), min_size=1000, max_size=1000))
    out = run([progs["cxx"], mode, 10, size], env_for(shim, ctl)).stdout
    assert fails(out) == [3, 6, 9]   # bad_alloc caught, or NULL from the nothrow forms
    c = ctl.counters()
    assert c.slots[0].injected == 3 and c.processes[0].cxx


def test_cxx_live_bytes_follow_new_and_delete(shim: Path, progs, ctl: ControlFile) -> None:
    if "cxx" not in progs:
        pytest.skip("no C++ compiler")
    n, size, slack = 200, 4000, 64 << 10  # the shim publishes heap changes of 64 KiB or more at once
    p = subprocess.Popen([str(progs["cxx"]), "hold", str(n), str(size)], env=env_for(shim, ctl), text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "holding"
        held = ctl.counters().live_bytes
        assert n * size - slack <= held <= n * size + 2 * slack
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "freed"
        # both readings may lag the truth by up to the slack, in either direction
        assert ctl.counters().live_bytes <= held - n * size + 2 * slack
        p.communicate("go\n", timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    c = ctl.counters()  # per-function calls are exact once the process has exited
    assert c.calls["operator new[]"] >= n and c.calls["operator delete"] >= n and c.processes[0].exited


# ------------------------------------------------------------------------------ interposable


def test_check_interposable(progs, tmp_path: Path) -> None:
    ok = check_interposable(progs["prog"])
    assert ok.preloadable and ok.alloc_faults and ok.lock_faults and ok.interpreter
    emb = check_interposable(progs["embedded"])
    assert emb.preloadable and not emb.alloc_faults
    assert any("defines malloc" in r for r in emb.reasons)
    if "static" in progs:
        st = check_interposable(progs["static"])
        assert not st.preloadable and "statically linked" in st.reasons[0]
    suid = tmp_path / "suid"
    shutil.copy(progs["prog"], suid)
    suid.chmod(0o4755)
    rep = check_interposable(suid)
    assert not rep.preloadable and any("setuid" in r for r in rep.reasons)
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    assert not check_interposable(script).preloadable
    assert all("\n" not in r for r in emb.reasons + rep.reasons)


def test_shim_loaded_reads_proc_maps(shim: Path, progs) -> None:
    p = subprocess.Popen([str(progs["prog"]), "poll", "lock"], env=env_for(shim, None, preload_after=()),
                         text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    bare_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    q = subprocess.Popen([str(progs["prog"]), "poll", "lock"], env=bare_env, text=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "ready" and q.stdout.readline().strip() == "ready"
        assert shim_loaded(p.pid, shim) and shim_loaded(p.pid)
        assert not shim_loaded(q.pid) and not shim_loaded(q.pid, shim)
    finally:
        for proc in (p, q):
            proc.kill()
            proc.communicate()
    assert not shim_loaded(p.pid)  # gone


# -------------------------------------------------------------------------------- control API


def test_fault_slot_validation(ctl: ControlFile) -> None:
    bad = [
        FaultSlot(kind="lock", mode="budget", budget=1),
        FaultSlot(kind="alloc", mode="nth", nth=0),
        FaultSlot(kind="alloc", mode="random", probability=1.5),
        FaultSlot(kind="alloc", mode="nth", nth=1, functions=frozenset({"pthread_mutex_lock"})),
        FaultSlot(kind="lock", mode="nth", nth=1, functions=frozenset({"malloc"})),
        FaultSlot(kind="lock", mode="nth", nth=1, errno=errno.ENOENT),
        FaultSlot(kind="alloc", mode="nth", nth=1, min_size=10, max_size=5),
        FaultSlot(kind="alloc", mode="nth", nth=1, callers=("any", "exe")),
        FaultSlot(kind="alloc", mode="nth", nth=1, callers=("x" * 24,)),
        FaultSlot(kind="alloc", mode="nth", nth=1, times=-2),
    ]
    for f in bad:
        with pytest.raises(ValueError):
            ctl.arm(0, f)
    with pytest.raises(IndexError):
        ctl.arm(8, FaultSlot(kind="alloc", mode="nth", nth=1))
    assert ctl.armed() == {}


def test_arm_disarm_round_trip(ctl: ControlFile) -> None:
    a = FaultSlot(kind="alloc", mode="budget", budget=48 << 20, functions=frozenset({"malloc", "_Znwm"}),
                  min_size=1024, times=5)
    b = FaultSlot(kind="lock", mode="nth", nth=7, errno=errno.EBUSY, callers=("exe", "libfoo"))
    ctl.arm(0, a)
    ctl.arm(7, b)
    got = ctl.armed()
    assert got[0].functions == frozenset({"malloc", "operator new"}) and got[0].budget == 48 << 20
    assert (got[0].min_size, got[0].max_size, got[0].times) == (1024, 0, 5)
    assert got[7].nth == 7 and got[7].errno == errno.EBUSY and got[7].callers == ("exe", "libfoo")
    g = ctl.counters().generation
    ctl.disarm(0)
    assert set(ctl.armed()) == {7} and ctl.counters().generation == g + 1
    ctl.disarm_all()
    assert ctl.armed() == {}
    assert len(ctl.counters().calls) == len(FUNCTIONS)
