"""Crash signatures and buckets (ClusterFuzz "crash state" / Socorro signature style).

The signature is the first MAX_STATE_FRAMES frames that say something about the bug: signal
trampolines, abort/raise/assert machinery, libc internals, allocator frames, the fault-injection
shim and unsymbolized frames are skipped, and names are cleaned (no offsets, clone suffixes,
parameters, template arguments). For a stack overflow the repeating cycle is used instead, rotated to
a canonical start so that where in the cycle the stack ran out does not matter.

The bucket id hashes (SIGNATURE_VERSION, class, signature) only: no addresses, build ids, hosts or
allocators, so the same bug lands in the same bucket across runs, rebuilds and variants. Bump
SIGNATURE_VERSION whenever these rules change: old and new buckets are then deliberately distinct.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .frames import Frame, after_trampoline, clean_function, crashed_in_allocator, frame_kind

SIGNATURE_VERSION = 1
MAX_STATE_FRAMES = 3
SEPARATOR = " < "


@dataclass(frozen=True)
class Signature:
    text: str  # "estats_update < handle_request < serve_loop"
    frames: tuple[str, ...]
    in_allocator: bool  # the crash happened inside allocator frames (skipped from the text)
    method: str  # "top-frames" | "recursion-cycle" | "fallback" | "empty"
    version: int = SIGNATURE_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["frames"] = list(self.frames)
        return d


@dataclass(frozen=True)
class Cycle:
    start: int  # index of the first frame of the first full repetition
    period: int
    repeats: int  # full repetitions seen (at least MIN_CYCLE_REPEATS)


MIN_CYCLE_REPEATS = 3
MAX_CYCLE_PERIOD = 16


def find_cycle(names: Sequence[str | None], *, max_start: int = 16) -> Cycle | None:
    """The shortest repeating run of frame names (deep recursion). Frames above the cycle (up to
    max_start, e.g. a memset called from the recursion) are allowed."""
    n = len(names)
    for period in range(1, MAX_CYCLE_PERIOD + 1):
        for start in range(0, min(max_start, n)):
            if start + period * MIN_CYCLE_REPEATS > n:
                break
            unit = names[start:start + period]
            if any(x is None for x in unit):
                continue
            reps = 1
            while start + (reps + 1) * period <= n and list(names[start + reps * period:start + (reps + 1) * period]) == list(unit):
                reps += 1
            if reps >= MIN_CYCLE_REPEATS:
                return Cycle(start, period, reps)
    return None


def _canonical_rotation(unit: list[str]) -> list[str]:
    rotations = [unit[i:] + unit[:i] for i in range(len(unit))]
    return min(rotations)


def _fallback(frames: list[Frame]) -> tuple[tuple[str, ...], str]:
    """Nothing survived the skip rules (all libc/allocator/unknown): keep what names there are, or
    module+offset of the top frame, which is stable for one build of a stripped binary."""
    named = [n for n in (clean_function(f.function) for f in frames) if n]
    if named:
        return tuple(named[:MAX_STATE_FRAMES]), "fallback"
    for f in frames:
        if f.module and f.module_offset is not None:
            return (f"{f.module}+{f.module_offset:#x}",), "fallback"
    return ("<no frames>",), "empty"


def crash_state(frames: Sequence[Frame], crash_class: str | None = None, *, keep_templates: bool = False,
                max_frames: int = MAX_STATE_FRAMES) -> Signature:
    """The signature of the crashing thread's frames (top of stack first)."""
    frames = list(frames)
    in_alloc = crashed_in_allocator(frames)
    body = after_trampoline(frames)

    if crash_class == "stack-overflow":
        # Detect the cycle over all named frames (a recursion may pass through libc, e.g. qsort),
        # then keep its application frames.
        names = [clean_function(f.function, keep_templates=keep_templates) for f in body]
        cyc = find_cycle(names)
        if cyc is not None:
            unit_frames = body[cyc.start:cyc.start + cyc.period]
            unit = [n for f, n in zip(unit_frames, names[cyc.start:cyc.start + cyc.period])
                    if n and frame_kind(f) == "app"] or [n for n in names[cyc.start:cyc.start + cyc.period] if n]
            kept = tuple(_canonical_rotation(unit)[:max_frames])
            return Signature(SEPARATOR.join(kept), kept, in_alloc, "recursion-cycle")

    kept_list: list[str] = []
    for f in body:
        if frame_kind(f) != "app":
            continue
        name = clean_function(f.function, keep_templates=keep_templates)
        if name:
            kept_list.append(name)
        if len(kept_list) >= max_frames:
            break
    if kept_list:
        kept = tuple(kept_list)
        return Signature(SEPARATOR.join(kept), kept, in_alloc, "top-frames")
    kept, method = _fallback(body or frames)
    return Signature(SEPARATOR.join(kept), kept, in_alloc, method)


def bucket_id(crash_class: str, signature: Signature | str, *, version: int = SIGNATURE_VERSION) -> str:
    """Short stable hash of (version, class, signature text): 12 hex digits."""
    text = signature.text if isinstance(signature, Signature) else signature
    return hashlib.sha256(f"v{version}\0{crash_class}\0{text}".encode()).hexdigest()[:12]
