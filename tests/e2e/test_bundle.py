"""Crash bundles, end to end: a server that (like Varnish with its compiled VCL) loads a .so and deletes it,
then dies inside it on its first request, under a jemalloc preload: the crash row carries the proof of the
incarnation that died within a second; the collector saved the deleted object while the process lived; the
bundle, unpacked in an empty folder with the original binary moved away, opens in gdb from its own command
file and prints the symbolized backtrace, frames in the deleted object included."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import HARNESS, query, run_dir_of, write_scenario

SERVER_C = r"""
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef int (*handler)(const char *line);

static int __attribute__((noinline)) serve_request(handler recv, const char *line) { return recv(line) + 1; }

int main(int argc, char **argv) {
    /* Like varnishd with a compiled VCL: copy the module to a private file, load it, remove the file. */
    char path[] = "./vcl-XXXXXX.so";
    int out = mkstemps(path, 3);
    FILE *in = fopen(argv[2], "rb");
    char buf[65536];
    size_t n;
    while (in && (n = fread(buf, 1, sizeof buf, in)) > 0) if (write(out, buf, n) < 0) return 1;
    close(out);
    void *module = dlopen(path, RTLD_NOW);
    if (!module) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    unlink(path);
    handler recv = (handler)dlsym(module, "vcl_recv");
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 16)) return 1;
    for (;;) {
        int c = accept(fd, NULL, NULL);
        char *line = malloc(256);
        ssize_t got = read(c, line, 255);
        if (got > 0) { line[got] = 0; if (serve_request(recv, line) > 0 && write(c, "OK\n", 3) < 0) break; }
        free(line);
        close(c);
    }
    return 0;
}
"""

VCL_C = r"""
#include <string.h>
struct req { char *url; };
int __attribute__((noinline)) vcl_hash(struct req *r) { return (int)strlen(r->url); }
int vcl_recv(const char *line) {
    struct req r = { (char *)0x5a5a5a5a5a5a5a5aULL };   /* a freed request's junk */
    if (strncmp(line, "CRASH", 5) == 0) return vcl_hash(&r);
    return 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gdb") is None or shutil.which("eu-unstrip") is None, reason="needs gdb, elfutils")
def test_bundle_opens_elsewhere_with_the_deleted_object(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "server.c").write_text(SERVER_C)
    (build / "vcl.c").write_text(VCL_C)
    subprocess.run(["gcc", "-O1", "-g", "-o", str(build / "vcl-server"), str(build / "server.c"), "-ldl"], check=True)
    subprocess.run(["gcc", "-O1", "-g", "-shared", "-fPIC", "-o", str(build / "vcl.so"), str(build / "vcl.c")],
                   check=True)
    scenario = write_scenario(tmp_path, f"""
name: vcl-crash
seed: 2
target:
  command: [{build / 'vcl-server'}, "{{port}}", {build / 'vcl.so'}]
  request: "CRASH {{key}}\\n"
  restart: {{policy: never}}
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 20, for: 2s}}}}]
variants:
  - {{name: jemalloc, allocator: jemalloc}}
""")
    ran = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert "Traceback" not in ran.stderr, ran.stderr
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    [crash] = query(run_dir, "SELECT c.*, x.bucket FROM crashes c LEFT JOIN triage x ON x.uid = c.uid")
    assert crash["uptime"] < 5 and crash["core_path"], dict(crash)
    proof = json.loads(crash["detail"])["proof"]              # the incarnation that crashed
    assert (proof["allocator"], proof["source"], proof["stage"]) == ("jemalloc", "preload", "ready")
    assert proof["pid"] == crash["pid"]
    saved = list((run_dir / "objects").iterdir())
    assert len(saved) == 1 and saved[0].name.endswith(".so")  # the deleted module, by build id

    shown = subprocess.run([*HARNESS, "crashes", str(run_dir), crash["bucket"]], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "allocator (proof of this incarnation): malloc -> jemalloc (preload: libjemalloc.so.2)" in shown.stdout

    bundle = tmp_path / "crash.tar.gz"
    made = subprocess.run([*HARNESS, "crashes", str(run_dir), crash["bucket"], "--bundle", str(bundle)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "missing" not in made.stdout, made.stdout

    # Another place: an empty folder, the build (binary and module) moved away.
    build.rename(tmp_path / "moved-away")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with tarfile.open(bundle) as tar:
        tar.extractall(elsewhere, filter="data")
    [top] = list(elsewhere.iterdir())
    assert (top / "core").is_file() and (top / "gdb.cmd").is_file() and (top / "triage.json").is_file()
    gdb = subprocess.run(["gdb", "-batch", "-nx", "-x", "gdb.cmd", "-ex", "bt", "-ex", "info sharedlibrary"],
                         cwd=top, capture_output=True, text=True, timeout=120)
    frames = [line for line in gdb.stdout.splitlines() if line.startswith("#")]
    assert any("vcl_hash" in f for f in frames), gdb.stdout + gdb.stderr
    assert any("vcl_recv" in f for f in frames) and any("serve_request" in f for f in frames)
    assert any(" main " in f or f.split(" in ")[-1].startswith("main ") for f in frames), frames
    assert "vcl-" in gdb.stdout and "libjemalloc.so.2" in gdb.stdout   # the deleted module and the preload, found
