"""User-facing errors: each carries what a one-line message needs, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One mistake in a scenario: file, 1-based line, dotted field path, message."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class ScenarioError(Exception):
    """One or more problems in a scenario file (exit code 2)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


class HarnessError(Exception):
    """A failure the user can act on (build failed, target missing...): one line, exit code 2."""
