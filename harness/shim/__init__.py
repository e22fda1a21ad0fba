"""The fault shim: an LD_PRELOAD library (shim.c) that fails allocations and lock calls on demand,
controlled at run time through a shared control file (control.py), built on first use (build.py),
with checks of whether a target can be interposed at all (interpose.py)."""

from harness.shim.build import ShimBuildError, ensure_shim
from harness.shim.control import ENV_VAR, ControlFile, FaultSlot, ShimCounters

__all__ = ["ENV_VAR", "ControlFile", "FaultSlot", "ShimBuildError", "ShimCounters", "ensure_shim"]
