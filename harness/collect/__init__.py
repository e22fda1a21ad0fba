"""Crash collection: find and secure cores, backtrace them, classify, sign and bucket.

Pure library code; the runner calls it (from a worker thread) after a host dies:

    core = find_core(host_dir, pid, since)
    stored = secure_core(core, results_dir, max_bytes=..., compress=False)
    tri = triage_core(stored.path, executable)      # tri.to_dict() → JSON
    stored = compress_stored(stored)                  # optional, after triage
"""
from .classify import Classification, CrashFacts, classify
from .cores import (CorePatternStatus, CoreRefused, StoredCore, compress_stored, core_pattern, core_pattern_status,
                    find_core, secure_core)
from .frames import Frame, ThreadStack, clean_function
from .signature import SIGNATURE_VERSION, Signature, bucket_id, crash_state
from .triage import Triage, triage_core

__all__ = [
    "Classification", "CrashFacts", "classify",
    "CorePatternStatus", "CoreRefused", "StoredCore", "compress_stored", "core_pattern", "core_pattern_status",
    "find_core", "secure_core",
    "Frame", "ThreadStack", "clean_function",
    "SIGNATURE_VERSION", "Signature", "bucket_id", "crash_state",
    "Triage", "triage_core",
]
