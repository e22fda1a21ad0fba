"""A live process as the dynamic linker left it: its memory map, the environment it was started with, its
secure-execution flag, and the values in the executable's GOT slots (read from /proc/PID/mem).

Reading /proc/PID/mem needs ptrace access (the harness is the host's parent, or root); whatever cannot be
read is reported as unknown by the caller, never guessed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

AT_SECURE = 23


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    device: tuple[int, int]        # (major, minor)
    inode: int
    path: str                      # "" for anonymous memory; without the " (deleted)" suffix
    deleted: bool


def read_maps(pid: int) -> list[Mapping]:
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            parts = line.rstrip("\n").split(maxsplit=5)
            if len(parts) < 5:
                continue
            start, _, end = parts[0].partition("-")
            major, _, minor = parts[3].partition(":")
            path = parts[5] if len(parts) == 6 else ""
            deleted = path.endswith(" (deleted)")
            out.append(Mapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16),
                               (int(major, 16), int(minor, 16)), int(parts[4]),
                               path.removesuffix(" (deleted)"), deleted))
    return out


def read_environ(pid: int) -> dict[str, str]:
    """The environment the process was started with (what ld.so saw)."""
    with open(f"/proc/{pid}/environ", "rb") as handle:
        data = handle.read()
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def secure_execution(pid: int) -> bool | None:
    try:
        with open(f"/proc/{pid}/auxv", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    for key, value in struct.iter_unpack("<QQ", data[: len(data) - len(data) % 16]):
        if key == AT_SECURE:
            return bool(value)
    return None


def file_identity(mapping: Mapping) -> tuple[int, int]:
    return os.makedev(*mapping.device), mapping.inode


def load_bias(maps: list[Mapping], identity: tuple[int, int], first_vaddr: int) -> int | None:
    """Where an object was loaded: the start of its mapping at file offset 0, less its first p_vaddr."""
    for mapping in maps:
        if mapping.inode and file_identity(mapping) == identity and mapping.offset == 0:
            return mapping.start - first_vaddr
    return None


def mapping_at(maps: list[Mapping], address: int) -> Mapping | None:
    for mapping in maps:
        if mapping.start <= address < mapping.end:
            return mapping
    return None


def read_words(pid: int, addresses: list[int]) -> dict[int, int]:
    """64-bit words at these addresses of process ``pid`` (those that could be read)."""
    values = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for address in addresses:
            try:
                data = os.pread(fd, 8, address)
            except OSError:
                continue
            if len(data) == 8:
                values[address] = struct.unpack("<Q", data)[0]
    finally:
        os.close(fd)
    return values


DT_NULL, DT_DEBUG = 0, 21


def link_map(pid: int, dynamic_address: int) -> list[str] | None:
    """The objects ld.so loaded, in its link-map order (the executable first, as ""), from the r_debug that the
    executable's DT_DEBUG entry points to. This is ld.so's own record: it survives a process that rewrites its
    environment (redis's setproctitle zeroes /proc/PID/environ). None when it cannot be read."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:     # the process exited since its maps were read (a target that exits in a loop)
        return None
    try:
        r_debug = None
        for index in range(512):
            entry = os.pread(fd, 16, dynamic_address + 16 * index)
            if len(entry) < 16:
                return None
            tag, value = struct.unpack("<qQ", entry)
            if tag == DT_NULL:
                break
            if tag == DT_DEBUG:
                r_debug = value
        if not r_debug:
            return None
        node = struct.unpack("<Q", os.pread(fd, 8, r_debug + 8))[0]      # r_debug.r_map
        names: list[str] = []
        while node and len(names) < 4096:
            _l_addr, l_name, _l_ld, l_next = struct.unpack("<QQQQ", os.pread(fd, 32, node))
            raw = os.pread(fd, 4096, l_name).split(b"\0", 1)[0] if l_name else b""
            names.append(raw.decode(errors="surrogateescape"))
            node = l_next
        return names
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)
