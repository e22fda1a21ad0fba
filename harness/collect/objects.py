"""The objects a host process has mapped, and copies of those deleted from disk while it runs.

A core holds the process's memory but not the code of the files it mapped; to open it elsewhere (a crash
bundle) every mapped object is needed, matched by build id. Most stay on disk; some are deleted while
mapped (Varnish compiles each VCL to a .so, loads it and removes the file). Those can only be read while
the process lives, from /proc/PID/map_files (root: CAP_SYS_ADMIN), so the runner calls
``save_deleted`` at the proof (readiness) and again every second: a copy named by build id goes to the
run's objects/ folder, once per build id for the whole run, created without following links and capped.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from harness.collect.elfcore import read_build_id
from harness.collect.proof.live import Mapping, file_identity, read_maps

MAX_OBJECT_BYTES = 512 << 20       # one object
MAX_SAVED_BYTES = 2 << 30          # all copies of one run


@dataclass
class ObjectStore:
    directory: Path                                  # results/<run>/objects
    saved: dict[str, str] = field(default_factory=dict)            # build id -> file name
    seen: dict[tuple[int, int, int], str] = field(default_factory=dict)   # (pid, dev, inode) -> note
    total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)   # the sampler and the proofs both call in

    def path_for(self, build_id: str) -> Path | None:
        name = self.saved.get(build_id)
        return self.directory / name if name else None


def mapped_objects(maps: list[Mapping]) -> list[Mapping]:
    """One mapping per file (the first, which for an ELF object is its header at offset 0)."""
    seen: set[tuple[tuple[int, int], int]] = set()
    out = []
    for mapping in maps:
        if not mapping.inode or not mapping.path.startswith("/"):
            continue
        key = (mapping.device, mapping.inode)
        if key not in seen:
            seen.add(key)
            out.append(mapping)
    return out


def save_deleted(pid: int, store: ObjectStore) -> list[dict[str, object]]:
    """Copy what ``pid`` maps from files deleted since; returns what was noted this time (saved or why not)."""
    try:
        maps = read_maps(pid)
    except OSError:
        return []
    notes = []
    for mapping in mapped_objects(maps):
        if not mapping.deleted:
            continue
        key = (pid, *file_identity(mapping))
        with store.lock:
            if key in store.seen:
                continue
            source = f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}"
            note = _copy(source, mapping, store)
            store.seen[key] = str(note.get("saved") or note.get("error", ""))
        notes.append(note)
    return notes


def _copy(source: str, mapping: Mapping, store: ObjectStore) -> dict[str, object]:
    note: dict[str, object] = {"path": mapping.path, "deleted": True}
    build_id = read_build_id(Path(source))
    if build_id is None:
        note["error"] = "not an ELF object with a build id (or map_files unreadable: needs root)"
        return note
    note["build_id"] = build_id
    if build_id in store.saved:
        note["saved"] = store.saved[build_id]
        return note
    try:
        size = os.stat(source).st_size
    except OSError as exc:
        note["error"] = f"cannot read {source}: {exc.strerror}"
        return note
    if size > MAX_OBJECT_BYTES or store.total + size > MAX_SAVED_BYTES:
        note["error"] = f"not saved: {size} bytes is over the cap"
        return note
    store.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{build_id}-{os.path.basename(mapping.path)[:80]}"
    target = store.directory / name
    try:
        with open(source, "rb") as src:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except FileExistsError:
        pass  # saved by an earlier run of this collector (resume): same build id, same content
    except OSError as exc:
        note["error"] = f"cannot save it: {exc.strerror or exc}"
        return note
    store.saved[build_id] = name
    store.total += size
    note["saved"] = name
    return note


def object_list(pid: int) -> list[dict[str, object]]:
    """Every file the process maps, with its build id: kept with the proof, for bundles and for the record."""
    try:
        maps = read_maps(pid)
    except OSError:
        return []
    out = []
    for mapping in mapped_objects(maps):
        path = f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}" if mapping.deleted else mapping.path
        out.append({"path": mapping.path, "deleted": mapping.deleted, "build_id": read_build_id(Path(path))})
    return out
