"""The binding proof against the dynamic linker itself: real servers built here (glibc, jemalloc linked
statically from Debian's libjemalloc_pic.a, jemalloc linked dynamically) and Debian's redis-server (which links
libjemalloc.so.2), as shipped and under tcmalloc and mimalloc preloads. For each, the proof computed from the ELF
files, the proof of the live process (its GOT read back from /proc/PID/mem) and `LD_DEBUG=bindings` must name the
same object for every allocator symbol the executable binds."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import HARNESS, query, run_dir_of, wait_for, write_scenario
from harness.collect.proof.binding import PROVEN, prove_files, prove_process

LIB = Path("/usr/lib/x86_64-linux-gnu")
TCMALLOC = str(LIB / "libtcmalloc_minimal.so.4")
MIMALLOC = str(LIB / "libmimalloc.so.2")
JEMALLOC_PIC = LIB / "libjemalloc_pic.a"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

SERVER_C = r"""
#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    /* Every entry point once, so lazily bound GOT slots are bound before the server is ready. */
    void *p = malloc(100), *q = calloc(4, 8), *r = NULL, *s = aligned_alloc(64, 128);
    p = realloc(p, 200);
    if (posix_memalign(&r, 64, 128) != 0) return 1;
    printf("usable %zu\n", malloc_usable_size(p));
    fflush(stdout);
    free(p); free(q); free(r); free(s);
    if (argc < 2 || strcmp(argv[1], "--exit") == 0) return 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 16)) return 1;
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c >= 0) {
            char *line = malloc(64);
            int n = read(c, line, 63);
            if (n > 0 && write(c, "OK\n", 3) < 0) n = 0;
            free(line);
            close(c);
        }
    }
}
"""

_BINDING = re.compile(r"binding file (.+?) \[\d+\] to (.+?) \[\d+\]: normal symbol `([^']+)'")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not JEMALLOC_PIC.exists():
        pytest.fail(f"{JEMALLOC_PIC} is missing: scripts/setup.sh installs libjemalloc-dev")
    folder = tmp_path_factory.mktemp("servers")
    source = folder / "server.c"
    source.write_text(SERVER_C)
    built = {}
    for name, extra in (("srv-glibc", []), ("srv-static-jemalloc", [str(JEMALLOC_PIC), "-lpthread", "-lm", "-ldl"]),
                        ("srv-dynamic-jemalloc", ["-ljemalloc"])):
        out = folder / name
        subprocess.run(["gcc", "-O1", "-g", "-o", str(out), str(source), *extra], check=True, capture_output=True)
        built[name] = out
    built["redis"] = Path(REDIS)
    return built


def identity(path: str | Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    st = os.stat(path)
    return st.st_dev, st.st_ino


def ld_debug(argv: list[str], env: dict[str, str], folder: Path) -> dict[tuple[tuple[int, int], str], str]:
    """(requester, symbol) -> the object ld.so bound it to, from LD_DEBUG=bindings with every slot bound at start."""
    folder.mkdir(exist_ok=True)
    out = folder / "ld"
    environment = dict(os.environ, **env, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(out), LD_BIND_NOW="1")
    subprocess.run(argv, env=environment, capture_output=True, timeout=60, check=False)
    bindings = {}
    for log in folder.glob("ld.*"):
        for line in log.read_text(errors="replace").splitlines():
            match = _BINDING.search(line)
            if match:
                requester, target, symbol = match.groups()
                if not os.path.exists(requester):
                    continue   # linux-vdso.so.1
                bindings.setdefault((identity(requester), symbol), target)
    assert bindings, f"LD_DEBUG wrote nothing for {argv}"
    return bindings


def oracle(bindings: dict[tuple[tuple[int, int], str], str], exe: Path, symbol: str) -> str | None:
    """What the executable's reference binds to; for a symbol it does not import (it defines it, or does not
    call it), what libc's own reference binds to: the same global scope."""
    found = bindings.get((identity(exe), symbol))
    if found is None:
        found = bindings.get((identity("/lib/x86_64-linux-gnu/libc.so.6"), symbol))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


CASES = [
    # (server, preload, allocator malloc binds to, where from, allocators mapped but not bound)
    ("srv-glibc", None, "glibc", "glibc", set()),
    ("srv-glibc", TCMALLOC, "tcmalloc", "preload", set()),
    ("srv-static-jemalloc", None, "jemalloc", "static in executable", set()),
    ("srv-static-jemalloc", TCMALLOC, "jemalloc", "static in executable", {"tcmalloc"}),
    ("srv-dynamic-jemalloc", None, "jemalloc", "linked library", set()),
    ("srv-dynamic-jemalloc", TCMALLOC, "tcmalloc", "preload", {"jemalloc"}),
    ("redis", None, "jemalloc", "linked library", set()),
    ("redis", TCMALLOC, "tcmalloc", "preload", {"jemalloc"}),
    ("redis", MIMALLOC, "mimalloc", "preload", {"jemalloc"}),
]


@pytest.mark.parametrize("server,preload,allocator,source,unbound", CASES,
                         ids=[f"{c[0]}-{os.path.basename(c[1]).split('.')[0] if c[1] else 'as-shipped'}"
                              for c in CASES])
def test_proof_agrees_with_ld_debug_and_the_live_got(servers: dict[str, Path], tmp_path: Path, server: str,
                                                     preload: str | None, allocator: str, source: str,
                                                     unbound: set[str]) -> None:
    exe = servers[server]
    env = {"LD_PRELOAD": preload} if preload else {}
    files, _ = prove_files(str(exe), env)
    assert (files.allocator, files.source) == (allocator, source), files.to_dict()

    # The oracle: what ld.so itself says it bound.
    check_argv = [str(exe), "--version"] if server == "redis" else [str(exe), "--exit"]
    bindings = ld_debug(check_argv, env, tmp_path / "ld")
    compared = 0
    for symbol, proven in files.symbols.items():
        expected = oracle(bindings, exe, symbol)
        if expected is None:
            continue
        assert identity(proven.object) == identity(expected), (symbol, proven.object, expected)
        compared += 1
    assert oracle(bindings, exe, "malloc") is not None and compared >= 2

    # The live process: its scope from /proc/PID/environ, its GOT read back.
    port = free_port()
    argv = [str(exe), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), "--daemonize", "no"] if server == "redis" else [str(exe), str(port)]
    process = subprocess.Popen(argv, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for(lambda: accepts(port) or process.poll() is not None, timeout=30)
        assert process.poll() is None, "the server exited"
        live = prove_process(process.pid)
    finally:
        process.kill()
        process.wait()
    assert live.stage == "ready" and not live.errors, live.errors
    assert (live.allocator, live.source) == (allocator, source)
    assert {m["allocator"] for m in live.mapped_unbound} == unbound
    for symbol in PROVEN:
        assert identity(live.symbols[symbol].object) == identity(files.symbols[symbol].object), symbol
    assert live.got_check == "agrees", live.got_note
    slots = [(name, slot) for name, sym in live.symbols.items() for slot in sym.got]
    if source != "static in executable":
        # The executable's malloc slot was read and points into the object the rules (and ld.so) name.
        malloc_slots = [slot for name, slot in slots if name == "malloc"]
        assert malloc_slots and all(slot["state"] == "bound, agrees" for slot in malloc_slots), malloc_slots
        assert all(identity(slot["object"]) == identity(oracle(bindings, exe, "malloc")) for slot in malloc_slots)
    else:
        assert not [s for n, s in slots if n in ("malloc", "free")]   # its own malloc: called directly


def test_redis_under_a_tcmalloc_preload_is_a_mixed_binding(servers: dict[str, Path], tmp_path: Path) -> None:
    """malloc, malloc_usable_size and nallocx go to tcmalloc (it exports them), malloc_stats_print and mallctl
    stay with redis's jemalloc: a warning, and ld.so says the same."""
    redis = servers["redis"]
    proof, _ = prove_files(str(redis), {"LD_PRELOAD": TCMALLOC})
    bindings = ld_debug([str(redis), "--version"], {"LD_PRELOAD": TCMALLOC}, tmp_path / "ld")
    for symbol, allocator in (("malloc", "tcmalloc"), ("malloc_usable_size", "tcmalloc"), ("nallocx", "tcmalloc"),
                              ("malloc_stats_print", "jemalloc"), ("mallctl", "jemalloc")):
        assert proof.symbols[symbol].allocator == allocator, symbol
        assert identity(proof.symbols[symbol].object) == identity(oracle(bindings, redis, symbol)), symbol
    mixed = [w for w in proof.warnings if w.startswith("mixed binding")]
    assert any("malloc_stats_print -> jemalloc" in w for w in mixed), proof.warnings
    assert not any("nallocx" in w for w in mixed)


@pytest.mark.slow
def test_validate_refuses_a_preload_against_a_static_allocator(servers: dict[str, Path], tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, f"""
name: static-jemalloc
target:
  command: [{servers['srv-static-jemalloc']}, "{{port}}"]
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 10, for: 1s}}}}]
variants:
  - {{name: as-built}}
  - {{name: tcmalloc, allocator: tcmalloc}}
""")
    result = subprocess.run([*HARNESS, "validate", str(scenario)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{scenario}:9: variants[1].allocator: variant tcmalloc asks for tcmalloc, but ")
    assert "has jemalloc" in line and "linked in statically" in line and "use a `build` variant" in line
    # The same server linked dynamically against jemalloc takes the preload: validate is content.
    scenario.write_text(scenario.read_text().replace("srv-static-jemalloc", "srv-dynamic-jemalloc"))
    assert subprocess.run([*HARNESS, "validate", str(scenario)], capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
def test_redis_runs_under_every_allocator_variant(servers: dict[str, Path], tmp_path: Path) -> None:
    """Debian's redis-server (libjemalloc.so.2 linked in) under tcmalloc and mimalloc preloads: the preload was
    honoured, so the trials pass; each host's proof says so, and the mixed binding is a warning."""
    scenario = write_scenario(tmp_path, f"""
name: redis-allocators
seed: 5
target:
  command: [{servers['redis']}, --port, "{{port}}", --bind, 127.0.0.1, --save, "", --appendonly, "no",
            --daemonize, "no", --dir, "{{dir}}"]
  request: "EXISTS {{key}}\\r\\n"
  terminator: "\\r\\n"
  expect_reply: "^:0"
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 50, for: 1s}}}}]
variants:
  - {{name: as-shipped}}
  - {{name: tcmalloc, allocator: tcmalloc}}
  - {{name: mimalloc, allocator: mimalloc}}
expect:
  - {{error_rate: "< 1%"}}
""")
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "mixed binding: malloc -> tcmalloc (preload) but malloc_stats_print -> jemalloc" in result.stderr
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    import json
    proofs = {json.loads(r["detail"])["variant"]: json.loads(r["detail"])
              for r in query(run_dir, "SELECT detail FROM events WHERE kind='proof'")}
    assert {v: (p["allocator"], p["source"]) for v, p in proofs.items()} == {
        "as-shipped": ("jemalloc", "linked library"), "tcmalloc": ("tcmalloc", "preload"),
        "mimalloc": ("mimalloc", "preload")}
    assert {m["allocator"] for m in proofs["tcmalloc"]["mapped_unbound"]} == {"jemalloc"}
    assert all(p["got_check"] == "agrees" for p in proofs.values())
    assert [t["status"] for t in query(run_dir, "SELECT status FROM trials ORDER BY id")] == ["complete"] * 3


def test_link_map_of_a_process_that_has_exited_is_none_not_an_error() -> None:
    # The runner reads a target's maps, then its memory: a target exiting in a loop can be gone in between.
    from harness.collect.proof.live import link_map
    child = subprocess.Popen(["true"])
    child.wait()        # reaped: /proc/PID is gone
    assert not os.path.exists(f"/proc/{child.pid}")
    assert link_map(child.pid, 0) is None
