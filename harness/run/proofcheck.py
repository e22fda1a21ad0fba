"""Before the night (harness validate, and the pre-run check after the build): a variant that asks for an
allocator its executable cannot take, because one is linked in statically or the executable is static, is
refused with one line at the variant's `allocator:`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from harness.base.errors import HarnessError, Problem
from harness.run.fleet import render
from harness.scenario.model import Scenario
from harness.scenario.variants import apply_variant, variant_for_group
from harness.base.yamlsource import problem


def executable_of(argv0: str, root: Path) -> str | None:
    """The file a host's argv[0] names (relative to the scenario's root, or on PATH); None when not there yet."""
    exe = render(argv0, {"root": str(root)})
    if "{" in exe:
        return None
    if "/" not in exe:
        return shutil.which(exe)
    path = exe if os.path.isabs(exe) else str(root / exe)
    return path if os.path.isfile(path) else None


def allocator_problems(scenario: Scenario, only: set[str] | None = None) -> list[Problem]:
    """One problem per variant (among ``only``, default all) whose allocator its executable cannot take."""
    from harness.collect.proof.binding import refusal
    problems: list[Problem] = []
    for variant in scenario.variants:
        if not variant.allocator or (only is not None and variant.name not in only):
            continue
        for group in scenario.host_groups:
            applied = variant_for_group(variant, group.name)
            if not applied.allocator:
                continue
            try:
                argv = apply_variant(group.target, applied, group.target.command)[0]
            except HarnessError:
                continue   # a missing allocator library is reported when the run starts
            exe = executable_of(argv[0], group.target.root)
            why = refusal(exe, applied.allocator) if exe else None
            if why:
                problems.append(problem(scenario.file, variant.line or 1, f"variants[{variant.index}].allocator",
                                        f"variant {variant.name} asks for {applied.allocator}, but {why}"))
                break
    return problems
