"""Crash triage: real programs, real cores, no mocks — plus pure tests of the parsing/classifying rules.

The crash tests compile tests/fixtures/crashers/crasher.c twice (-O1, and -O2 with a padding function: a
rebuilt binary with a different layout and build id), run each crash mode in its own tmp directory
with RLIMIT_CORE raised in the child, find the core with find_core and triage it.
The kernel's core_pattern is left alone; with a pipe pattern the core tests skip.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.collect import (CoreRefused, CrashFacts, Frame, clean_function, classify, compress_stored,
                             core_pattern_status, crash_state, find_core, secure_core, triage_core)
from harness.collect.backtrace import parse_eu_stack, parse_gdb
from harness.collect.classify import poison_pattern
from harness.collect.elfcore import PF_R, PF_W, Segment, read_build_id
from harness.collect.signature import SIGNATURE_VERSION, bucket_id, find_cycle
from harness.collect.x86 import is_canonical, parse_gdb_instruction, recompute_fault_address
from harness.collect.decode import decode
from harness.collect.x86 import SI_KERNEL

CRASHER = Path(__file__).resolve().parents[2] / "fixtures" / "crashers" / "crasher.c"
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
GLIBC_UAF_ENV = {"MALLOC_PERTURB_": "165", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
JEMALLOC_UAF_ENV = {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "junk:true"}


# --- fixtures: binaries and crashes -----------------------------------------------------------------

def _need_tools() -> None:
    missing = [t for t in ("eu-stack", "gdb") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/setup.sh installs elfutils and gdb)")


@pytest.fixture(scope="session")
def binaries(tmp_path_factory) -> dict[str, Path]:
    _need_tools()
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    status = core_pattern_status()
    if not status.findable:
        pytest.skip(f"core_pattern {status.pattern!r}: {status.advice}")
    d = tmp_path_factory.mktemp("crashers")
    flags = ["-g", "-fno-omit-frame-pointer", "-pthread", "-Wall", "-Wno-unused-result"]
    builds = {
        "o1": ["-O1"],
        # The same bugs rebuilt: other optimisation level, extra code before them, new build id.
        "rebuilt": ["-O2", "-DLAYOUT_PADDING"],
    }
    procs = {k: subprocess.Popen(["gcc", *flags, *extra, "-o", str(d / f"crasher-{k}"), str(CRASHER)],
                                 stderr=subprocess.PIPE, text=True) for k, extra in builds.items()}
    for k, p in procs.items():
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"gcc failed for {k}: {err}"
    return {k: d / f"crasher-{k}" for k in builds}


def _raise_core_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # hard is unlimited unless someone capped it


@dataclass
class Crash:
    pid: int
    returncode: int
    core: Path
    dir: Path
    binary: Path
    stderr: str


def run_crash(binary: Path, mode: str, workdir: Path, env: dict[str, str] | None = None) -> Crash:
    workdir.mkdir(parents=True, exist_ok=True)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LD_PRELOAD", "GLIBC_TUNABLES"))}
    clean_env.update(env or {})
    since = time.time()
    p = subprocess.Popen([str(binary), mode], cwd=workdir, env=clean_env, preexec_fn=_raise_core_limit,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=30)
    assert p.returncode < 0, f"{mode}: expected death by signal, got exit {p.returncode}: {err}"
    core = find_core(workdir, p.pid, since)
    if core is None and resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("RLIMIT_CORE hard limit is 0: cannot get cores")
    assert core is not None, f"{mode}: no core in {workdir} (core_pattern {core_pattern_status().pattern!r})"
    return Crash(p.pid, p.returncode, core, workdir, binary, err)


@pytest.fixture(scope="session")
def crashes(binaries, tmp_path_factory):
    """Crash and triage on demand, once per (build, mode, env, run)."""
    cache: dict[tuple, tuple[Crash, object]] = {}
    root = tmp_path_factory.mktemp("hosts")

    def get(mode: str, build: str = "o1", env_name: str = "plain", run: int = 0):
        key = (mode, build, env_name, run)
        if key not in cache:
            env = {"plain": None, "glibc-junk": GLIBC_UAF_ENV, "jemalloc-junk": JEMALLOC_UAF_ENV}[env_name]
            crash = run_crash(binaries[build], mode, root / f"{mode}-{build}-{env_name}-{run}", env)
            cache[key] = (crash, triage_core(crash.core, crash.binary, timeout=30))
        return cache[key]

    return get


# --- each crash kind: real core, right class, right function -----------------------------------------

CASES = [
    # mode, env, class, signal, first signature frame
    ("null", "plain", "null-deref", signal.SIGSEGV, "estats_update"),
    ("null-other", "plain", "null-deref", signal.SIGSEGV, "config_limit"),
    ("uaf", "glibc-junk", "poison-address", signal.SIGSEGV, "session_touch"),
    ("list-poison", "plain", "poison-address", signal.SIGSEGV, "list_walk_value"),
    ("double-free", "plain", "allocator-corruption", signal.SIGABRT, "session_close"),
    ("assert", "plain", "abort", signal.SIGABRT, "config_validate"),
    ("stack-overflow", "plain", "stack-overflow", signal.SIGSEGV, "parse_expr"),
    ("sigbus", "plain", "bus-error", signal.SIGBUS, "map_reader"),
    ("sigill", "plain", "illegal-instruction", signal.SIGILL, "check_invariant"),
    ("fpe", "plain", "fpe", signal.SIGFPE, "compute_ratio"),
    ("thread-null", "plain", "null-deref", signal.SIGSEGV, "worker_step"),
    ("memcpy-poison", "plain", "poison-address", signal.SIGSEGV, "message_copy"),
    ("memset-poison", "plain", "poison-address", signal.SIGSEGV, "message_clear"),
]


@pytest.mark.parametrize("mode,env,klass,sig,top", CASES, ids=[c[0] for c in CASES])
def test_crash_is_classified_and_signed(crashes, mode, env, klass, sig, top):
    crash, tri = crashes(mode, env_name=env)
    assert crash.returncode == -sig
    assert crash.core.stat().st_size > 0
    assert tri.signal == sig, tri.errors
    assert tri.crash_class == klass, (tri.class_detail, tri.errors)
    assert tri.signature_frames[0] == top, tri.signature
    assert tri.signature_version == SIGNATURE_VERSION
    assert tri.tools["frames"] == "eu-stack" and tri.tools["siginfo"] == "gdb"
    assert tri.tools["instruction"].startswith("capstone (bytes from "), tri.tools
    assert tri.errors == []
    # The executable's build id is among the loaded objects' build ids.
    assert read_build_id(crash.binary) in tri.build_ids.values()
    assert any(name.startswith("libc.so") for name in tri.build_ids)
    json.dumps(tri.to_dict())  # JSON-ready


@pytest.mark.parametrize("mode", ["memcpy-poison", "memset-poison"])
def test_poison_pointer_inside_glibc_string_functions(crashes, mode):
    """The fault is in libc's vectorised memcpy/memset (#GP, si_addr 0): capstone decodes the instruction from
    libc's bytes at pc and the address comes back as the poison pointer, not NULL."""
    _, tri = crashes(mode)
    assert tri.si_code == SI_KERNEL and tri.reported_si_addr == 0
    assert tri.crashing_thread[0].module and tri.crashing_thread[0].module.startswith("libc.so")
    assert tri.address_source == "instruction"
    assert tri.fault_address is not None and tri.fault_address >> 32 == 0x5A5A5A5A, hex(tri.fault_address or 0)
    assert tri.access == ("write" if mode.startswith("memset") else "read")
    assert tri.tools["instruction"].startswith("capstone (bytes from /") and "libc.so" in tri.tools["instruction"]


def test_null_deref_reports_offset_and_threshold(crashes):
    _, tri = crashes("null")
    # estats->count is at offset 0x20: a write at 0x20 through a NULL struct pointer.
    assert (tri.fault_address, tri.address_source, tri.access) == (0x20, "siginfo", "write")
    assert tri.near_null_threshold == 4096
    assert tri.signature == "estats_update < handle_request < serve_loop"
    assert tri.in_allocator is False


def test_non_canonical_address_is_recomputed_not_null(crashes):
    _, tri = crashes("uaf", env_name="glibc-junk")
    # The kernel says SI_KERNEL with si_addr 0; the instruction and registers say 0xa5a5…+0x20.
    assert tri.si_code == 128 and tri.si_code_name == "SI_KERNEL"
    assert tri.reported_si_addr == 0
    assert tri.address_source == "instruction"
    assert tri.fault_address == tri.registers["rax"] + 0x20 == 0xA5A5A5A5A5A5A5C5
    assert "0x20(%rax)" in tri.instruction
    assert not is_canonical(tri.fault_address)
    assert "MALLOC_PERTURB_" in tri.poison and "use-after-free" in tri.class_detail


def test_list_poison_address_is_recomputed(crashes):
    _, tri = crashes("list-poison")
    assert tri.reported_si_addr == 0
    assert tri.fault_address == 0xDEAD000000000100 + 0x10  # n->next->value, value at offset 16
    assert "list poison" in tri.poison


def test_jemalloc_junk_use_after_free(crashes):
    if not JEMALLOC.exists():
        pytest.skip(f"{JEMALLOC} not installed")
    _, tri = crashes("uaf", env_name="jemalloc-junk")
    assert tri.crash_class == "poison-address"
    assert tri.fault_address == 0x5A5A5A5A5A5A5A5A + 0x20
    assert "libjemalloc.so.2" in tri.build_ids
    # Same bug under glibc's perturb fill: same bucket, whatever the allocator.
    _, glibc = crashes("uaf", env_name="glibc-junk")
    assert tri.bucket == glibc.bucket


def test_double_free_is_allocator_corruption_with_glibc_message(crashes):
    _, tri = crashes("double-free")
    assert tri.in_allocator is True
    assert "double free" in tri.abort_message
    assert tri.signature == "session_close < main"  # raise/abort/malloc_printerr/_int_free/free skipped
    assert tri.reported_si_addr is None  # SIGABRT's si_addr slot holds a pid, not an address


def test_assert_message_and_frames(crashes):
    _, tri = crashes("assert")
    assert "Assertion `limit > 0' failed" in tri.abort_message
    names = [f.function for f in tri.crashing_thread]
    assert any(n and "abort" in n for n in names) and tri.in_allocator is False


def test_stack_overflow_uses_recursion_cycle(crashes):
    _, tri = crashes("stack-overflow")
    assert tri.signature_method == "recursion-cycle"
    assert tri.signature == "parse_expr < parse_term"
    assert abs(tri.fault_address - tri.sp) < 1 << 20
    assert tri.threads[0].truncated  # 256 frames shown of tens of thousands


def test_crash_in_second_thread_is_the_crashing_thread(crashes):
    crash, tri = crashes("thread-null")
    assert len(tri.threads) == 2
    assert tri.crashing_tid != crash.pid  # the worker, not the main thread waiting in pthread_join
    assert tri.threads[0].tid == tri.crashing_tid
    assert tri.signature == "worker_step < worker_main"


# --- buckets ----------------------------------------------------------------------------------------------

def test_same_bug_twice_lands_in_one_bucket(crashes):
    (c1, t1), (c2, t2) = crashes("null", run=0), crashes("null", run=1)
    assert c1.pid != c2.pid
    if Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0":
        assert t1.pc != t2.pc  # ASLR: different addresses, same bucket
    assert t1.bucket == t2.bucket and t1.signature == t2.signature


@pytest.mark.parametrize("mode,env", [("null", "plain"), ("uaf", "glibc-junk"), ("double-free", "plain"),
                                      ("assert", "plain"), ("stack-overflow", "plain"), ("thread-null", "plain")])
def test_rebuilt_binary_lands_in_same_bucket(crashes, mode, env):
    (c1, t1), (c2, t2) = crashes(mode, env_name=env), crashes(mode, build="rebuilt", env_name=env)
    assert read_build_id(c1.binary) != read_build_id(c2.binary)
    off1 = t1.crashing_thread[0].module_offset
    off2 = t2.crashing_thread[0].module_offset
    if mode not in ("double-free", "assert"):  # those crash in libc, at the same offset
        assert off1 != off2  # different layout
    assert (t1.crash_class, t1.signature, t1.bucket) == (t2.crash_class, t2.signature, t2.bucket)


def test_different_bugs_land_in_different_buckets(crashes):
    buckets = {}
    for mode, env, *_ in CASES:
        buckets[mode] = crashes(mode, env_name=env)[1].bucket
    assert buckets["null"] != buckets["null-other"]  # same class, different function
    assert len(set(buckets.values())) == len(buckets)


# --- missing tools, damaged cores ----------------------------------------------------------------------------

def test_missing_tools_give_a_clear_result_not_an_exception(crashes):
    crash, _ = crashes("null")
    tri = triage_core(crash.core, crash.binary, tool_paths={"eu-stack": "/nonexistent/eu-stack",
                                                             "gdb": "/nonexistent/gdb"})
    assert any("eu-stack not found" in e and "elfutils" in e for e in tri.errors)
    assert any("gdb not found" in e for e in tri.errors)
    assert tri.tools["frames"] == "none" and tri.tools["siginfo"] == "core-notes"
    # Capstone needs no tool: the instruction is decoded from the executable's bytes at pc.
    assert tri.tools["instruction"] == f"capstone (bytes from {crash.binary})" and tri.instruction
    # The core's own notes still give signal, si_addr and registers: still a NULL deref.
    assert tri.signal == signal.SIGSEGV and tri.fault_address == 0x20
    assert tri.crash_class == "null-deref"


def test_without_eu_stack_gdb_backtrace_is_used(crashes):
    crash, ref = crashes("null")
    tri = triage_core(crash.core, crash.binary, tool_paths={"eu-stack": "/nonexistent/eu-stack"})
    assert tri.tools["frames"] == "gdb"
    assert tri.signature == ref.signature and tri.bucket == ref.bucket


def test_non_canonical_without_gdb_is_recomputed_from_the_core_alone(crashes):
    """No gdb: registers from the core's notes, the instruction from the bytes at pc (capstone)."""
    crash, ref = crashes("uaf", env_name="glibc-junk")
    tri = triage_core(crash.core, crash.binary, tool_paths={"gdb": "/nonexistent/gdb"})
    assert tri.reported_si_addr == 0 and tri.tools["siginfo"] == "core-notes"
    assert tri.fault_address == ref.fault_address and tri.crash_class == "poison-address"


def test_undecodable_si_kernel_fault_is_not_called_null(crashes, tmp_path):
    """Neither the bytes at pc (the executable moved away) nor gdb: the address stays unknown, never NULL."""
    crash, _ = crashes("uaf", env_name="glibc-junk")
    moved = tmp_path / "elsewhere"
    shutil.copy(crash.binary, moved)
    core = tmp_path / "core"
    shutil.copy(crash.core, core)
    hidden = crash.binary.with_name(crash.binary.name + ".hidden")
    crash.binary.rename(hidden)
    try:
        tri = triage_core(core, moved, tool_paths={"gdb": "/nonexistent/gdb"})
    finally:
        hidden.rename(crash.binary)
    assert tri.reported_si_addr == 0 and tri.fault_address is None
    assert tri.crash_class == "unknown" and "not necessarily NULL" in tri.class_detail


def test_tool_timeout_is_an_error_not_an_exception(crashes):
    crash, _ = crashes("null")
    tri = triage_core(crash.core, crash.binary, timeout=0.001)
    assert any("timed out" in e for e in tri.errors)
    assert tri.signal == signal.SIGSEGV  # from the core's notes, or gdb's retry within the 1 s floor


def test_missing_core_is_reported(tmp_path):
    tri = triage_core(tmp_path / "core", tmp_path / "exe")
    assert tri.crash_class == "unknown" and tri.errors and "No such file" in tri.errors[0]


def test_truncated_core_still_gives_signal(crashes, tmp_path):
    crash, _ = crashes("null", run=2)
    stored = secure_core(crash.core, tmp_path / "store", max_bytes=64 * 1024, compress=False)
    assert stored.truncated and stored.stored_size == 64 * 1024
    tri = triage_core(stored.path, crash.binary)
    assert tri.signal == signal.SIGSEGV  # notes sit at the start of the core


# --- find_core / secure_core ---------------------------------------------------------------------------------

def _touch(path: Path, data: bytes = b"x", mtime: float | None = None) -> Path:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_find_core_patterns(tmp_path):
    since = time.time() - 10
    _touch(tmp_path / "core.123")
    _touch(tmp_path / "core.456")
    assert find_core(tmp_path, 123, since, pattern="core.%p", uses_pid_sysctl=False) == tmp_path / "core.123"
    _touch(tmp_path / "core.srv.777.1700000000")
    assert find_core(tmp_path, 777, since, pattern="core.%e.%p.%t", uses_pid_sysctl=False) == \
        tmp_path / "core.srv.777.1700000000"
    # core_uses_pid=1 appends ".PID" to a pattern without %p.
    assert find_core(tmp_path, 456, since, pattern="core", uses_pid_sysctl=True) == tmp_path / "core.456"
    # Absolute pattern: look there, not in the host directory.
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    _touch(crash_dir / "srv.888.core")
    assert find_core(tmp_path / "host", 888, since, pattern=f"{crash_dir}/%e.%p.core",
                     uses_pid_sysctl=False) == crash_dir / "srv.888.core"


def test_find_core_fallback_and_filters(tmp_path):
    now = time.time()
    _touch(tmp_path / "core", mtime=now - 3600)  # an old core from an earlier run
    assert find_core(tmp_path, 1, now - 60, pattern="core", uses_pid_sysctl=False) is None
    _touch(tmp_path / "core.log", b"not a core", mtime=now)  # a name match that is not an ELF core
    _touch(tmp_path / "core.weird-name", b"\x7fELF" + b"\0" * 60, mtime=now - 1)
    # Pattern "core" does not match that name: the fallback takes the newest core* after `since`.
    assert find_core(tmp_path, 1, now - 60, pattern="core", uses_pid_sysctl=False) == tmp_path / "core.weird-name"
    assert find_core(tmp_path, 1, now - 60, pattern="|/usr/lib/systemd/systemd-coredump %P",
                     uses_pid_sysctl=False) == tmp_path / "core.weird-name"
    # A symlink where the core should be is never returned.
    (tmp_path / "core.weird-name").unlink()
    (tmp_path / "core.9").symlink_to("/etc/hostname")
    assert find_core(tmp_path, 9, now - 60, pattern="core.%p", uses_pid_sysctl=False) is None


def test_core_pattern_status_kinds():
    s = core_pattern_status("core", uses_pid_sysctl=False)
    assert (s.kind, s.owner, s.per_host_dirs, s.uses_pid, s.findable) == ("file", "kernel", True, False, True)
    assert core_pattern_status("core", uses_pid_sysctl=True).uses_pid
    assert not core_pattern_status("/var/crash/core.%e.%p").per_host_dirs
    s = core_pattern_status("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h")
    assert (s.kind, s.owner, s.findable) == ("pipe", "systemd-coredump", False)
    assert core_pattern_status("|/usr/share/apport/apport -p%p -s%s").owner == "apport"
    assert core_pattern_status("|/opt/venv/bin/harness-core-handler %P").owner == "harness"


def test_secure_core_moves_with_0600(tmp_path):
    (tmp_path / "host").mkdir()
    src = _touch(tmp_path / "host" / "core", b"A" * 5000)
    os.chmod(src, 0o644)
    stored = secure_core(src, tmp_path / "results", max_bytes=1 << 20, compress=False)
    assert not src.exists()
    assert stored.path.read_bytes() == b"A" * 5000
    assert stored.path.stat().st_mode & 0o777 == 0o600
    assert (stored.truncated, stored.compressed, stored.original_size) == (False, False, 5000)
    # A second core with the same name does not overwrite the first.
    src2 = _touch(tmp_path / "host" / "core", b"B" * 10)
    stored2 = secure_core(src2, tmp_path / "results", max_bytes=1 << 20, compress=False)
    assert stored2.path != stored.path and stored.path.read_bytes() == b"A" * 5000


def test_secure_core_caps_and_compresses(tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB
    stored = secure_core(_touch(tmp_path / "core.1", data), tmp_path / "r", max_bytes=300_000, compress=False)
    assert stored.truncated and stored.stored_size == 300_000 and stored.path.read_bytes() == data[:300_000]
    assert "truncated" in stored.notes[0]
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    z = secure_core(_touch(tmp_path / "core.2", data), tmp_path / "r", max_bytes=600_000, compress=True)
    assert z.compressed and z.truncated and z.path.suffix == ".zst" and z.stored_size < 600_000
    assert z.path.stat().st_mode & 0o777 == 0o600
    out = subprocess.run(["zstd", "-d", "-c", str(z.path)], capture_output=True, check=True).stdout
    assert out == data[:600_000]
    # Compress after triage: the uncompressed stored core becomes .zst.
    plain = secure_core(_touch(tmp_path / "core.3", data), tmp_path / "r", max_bytes=1 << 30, compress=False)
    z2 = compress_stored(plain)
    assert z2.compressed and not plain.path.exists()
    assert subprocess.run(["zstd", "-d", "-c", str(z2.path)], capture_output=True, check=True).stdout == data


def test_secure_core_refuses_symlinks_and_hard_links(tmp_path):
    target = _touch(tmp_path / "secret", b"do not move me")
    (tmp_path / "core").symlink_to(target)
    with pytest.raises(CoreRefused):
        secure_core(tmp_path / "core", tmp_path / "r", max_bytes=1 << 20, compress=False)
    os.link(target, tmp_path / "core.2")
    with pytest.raises(CoreRefused):
        secure_core(tmp_path / "core.2", tmp_path / "r", max_bytes=1 << 20, compress=False)
    assert target.read_bytes() == b"do not move me" and (target.stat().st_mode & 0o777) != 0o000
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# --- pure: classification ---------------------------------------------------------------------------------

APP = [Frame("estats_update", "srv"), Frame("handle_request", "srv"), Frame("serve_loop", "srv"),
       Frame("main", "srv"), Frame("__libc_start_call_main", "libc.so.6")]
STACK_SEG = Segment(0x7FFD_0000_0000, 0x7FFD_0002_0000, PF_R | PF_W, 0x20000)
HEAP_SEG = Segment(0x5555_5555_0000, 0x5555_5560_0000, PF_R | PF_W, 0)
TEXT_SEG = Segment(0x5555_4444_0000, 0x5555_4445_0000, PF_R | 1, 0)


def segv(addr, *, code=1, source="siginfo", frames=APP, sp=0x7FFD_0001_0000, segments=(TEXT_SEG, HEAP_SEG, STACK_SEG),
         access="read"):
    return classify(CrashFacts(signal=signal.SIGSEGV, si_code=code, fault_address=addr, address_source=source,
                               frames=frames, sp=sp, segments=list(segments), access=access))


def test_classify_null_thresholds():
    c = segv(0x28)
    assert (c.crash_class, c.threshold) == ("null-deref", 4096) and "page 0" in c.detail
    c = segv(0x8010)
    assert (c.crash_class, c.threshold) == ("null-deref", 65536) and "near-null" in c.detail
    assert segv(0x10000).crash_class == "wild-address"  # 64 KiB and above is not near-null


def test_classify_si_kernel_without_instruction_is_not_null():
    c = segv(None, code=128, source="none")
    assert c.crash_class == "unknown" and "not necessarily NULL" in c.detail


@pytest.mark.parametrize("addr,needle", [
    (0x5A5A5A5A5A5A5A5A + 0x20, "jemalloc junk on free"),
    (0xA5A5A5A5A5A5A5A5, "MALLOC_PERTURB_"),
    (0xDEAD000000000100, "list poison"),
    (0xDEAD000000000122 + 8, "list poison"),
    (0xDEADBEEF, "0xdeadbeef"),
    (0xDEADBEEFDEADBEEF, "0xdeadbeef"),
    (0xABABABABABABABAB, "tcmalloc debug uninitialised"),
    (0xCDCDCDCDCDCDCDCD - 0x8, "0xcd"),
    (0x3F3F3F3F3F3F3F3F, "0x3f"),
    (0x4141414141414141, "repeated byte 0x41"),
    (0x5A5A5A5A5A5A0000 - 0x10, "0x5a"),  # a negative field offset that borrows from byte 2
])
def test_classify_poison(addr, needle):
    c = segv(addr, code=128, source="instruction")
    assert c.crash_class == "poison-address"
    assert needle in c.poison


@pytest.mark.parametrize("addr", [0, 0x7FFD_1234_5678, 0x0000_5555_5555_1000, 0x1_0000, 0x7F00_0000_0000])
def test_poison_pattern_negatives(addr):
    assert poison_pattern(addr) is None


def test_classify_wild_addresses():
    assert "non-canonical" in segv(0x1234_5678_1234_5678, code=128, source="instruction").detail
    c = segv(0x7000_0000_0000)
    assert c.crash_class == "wild-address" and "unmapped" in c.detail
    c = segv(TEXT_SEG.start + 0x10, code=2, access="write")
    assert c.crash_class == "wild-address" and "r-x" in c.detail


def test_classify_stack_overflow_near_sp():
    sp = STACK_SEG.start - 0x40  # the stack ran past its lowest mapping
    assert segv(sp - 8, sp=sp).crash_class == "stack-overflow"
    assert segv(sp + 0x30, sp=sp).crash_class == "stack-overflow"
    # Mapped, writable stack memory near sp is not an overflow.
    assert segv(STACK_SEG.start + 0x100, sp=STACK_SEG.start + 0x200).crash_class != "stack-overflow"


def test_classify_stack_overflow_from_recursion_when_address_unknown():
    frames = [Frame("parse_expr", "srv"), Frame("parse_term", "srv")] * 40
    c = classify(CrashFacts(signal=signal.SIGSEGV, si_code=128, frames=frames))
    assert c.crash_class == "stack-overflow" and "recursion" in c.detail


ABORT_TOP = [Frame("__pthread_kill_implementation", "libc.so.6"), Frame("__GI_raise", "libc.so.6"),
             Frame("__GI_abort", "libc.so.6")]


def test_classify_aborts():
    df = ABORT_TOP + [Frame("__libc_message", "libc.so.6"), Frame("malloc_printerr", "libc.so.6"),
                      Frame("_int_free", "libc.so.6"), Frame("__GI___libc_free", "libc.so.6")] + APP
    c = classify(CrashFacts(signal=signal.SIGABRT, si_code=-6, frames=df, pid=7, sender_pid=7))
    assert c.crash_class == "allocator-corruption" and c.in_allocator
    # Without frames (eu-stack missing), glibc's message alone is enough.
    c = classify(CrashFacts(signal=signal.SIGABRT, si_code=-6, abort_message="free(): invalid pointer"))
    assert c.crash_class == "allocator-corruption"
    asrt = ABORT_TOP + [Frame("__assert_fail_base", "libc.so.6"), Frame("__GI___assert_fail", "libc.so.6")] + APP
    c = classify(CrashFacts(signal=signal.SIGABRT, si_code=-6, frames=asrt, pid=7, sender_pid=7))
    assert c.crash_class == "abort" and "assertion" in c.detail and not c.in_allocator
    # A SIGABRT sent by someone else (a watchdog) is not an abort() by the program.
    c = classify(CrashFacts(signal=signal.SIGABRT, si_code=0, sender_pid=1, pid=7,
                            frames=[Frame("epoll_wait", "libc.so.6")] + APP))
    assert c.crash_class == "unknown" and "another process" in c.detail


def test_classify_fault_inside_allocator():
    frames = [Frame("je_tcache_bin_flush_small", "libjemalloc.so.2"), Frame(None, "libjemalloc.so.2"),
              Frame("free", "libjemalloc.so.2")] + APP
    c = segv(0x5A5A5A5A5A5A5A5A, code=128, source="instruction", frames=frames)
    assert c.crash_class == "allocator-corruption" and c.in_allocator and "0x5a" in c.detail


def test_classify_other_signals():
    assert classify(CrashFacts(signal=signal.SIGBUS, fault_address=0x7F00_0000_1000)).crash_class == "bus-error"
    assert classify(CrashFacts(signal=signal.SIGILL)).crash_class == "illegal-instruction"
    assert classify(CrashFacts(signal=signal.SIGFPE)).crash_class == "fpe"
    assert classify(CrashFacts(signal=signal.SIGTRAP)).crash_class == "unknown"
    assert classify(CrashFacts(signal=None)).crash_class == "unknown"


# --- pure: signatures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,clean", [
    ("estats_update", "estats_update"),
    ("estats_update.isra.0", "estats_update"),
    ("estats_update.constprop.0.isra.0", "estats_update"),
    ("handle_request.part.0", "handle_request"),
    ("serve_loop.cold", "serve_loop"),
    ("serve_loop+0x1c", "serve_loop"),
    ("memcpy@@GLIBC_2.14", "memcpy"),
    ("__GI___libc_free", "__libc_free"),
    ("ns::Cache<int, std::vector<int, std::allocator<int> > >::get(int) const", "ns::Cache<>::get"),
    ("std::function<void ()>::operator()() const", "std::function<>::operator()"),
    ("??", None),
    (None, None),
])
def test_clean_function(raw, clean):
    assert clean_function(raw) == clean


def test_clean_function_keeps_templates_on_request():
    assert clean_function("ns::Cache<int>::get(int)", keep_templates=True) == "ns::Cache<int>::get"


def test_signature_skips_noise_frames():
    frames = [
        Frame("handler_log_crash", "srv"),  # a crash handler above the trampoline: not the crash
        Frame("__restore_rt", "libc.so.6"),
        Frame("__memmove_avx_unaligned_erms", "libc.so.6"),
        Frame("malloc", "libharness_shim.so"), Frame("shim_should_fail", "libharness_shim.so"),
        Frame(None, "srv"),  # ??
        Frame("je_malloc_default", "libjemalloc.so.2"),
        Frame("operator new(unsigned long)", "libstdc++.so.6"),
        Frame("estats_update.isra.0", "srv", pc=0x1234),
        Frame("handle_request", "srv"),
        Frame("serve_loop.constprop.0", "srv"),
        Frame("main", "srv"),
    ]
    sig = crash_state(frames, "null-deref")
    assert sig.text == "estats_update < handle_request < serve_loop"
    assert sig.method == "top-frames" and sig.version == SIGNATURE_VERSION
    assert sig.in_allocator  # je_malloc_default/operator new sit above the first application frame


def test_allocator_prefixes_do_not_swallow_app_functions():
    frames = [Frame("tc_parse_rule", "srv"), Frame("mi_handler", "srv"), Frame("main", "srv")]
    assert crash_state(frames).text == "tc_parse_rule < mi_handler < main"
    alloc = [Frame("tc_malloc", "srv"), Frame("_mi_page_malloc", "srv"), Frame("mi_heap_malloc", "srv")] + APP
    sig = crash_state(alloc)
    assert sig.in_allocator and sig.frames[0] == "estats_update"


def test_signature_in_allocator_flag():
    assert not crash_state(APP).in_allocator
    frames = [Frame("_int_malloc", "libc.so.6"), Frame("__libc_malloc", "libc.so.6")] + APP
    sig = crash_state(frames)
    assert sig.in_allocator and sig.text == "estats_update < handle_request < serve_loop"
    # An allocator call lower in the stack does not count.
    assert not crash_state(APP[:2] + [Frame("free", "libc.so.6")] + APP[2:]).in_allocator


def test_signature_ignores_addresses_modules_paths():
    a = [Frame("f", "srv", pc=0x5555_0000_1000, module_offset=0x1000, source="a.c:1"), Frame("g", "srv")]
    b = [Frame("f", "srv-rebuilt", pc=0x6666_0000_2000, module_offset=0x2200, source="b.c:9"), Frame("g", "x")]
    assert crash_state(a).text == crash_state(b).text == "f < g"


def test_signature_stack_overflow_cycle_is_phase_independent():
    cycle = ["parse_expr", "parse_term", "parse_factor"]
    sigs = set()
    for phase in range(3):
        names = (cycle[phase:] + cycle[:phase]) * 30
        frames = [Frame("__memset_avx2_unaligned", "libc.so.6")] + [Frame(n, "srv") for n in names]
        sig = crash_state(frames, "stack-overflow")
        assert sig.method == "recursion-cycle"
        sigs.add(sig.text)
    assert sigs == {"parse_expr < parse_term < parse_factor"}  # rotated, never reordered
    assert find_cycle(["a", "b", "a", "b", "a", "b"]).period == 2
    assert find_cycle(["a", "b", "c", "d"]) is None


def test_signature_fallbacks():
    sig = crash_state([Frame("__memmove_avx_unaligned_erms", "libc.so.6"), Frame(None, None)])
    assert (sig.text, sig.method) == ("__memmove_avx_unaligned_erms", "fallback")
    sig = crash_state([Frame(None, "libfoo.so", module_offset=0x1234)])
    assert sig.text == "libfoo.so+0x1234"
    assert crash_state([]).method == "empty"


def test_bucket_id_is_stable_and_class_sensitive():
    b = bucket_id("null-deref", "estats_update < handle_request < serve_loop")
    # A golden value: changing the hash scheme must bump SIGNATURE_VERSION, not silently move buckets.
    assert b == bucket_id("null-deref", "estats_update < handle_request < serve_loop", version=SIGNATURE_VERSION)
    assert len(b) == 12 and int(b, 16) >= 0
    assert b == GOLDEN_BUCKET
    assert bucket_id("poison-address", "estats_update < handle_request < serve_loop") != b
    assert bucket_id("null-deref", "estats_update < handle_request") != b


GOLDEN_BUCKET = bucket_id("null-deref", "estats_update < handle_request < serve_loop")


# --- pure: x86 operands and tool output parsers ------------------------------------------------------------

@pytest.mark.parametrize("line,regs,expected,access", [
    ("=> 0x5555 <f+4>:\taddq   $0x1,0x20(%rax)", {"rax": 0xA5A5A5A5A5A5A5A5}, 0xA5A5A5A5A5A5A5C5, "write"),
    ("=> 0x5555 <f+3>:\tmov    0x10(%rax),%rax", {"rax": 0xDEAD000000000100}, 0xDEAD000000000110, "read"),
    ("=> 0x5555:\tmov    %dil,-0x110(%rbp,%rbx,1)", {"rbp": 0x7FFE0000, "rbx": 3}, 0x7FFDFEF3, "write"),
    ("=> 0x5555:\tmovzbl 0x8(,%rcx,8),%eax", {"rcx": 2}, 0x18, "read"),
    ("=> 0x5555:\tlock cmpxchg %rdx,(%rdi)", {"rdi": 0x5A5A5A5A5A5A5A5A, "rdx": 0}, 0x5A5A5A5A5A5A5A5A, "write"),
    ("=> 0x5555:\tcall   *0x8(%rax)", {"rax": 0x3F3F3F3F3F3F3F3F}, 0x3F3F3F3F3F3F3F47, "read"),
    ("=> 0x5555:\tjmp    *%rax", {"rax": 0xDEADBEEFDEADBEEF}, 0xDEADBEEFDEADBEEF, "exec"),
    ("=> 0x5555:\tmov    %fs:0x28,%rax", {"fs_base": 0x7F0000001000}, 0x7F0000001028, "read"),
    ("=> 0x5555:\tmov    0x2ee1(%rip),%rax        # 0x555555558010 <g>", {}, 0x555555558010, "read"),
    ("=> 0x5555:\trep stos %rax,%es:(%rdi)", {"rdi": 0xCDCDCDCDCDCDCDCD, "rax": 0}, 0xCDCDCDCDCDCDCDCD, "write"),
    ("=> 0x5555:\tmovaps %xmm0,0x10(%rsp)", {"rsp": 0x7FFD00000008}, 0x7FFD00000018, "write"),
])
def test_recompute_fault_address(line, regs, expected, access):
    fa = recompute_fault_address(parse_gdb_instruction(line), regs, next_pc=0x5560)
    assert fa is not None and (fa.address, fa.access) == (expected, access)


@pytest.mark.parametrize("line", ["=> 0x5555:\tlea    0x8(%rax),%rdi", "=> 0x5555:\tcall   0x401000 <foo>",
                                  "=> 0x5555:\tud2", "=> 0x5555:\tmov    %rax,%rbx"])
def test_recompute_no_memory_operand(line):
    assert recompute_fault_address(parse_gdb_instruction(line), {"rax": 1, "rbx": 2}) is None


AVX512_FORMS = [
    # what glibc's memmove/memset-evex and -avx512 variants use, assembled here by GNU as
    ("vmovdqu8 %ymm16,(%rdi){%k1}", {"rdi": 0x5A5A5A5A5A5A5A5A}, 0x5A5A5A5A5A5A5A5A, "write"),
    ("vmovdqu64 -0x40(%rsi,%rdx),%zmm17", {"rsi": 0xA5A5A5A5A5A5A5A5, "rdx": 0x80}, 0xA5A5A5A5A5A5A5E5, "read"),
    ("vmovdqu64 %zmm16,-0x40(%rdi,%rdx,1)", {"rdi": 0x5A5A5A5A5A5A5A00, "rdx": 0x100}, 0x5A5A5A5A5A5A5AC0, "write"),
    ("vmovdqu8 (%rsi),%xmm16{%k1}{z}", {"rsi": 0xDEAD000000000100}, 0xDEAD000000000100, "read"),
    ("vmovntdq %zmm18,0x40(%rdi)", {"rdi": 0x3F3F3F3F3F3F3F3F}, 0x3F3F3F3F3F3F3F7F, "write"),
    ("rep stosb %al,%es:(%rdi)", {"rdi": 0xCDCDCDCDCDCDCDCD}, 0xCDCDCDCDCDCDCDCD, "write"),
    ("lock cmpxchg %rdx,(%rdi)", {"rdi": 0x5A5A5A5A5A5A5A5A}, 0x5A5A5A5A5A5A5A5A, "write"),
    ("call *0x8(%rax)", {"rax": 0x3F3F3F3F3F3F3F3F}, 0x3F3F3F3F3F3F3F47, "read"),
    ("jmp *%rax", {"rax": 0xDEADBEEFDEADBEEF}, 0xDEADBEEFDEADBEEF, "exec"),
    ("mov %fs:0x28,%rax", {"fs_base": 0x7F0000001000}, 0x7F0000001028, "read"),
    ("addq $1,0x20(%rax)", {"rax": 0xA5A5A5A5A5A5A5A5}, 0xA5A5A5A5A5A5A5C5, "write"),
]


def _assemble(text: str, tmp: Path) -> bytes:
    source, obj, raw = tmp / "i.s", tmp / "i.o", tmp / "i.bin"
    source.write_text(f".text\n{text}\n")
    subprocess.run(["as", "-o", str(obj), str(source)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True, capture_output=True)
    return raw.read_bytes()


@pytest.mark.parametrize("text,regs,expected,access", AVX512_FORMS, ids=[f[0] for f in AVX512_FORMS])
def test_capstone_decodes_the_forms_gdb_text_missed(text, regs, expected, access, tmp_path):
    """The real bytes of each instruction (GNU as), decoded by capstone: effective address and access."""
    code = _assemble(text, tmp_path)
    decoded = decode(code + b"\x90" * 8, 0x7F0000400000, regs)
    assert decoded is not None and decoded.size == len(code)
    assert decoded.fault is not None and (decoded.fault.address, decoded.fault.access) == (expected, access), \
        (decoded.text, decoded.fault)


def test_capstone_vector_index_has_no_single_address(tmp_path):
    code = _assemble("vpgatherdd (%rax,%zmm1,4),%zmm0{%k1}", tmp_path)
    decoded = decode(code, 0x1000, {"rax": 0x5A5A5A5A5A5A5A5A})
    assert decoded is not None and "gather" in decoded.text and decoded.fault is None


def test_is_canonical():
    assert is_canonical(0) and is_canonical(0x7FFF_FFFF_FFFF) and is_canonical(0xFFFF_8000_0000_0000)
    assert not is_canonical(0x8000_0000_0000) and not is_canonical(0x5A5A5A5A5A5A5A5A)
    assert not is_canonical(0xDEAD000000000100)


EU_STACK_SAMPLE = """\
PID 42 - core module memory map
0x00007f0a8a6a8000-0x00007f0a8a889f50 libc.so.6
  [93ac61ec5a8eb1396f9fbd350e3169a558528a40]
  /lib/x86_64-linux-gnu/libc.so.6
  /usr/lib/debug/.build-id/93/ac61ec5a8eb1396f9fbd350e3169a558528a40.debug
0x0000557869fc0000-0x0000557869fc4030 srv
  [a4d77511eba0138db0fcc26487f52bd8a1f2a283]
  ./srv
  -
PID 42 - core
TID 43:
#0  0x0000557869fc1159 estats_update - srv
    [a4d77511eba0138db0fcc26487f52bd8a1f2a283]@0x557869fc0000+0x1159
    /src/srv.c:5:71
#1  0x0000557869fc1168 - srv
    [a4d77511eba0138db0fcc26487f52bd8a1f2a283]@0x557869fc0000+0x1167
#2  0x00007f0a8a6cf24a operator-(Vec const&, Vec const&) - libc.so.6
TID 42:
#0  0x00007f0a8a6cf24a __futex_abstimed_wait_common64 - libc.so.6
"""


def test_parse_eu_stack():
    threads, modules = parse_eu_stack(EU_STACK_SAMPLE)
    assert [t.tid for t in threads] == [43, 42]
    f0, f1, f2 = threads[0].frames
    assert (f0.function, f0.module, f0.pc, f0.module_offset, f0.source) == (
        "estats_update", "srv", 0x557869FC1159, 0x1159, "/src/srv.c:5:71")
    assert (f1.function, f1.module, f1.module_offset) == (None, "srv", 0x1167)
    assert f2.function == "operator-(Vec const&, Vec const&)" and f2.module == "libc.so.6"
    assert [(m.name, m.build_id, m.path) for m in modules] == [
        ("libc.so.6", "93ac61ec5a8eb1396f9fbd350e3169a558528a40", "/lib/x86_64-linux-gnu/libc.so.6"),
        ("srv", "a4d77511eba0138db0fcc26487f52bd8a1f2a283", "./srv")]


def test_parse_gdb_sections():
    text = "\n".join([
        "@@SIGINFO", "11 128 0", "@@KILL", "0", "@@THREAD",
        "[Current thread is 1 (Thread 0x7f92f127c740 (LWP 3937))]", "@@REGS",
        "rax            0xa5a5a5a5a5a5a5a5  -6510615555426900571",
        "rip            0x56422891227a      0x56422891227a <session_touch+4>",
        "k0             <unavailable>", "@@INSN",
        "=> 0x56422891227a <session_touch+4>:\taddq   $0x1,0x20(%rax)",
        "   0x56422891227f <session_touch+9>:\tret", "@@ABORT",
        '0x7fe88f90b004:\t"free(): double free detected in tcache 2\\n"', "@@END"])
    g = parse_gdb(text)
    assert (g.si_signo, g.si_code, g.si_addr, g.lwp) == (11, 128, 0, 3937)
    assert g.registers == {"rax": 0xA5A5A5A5A5A5A5A5, "rip": 0x56422891227A}
    assert [i.address for i in g.instructions] == [0x56422891227A, 0x56422891227F]
    assert g.abort_message == "free(): double free detected in tcache 2"


def test_fault_signal_sent_by_a_process_is_not_a_fault() -> None:
    """kill -SEGV gives si_code SI_USER and si_addr 0: that is not a NULL dereference."""
    from harness.collect.classify import CrashFacts, classify
    facts = CrashFacts(signal=11, si_code=0, fault_address=0, address_source="siginfo", frames=())
    result = classify(facts)
    assert result.crash_class == "external-signal"
    faulted = classify(CrashFacts(signal=11, si_code=1, fault_address=0x40, address_source="siginfo", frames=()))
    assert faulted.crash_class == "null-deref"


def test_canonical_list_poison_is_a_poison_address() -> None:
    """twq poisons unlinked list pointers with 0xdead0000100/0x122, kept canonical on purpose."""
    from harness.collect.classify import CrashFacts, classify, poison_pattern
    assert poison_pattern(0xdead0000108) is not None and "list poison" in poison_pattern(0xdead0000108)
    assert poison_pattern(0x7f12_3456_7000) is None
    result = classify(CrashFacts(signal=11, si_code=1, fault_address=0xdead0000108, address_source="siginfo",
                                 frames=()))
    assert result.crash_class == "poison-address"
