"""Crash bundles: one crash's core with everything needed to open it on another machine.

The archive (tar, compressed by its name: .tar.gz/.tgz, .tar.xz, .tar.bz2; default gzip) holds, under one
folder: ``core`` (decompressed), ``sysroot/<original path>`` for the executable and every object the core's
NT_FILE note says was mapped (matched by build id: the saved copy of an object deleted while mapped, from the
run's objects/ folder, else the file on disk if its build id is the core's), ``triage.json``, ``gdb.cmd`` (a
gdb command file with relative paths: run ``gdb -x gdb.cmd`` in the unpacked folder) and ``README.txt``
listing what could not be included. ``open_in_gdb`` runs gdb on a run's core the same way, in place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.base.errors import HarnessError

from .backtrace import parse_eu_unstrip, run_tool
from .elfcore import ElfError, read_build_id, read_core


@dataclass
class BundlePlan:
    core: Path                                   # the stored core (maybe .zst)
    executable: str                              # as the crash row names it
    objects: dict[str, Path] = field(default_factory=dict)   # original path -> file to include
    missing: list[str] = field(default_factory=list)          # what could not be found, and why


def _mapped_objects(core: Path) -> list[tuple[str, str | None]]:
    """(original path, build id) of every ELF object the core's process had mapped (eu-unstrip reads the core's
    NT_FILE note and each object's build id note from the core's memory)."""
    run = run_tool(["eu-unstrip", "-n", f"--core={core}"], timeout=60)
    modules = parse_eu_unstrip(run.stdout) if run.ok else []
    out: dict[str, str | None] = {}
    try:
        info = read_core(core)
    except (ElfError, OSError):
        info = None
    by_start = {m.start: m for m in modules}
    for mapped in (info.files if info else []):
        module = by_start.get(mapped.start)
        if mapped.path.startswith("/") and mapped.path not in out and (module is not None or mapped.offset == 0):
            out[mapped.path] = module.build_id if module is not None else None
    return list(out.items())


def plan_bundle(run_dir: Path, core: Path, executable: str) -> BundlePlan:
    plan = BundlePlan(core=core, executable=executable)
    objects_dir = run_dir / "objects"
    saved = {p.name.split("-", 1)[0]: p for p in objects_dir.iterdir()} if objects_dir.is_dir() else {}
    with _plain_core(core) as plain:
        mapped = _mapped_objects(plain)
    if not any(path == executable for path, _ in mapped):
        mapped.insert(0, (executable, None))
    for path, build_id in mapped:
        if build_id and build_id in saved:
            plan.objects[path] = saved[build_id]
            continue
        if os.path.isfile(path):
            on_disk = read_build_id(Path(path))
            if build_id is None or on_disk == build_id:
                plan.objects[path] = Path(path)
                continue
            plan.missing.append(f"{path}: on disk it has build id {on_disk}, the core's is {build_id} (rebuilt since)")
            continue
        if build_id is None and not path.endswith(".so") and ".so." not in path and path != executable:
            continue   # a mapped data file, not code
        plan.missing.append(f"{path}: not on disk and not saved (build id {build_id or 'unknown'})")
    return plan


class _plain_core:
    """The core as a plain file: itself, or a temporary decompressed copy of a .zst core."""

    def __init__(self, core: Path):
        self.core = core
        self.temp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self.core.suffix != ".zst":
            return self.core
        self.temp = tempfile.TemporaryDirectory(prefix="harness-core-")
        plain = Path(self.temp.name) / "core"
        with open(plain, "wb") as out:
            result = subprocess.run(["zstd", "-dc", str(self.core)], stdout=out, stderr=subprocess.PIPE)
        if result.returncode != 0:
            raise HarnessError(f"cannot decompress {self.core}: {result.stderr.decode(errors='replace').strip()}")
        return plain

    def __exit__(self, *exc: object) -> None:
        if self.temp is not None:
            self.temp.cleanup()


def gdb_commands(executable: str, objects: list[str], core: str, sysroot: str) -> str:
    """gdb commands that open the core with the bundled files (paths as given: relative in a bundle)."""
    dirs = sorted({os.path.dirname(p) for p in objects if p != executable})
    search = ":".join(f"{sysroot}{d}" for d in dirs)
    return "\n".join([
        "set pagination off",
        "set confirm off",
        "set debuginfod enabled off",
        f"set sysroot {sysroot}",
        f"set solib-search-path {search}",
        f"file {sysroot}{executable}",
        f"core-file {core}",
        "",
    ])


def write_bundle(run_dir: Path, crash: dict[str, Any], triage: dict[str, Any], out: Path) -> BundlePlan:
    core = Path(triage.get("core_file") or crash.get("core_path") or "")
    if not core.name or not core.is_file():
        raise HarnessError(f"the core of this crash was not kept ({triage.get('core_dropped') or 'no core'}): "
                           f"nothing to bundle")
    executable = crash.get("executable") or triage.get("executable") or ""
    plan = plan_bundle(run_dir, core, executable)
    top = f"crash-{triage.get('bucket') or 'untriaged'}-{crash.get('pid')}"
    name = out.name
    mode = "w:xz" if name.endswith(".tar.xz") else "w:bz2" if name.endswith(".tar.bz2") else "w:gz"
    readme = [f"harness crash bundle: bucket {triage.get('bucket')} ({triage.get('crash_class')}), "
              f"{triage.get('signature')}",
              f"executable: {executable}",
              "open it: cd into this folder, then: gdb -x gdb.cmd   (then: bt, info sharedlibrary, ...)",
              ""]
    if plan.missing:
        readme += ["not included (gdb will say so for these):"] + [f"  {m}" for m in plan.missing]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, mode) as tar, _plain_core(core) as plain:
            tar.add(plain, arcname=f"{top}/core")
            for original, source in plan.objects.items():
                tar.add(source, arcname=f"{top}/sysroot{original}")
            _add_text(tar, f"{top}/triage.json", json.dumps(triage, indent=2, default=str))
            _add_text(tar, f"{top}/gdb.cmd", gdb_commands(executable, list(plan.objects), "./core", "./sysroot"))
            _add_text(tar, f"{top}/README.txt", "\n".join(readme) + "\n")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HarnessError(f"cannot write the bundle {out}: {exc.strerror or exc}") from None
    return plan


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def open_in_gdb(run_dir: Path, crash: dict[str, Any], triage: dict[str, Any]) -> int:
    """gdb on the core, in place: the run's saved objects stand in for files deleted while mapped."""
    core = Path(triage.get("core_file") or crash.get("core_path") or "")
    if not core.name or not core.is_file():
        raise HarnessError(f"the core of this crash was not kept ({triage.get('core_dropped') or 'no core'})")
    if shutil.which("gdb") is None:
        raise HarnessError("gdb not found (apt-get install gdb)")
    executable = crash.get("executable") or ""
    with tempfile.TemporaryDirectory(prefix="harness-gdb-") as temp, _plain_core(core) as plain:
        plan = plan_bundle(run_dir, core, executable)
        root = Path(temp) / "sysroot"
        for original, source in plan.objects.items():     # links: nothing is copied
            target = root / original.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source.resolve(), target)
        commands = Path(temp) / "gdb.cmd"
        commands.write_text(gdb_commands(executable, list(plan.objects), str(plain), str(root)))
        for note in plan.missing:
            print(f"harness: note: {note}")
        return subprocess.call(["gdb", "-q", "-x", str(commands)])
