"""The live status line: what matters most first, cut to the terminal's width (pure formatting)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

CLEAR = "\r\x1b[K"      # carriage return, erase to the end of the line


def terminal_width(default: int = 80) -> int:
    """Columns of the terminal on stderr; COLUMNS wins, as in other tools; a terminal that reports no size
    (a bare pty) counts as `default`."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError):
            columns = 0
    return columns if columns > 0 else default


def fit(parts: Sequence[str], width: int) -> str:
    """`parts` in order of importance, joined with two spaces: the first always (cut if it alone is too
    long), then each other one that still fits in width - 1 columns (the last column would wrap on some
    terminals), so the least important go first."""
    width = max(width - 1, 8)
    if not parts:
        return ""
    chosen = [parts[0][:width]]
    for part in parts[1:]:
        if len("  ".join(chosen + [part])) <= width:
            chosen.append(part)
    return "  ".join(chosen)


def eta_text(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "ETA ?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"ETA {seconds // 60}m{seconds % 60:02d}s"
    return f"ETA {seconds}s"


def run_eta(*, elapsed_in_trial: float, duration: float, trial: int, trials: int,
            finished_trial_walls: Sequence[float]) -> float:
    """Seconds left in the run: this trial's load, then each remaining trial at the average wall time of the
    finished ones (set-up, drain and stop included), or its load length plus this trial's set-up so far
    when none has finished."""
    left_now = max(duration - elapsed_in_trial, 0.0)
    per_trial = (sum(finished_trial_walls) / len(finished_trial_walls)) if finished_trial_walls else duration
    return left_now + max(trials - trial, 0) * per_trial
