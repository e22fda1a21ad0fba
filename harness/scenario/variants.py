"""What a variant changes in the target's command line and environment."""

from __future__ import annotations

import os
from pathlib import Path

from harness.base.errors import HarnessError
from harness.scenario.model import Target, Variant

# Debian packages that provide each allocator, and the library to preload.
ALLOCATOR_LIBS = {
    "jemalloc": ("libjemalloc2", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    "tcmalloc": ("libtcmalloc-minimal4", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
    "mimalloc": ("libmimalloc2.0", "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2"),
}


def allocator_library(name: str) -> str | None:
    """The path to preload for an allocator (None for glibc's own); a clear error when missing."""
    if name == "glibc":
        return None
    if name in ALLOCATOR_LIBS:
        package, path = ALLOCATOR_LIBS[name]
        if not os.path.exists(path):
            raise HarnessError(f"allocator {name} is not installed: {path} is missing "
                               f"(apt-get install {package}, or run scripts/setup.sh)")
        return path
    if not os.path.exists(name):
        raise HarnessError(f"allocator library not found: {name}")
    return name


def variant_for_group(variant: Variant, group: str) -> Variant:
    """What a variant changes in one fleet group: all of it, unless it names other groups (then nothing
    but its name and whether faults run, which are the trial's)."""
    if not variant.groups or group in variant.groups:
        return variant
    return Variant(name=variant.name, faults=variant.faults)


def apply_variant(target: Target, variant: Variant, command: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(argv template, extra environment) for hosts of this variant."""
    argv = list(variant.command or command)
    for flag, value in variant.args.items():
        if flag in argv:
            position = argv.index(flag)
            if position + 1 < len(argv) and not argv[position + 1].startswith("--"):
                argv[position + 1] = value
            else:
                argv.insert(position + 1, value)
        elif "=" in flag:
            argv.append(flag)
        else:
            argv.extend([flag, value])
    env = dict(variant.env)
    if variant.allocator:
        library = allocator_library(variant.allocator)
        if library:
            env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), library])).strip()
    if "/" in argv[0] and not os.path.isabs(argv[0]) and "{" not in argv[0]:
        argv[0] = str(Path(target.root) / argv[0])
    return argv, env
