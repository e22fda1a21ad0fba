"""Which cores a run keeps, so a night of crashes never fills the disk.

Every crash is counted; its core is kept for the first N of its bucket, then one in M, within the
run's disk cap. When a new core would pass the cap, the oldest cores of buckets that already have
more than one kept core are deleted first (every bucket keeps at least one example), so a new
bucket found at 4 am still gets its core.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.scenario.model import Cores


@dataclass(frozen=True)
class KeptCore:
    uid: str
    path: Path
    size: int
    bucket: str


@dataclass
class CoreRetention:
    policy: Cores
    counts: dict[str, int] = field(default_factory=dict)      # crashes seen per bucket
    kept: list[KeptCore] = field(default_factory=list)        # oldest first

    @property
    def used(self) -> int:
        return sum(core.size for core in self.kept)

    def decide(self, uid: str, core: Path, bucket: str) -> tuple[dict[str, Any], list[KeptCore]]:
        """(what the triage record says about this core, older cores deleted to make room)."""
        policy = self.policy
        seen = self.counts[bucket] = self.counts.get(bucket, 0) + 1
        size = core.stat().st_size if core.exists() else 0
        if seen > policy.keep_per_bucket and (seen - policy.keep_per_bucket) % policy.sample_every != 0:
            core.unlink(missing_ok=True)
            return {"core_kept": False, "core_dropped": f"bucket already has {policy.keep_per_bucket} cores "
                                                        f"(keeping 1 in {policy.sample_every} after)"}, []
        dropped = make_room(self.kept, size, policy.disk_cap)
        if self.used + size - sum(d.size for d in dropped) > policy.disk_cap:
            core.unlink(missing_ok=True)
            return {"core_kept": False,
                    "core_dropped": f"the run's core disk cap ({policy.disk_cap} bytes) is reached"}, []
        for old in dropped:
            old.path.unlink(missing_ok=True)
            self.kept.remove(old)
        path = core
        if policy.compress and shutil.which("zstd"):
            done = subprocess.run(["zstd", "-q", "-3", "--rm", str(core)], capture_output=True)
            if done.returncode == 0:
                path = Path(str(core) + ".zst")
        self.kept.append(KeptCore(uid, path, path.stat().st_size if path.exists() else size, bucket))
        return {"core_kept": True, "core_file": str(path)}, dropped


def make_room(kept: list[KeptCore], size: int, cap: int) -> list[KeptCore]:
    """The cores to delete (oldest first, never a bucket's last one) so `size` more bytes fit in `cap`;
    none if even that is not enough (the caller then refuses the new core instead)."""
    over = sum(core.size for core in kept) + size - cap
    if over <= 0:
        return []
    left = {}
    for core in kept:
        left[core.bucket] = left.get(core.bucket, 0) + 1
    chosen = []
    for core in kept:
        if over <= 0:
            break
        if left[core.bucket] > 1:
            chosen.append(core)
            left[core.bucket] -= 1
            over -= core.size
    return chosen if over <= 0 else []
