"""The HTML report of a run: one self-contained page (inline CSS, plots as inline SVG by matplotlib).

Pure reads of the store, like `harness report`: any past, interrupted or killed run can be drawn.
`write_html_report(run_dir)` writes `run_dir/report.html`; docs/html-report.md describes the page.

The page has the run's header and expectations, then per trial (variant × repeat) side by side: the
cascade (hosts alive, crashes per second, each host's down time, fault windows and phases), offered
vs achieved load, latency percentiles, memory per host with trend verdicts; then the crash buckets
with each bucket's backtrace.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from harness.store.crashcounts import Crashes, read_crashes  # noqa: E402
from harness.base.outcomes import ERROR_KINDS  # noqa: E402
from harness.analysis.faultreport import armed_stretches, unknown_counts  # noqa: E402
from harness.analysis.report import build_report  # noqa: E402
from harness.store import reads  # noqa: E402
from harness.base.safefs import write_replace  # noqa: E402
from harness.store.runstore import RunStore, open_run  # noqa: E402
from harness.base.units import format_duration  # noqa: E402

MAX_POINTS = 800            # per series and plot: about a point per pixel; an 8-hour page stays ~1.5 MB
HOST_POINTS_BUDGET = 6000   # per memory panel, shared by the hosts (64 hosts get ~90 points each)
MAX_LANE_SEGMENTS = 400     # down-time bars per host lane; shorter gaps between them are merged
MAX_FRAMES = 30             # backtrace frames shown per bucket
MAX_LANES = 64              # host lanes in the cascade plot (real fleets have at most 64 hosts)
MAX_CRASH_MARKS = 3000      # crosses on the host lanes

Reduce = Literal["mean", "max", "min"]

STATE_COLORS = {"down": "#d62728", "starting": "#ff9896", "paused": "#9467bd", "ejected": "#ff7f0e",
                "stopped": "#7f7f7f"}
WINDOW_STYLE = {  # kind -> (face colour, alpha, hatch): fault windows shaded behind the cascade
    "shim": ("#ffbb78", 0.22, None),
    "network": ("#9edae5", 0.35, None),     # the fault proxy (harness/run/faults/network), by kind:
    "network-latency": ("#9edae5", 0.35, None),
    "network-bandwidth": ("#c7e9c0", 0.45, None),
    "network-slicer": ("#dadaeb", 0.45, None),
    "network-stall": ("#fdd0a2", 0.45, None),
    "network-partition": ("#f7b6d2", 0.50, None),
    "network-reset": ("#e377c2", 0.80, None),
    "resource": ("#dbdb8d", 0.40, None),    # cgroup limits (harness/run/faults/resources.py)
    "host-loss": ("#c5b0d5", 0.55, None),
    "gap": ("#bbbbbb", 0.60, "//"),
}


# --- pure helpers ------------------------------------------------------------------------------

def decimate(t: Sequence[float], values: Sequence[float | None], max_points: int = MAX_POINTS,
             how: Reduce = "mean", spans: Sequence[float] | None = None) -> tuple[list[float], list[float]]:
    """At most `max_points` points, by merging samples into equal-time buckets (rows may cover
    different spans: per-second rows, then per-minute roll-ups). `how` says what a merged point
    keeps: the span-weighted mean (rates), the max (latency and memory: spikes must stay visible), or
    the min (hosts alive: the worst moment). None (no data) becomes NaN and is
    skipped inside a bucket; a bucket with no data is NaN, so lines break there."""
    ts = [float(x) for x in t]
    vs = [math.nan if v is None else float(v) for v in values]
    weights = [float(s) for s in spans] if spans is not None else [1.0] * len(ts)
    if len(ts) <= max_points or max_points < 1:
        return ts, vs
    lo, hi = ts[0], ts[-1]
    width = (hi - lo) / max_points or 1.0
    buckets: dict[int, list[int]] = {}
    for i, x in enumerate(ts):
        buckets.setdefault(min(int((x - lo) / width), max_points - 1), []).append(i)
    out_t, out_v = [], []
    for key in sorted(buckets):
        members = buckets[key]
        good = [i for i in members if not math.isnan(vs[i])]
        out_t.append(ts[members[0]])
        out_v.append(_reduce([vs[i] for i in good], [weights[i] for i in good], how) if good else math.nan)
    return out_t, out_v


def _reduce(values: list[float], weights: list[float], how: Reduce) -> float:
    if how == "max":
        return max(values)
    if how == "min":
        return min(values)
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else sum(values) / len(values)


@dataclass(frozen=True)
class Window:
    """A shaded stretch of a trial's timeline: a shim, network or resource fault armed, a host lost, or a gap."""
    start: float
    end: float
    kind: str    # "shim" | "network-<kind>" | "resource" | "host-loss" | "gap"
    label: str


def fault_windows(events: Iterable[dict[str, Any]], end: float) -> list[Window]:
    """Windows from a trial's events (each with t, kind, host, detail as a dict), in time order.

    Shim faults: fault-arm .. the next fault-disarm of the same fault (or the trial's end; the runner
    only records a disarm that happens before the end); network and resource faults alike (their events say
    their `family`; a reset at one moment is a zero-width window). Host loss: from the event to the lost host's
    next start (a kill, restarted after down_for) or resume (a pause); an instant loss (no host
    chosen) is a zero-width window. Gaps of a resumed run: detail from .. to."""
    events = sorted(events, key=lambda e: e["t"])
    # a fault armed on several machines (--cluster) is one window (harness.analysis.faultreport)
    windows = [Window(stretch["from"], stretch["to"], _window_kind(stretch["arms"][0]), _shim_label(stretch["arms"][0]))
               for stretch in armed_stretches(events, end)]
    for index, event in enumerate(events):
        kind, detail = event["kind"], event.get("detail") or {}
        if kind == "host-loss":
            hosts = detail.get("hosts") or []
            how = detail.get("how", "loss")
            back = [_next_return(events[index + 1:], host, how, end) for host in hosts]
            label = f"host-loss {how} " + (", ".join(f"h{h}" for h in hosts) or "(none up)")
            windows.append(Window(event["t"], max(back, default=event["t"]), "host-loss", label))
        elif kind == "gap":
            # The load timeline continues where it stopped (harness resume): a mark, with the time down.
            start = float(detail.get("resumed_at", event["t"]))
            windows.append(Window(start, start, "gap", f"resumed after {float(detail.get('down_seconds', 0)):.0f} s down"))
    return sorted(windows, key=lambda w: (w.start, w.kind))


def _window_kind(detail: dict[str, Any]) -> str:
    """shim | resource | network-<kind> (each network fault kind has its colour)."""
    family = detail.get("family") or "shim"
    if family == "network":
        kind = f"network-{detail.get('fault_kind')}"
        return kind if kind in WINDOW_STYLE else "network"
    return family if family in WINDOW_STYLE else "shim"


def _shim_label(detail: dict[str, Any]) -> str:
    if detail.get("family") == "network" and detail.get("label"):
        return str(detail["label"])
    if detail.get("family") == "resource" and detail.get("limit"):
        return f"{detail['limit']} limit"
    parts = [str(detail.get("fault_kind") or "shim fault"), str(detail.get("mode") or "")]
    return " ".join(p for p in parts if p) + " armed"


def _next_return(later: list[dict[str, Any]], host: int, how: str, end: float) -> float:
    wanted = ("resume",) if how == "pause" else ("start",)
    return next((e["t"] for e in later if e.get("host") == host and e["kind"] in wanted), end)


_LANE_STATE = {"start": "starting", "ready": None, "resume": None, "pause": "paused", "exit": "down",
               "no-restart": "stopped"}


def lane_rows(events: Iterable[dict[str, Any]], end: float) -> dict[int, list[dict[str, Any]]]:
    """host -> [{t, span, state}] where it was not up (starting, paused, down, stopped), from its events
    (t, kind, host), cut to [0, end]. A `stop` (the harness stopping the fleet at the end) ends the lane
    until a host starts again (a resumed run)."""
    lanes: dict[int, list[dict[str, Any]]] = {}
    state: dict[int, tuple[str | None, float]] = {}

    def close(host: int, until: float) -> None:
        current, since = state.get(host, (None, 0.0))
        lo, hi = max(since, 0.0), min(until, end)
        if current is not None and hi > lo:
            lanes.setdefault(host, []).append({"t": lo, "span": hi - lo, "state": current})

    for event in sorted(events, key=lambda e: e["t"]):
        host, kind, t = event["host"], event["kind"], float(event["t"])
        if state.get(host, (None, 0.0))[0] == "ended" and kind != "start":   # a resumed run starts hosts again
            continue
        close(host, t)
        state[host] = ("ended", t) if kind == "stop" else (_LANE_STATE.get(kind), t)
    for host, (current, _) in state.items():
        if current != "ended":
            close(host, end)
    return lanes


def runs_of(t: Sequence[float], spans: Sequence[float], flags: Sequence[bool],
            max_segments: int = MAX_LANE_SEGMENTS) -> list[tuple[float, float]]:
    """(start, width) of each run of rows whose flag is set (a host down, say). When there are more
    than `max_segments`, the shortest gaps between runs are closed until they fit (the lane of a host
    that crash-loops all night becomes one long bar, which is what it looked like)."""
    runs: list[list[float]] = []
    for x, span, flag in zip(t, spans, flags):
        if not flag:
            continue
        if runs and abs(runs[-1][1] - x) < 1e-9:
            runs[-1][1] = x + span
        else:
            runs.append([x, x + span])
    while len(runs) > max_segments:
        gaps = sorted(runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1))
        limit = gaps[len(runs) - max_segments - 1]
        merged = [runs[0]]
        for run in runs[1:]:
            if run[0] - merged[-1][1] <= limit:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        runs = merged
    return [(a, b - a) for a, b in runs]


def anchor(bucket: str) -> str:
    """An HTML id for a bucket (ids are hex hashes; untriaged ones are "untriaged:SIGSEGV")."""
    return "bucket-" + re.sub(r"[^A-Za-z0-9_-]", "_", bucket)


def esc(value: Any) -> str:
    """Everything that comes from the store goes through here (target output, signatures, names)."""
    return html.escape("" if value is None else str(value), quote=True)


def split_source(source: str | None) -> tuple[str, str]:
    """"dir/file.c:12:3" -> ("dir/file.c", "12")."""
    if not source:
        return "", ""
    match = re.match(r"^(.*?):(\d+)(?::\d+)?$", source)
    return (match.group(1), match.group(2)) if match else (source, "")


# --- reading the store -------------------------------------------------------------------------

@dataclass
class TrialData:
    """What the plots of one trial need, read once from the store."""
    id: int
    label: str
    samples: list[dict[str, Any]]
    hosts: dict[int, list[dict[str, Any]]]    # host -> memory rows (one per process and bucket), in time order
    lanes: dict[int, list[dict[str, Any]]]    # host -> rows where it was not up (t, span, state), in time order
    crashes: list[tuple[float, int]]            # (t, host) of the crash rows: every crash, or a sample
    windows: list[Window]
    gaps: list[Window] = field(default_factory=list)
    variant: str = ""
    names: dict[int, str] = field(default_factory=dict)   # a mixed fleet's hosts are named after their group
    counted: Crashes | None = None              # exact crash counts (also of a compactly stored cascade)

    def name(self, host: int) -> str:
        return self.names.get(host, f"h{host}")

    @property
    def host_ids(self) -> list[int]:
        return sorted(set(self.hosts) | set(self.lanes))


def _by_host(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    hosts: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        hosts.setdefault(row["host"], []).append(row)
    return hosts


def _read_trial(store: RunStore, trial: dict[str, Any], hosts: int) -> TrialData:
    """One trial's series. Host rows are bucketed inside SQLite (a night of 64 hosts has 1.8 million
    per-second rows): memory per process and bucket keeps its highest value, a lane bucket its worst
    state; short runs have one-second buckets, i.e. the rows themselves."""
    tid, end = trial["id"], float(trial["end"])
    samples = reads.plot_samples(store, tid)
    width = max(1, int(end // max(60, HOST_POINTS_BUDGET // max(hosts, 1))))
    memory = reads.memory_buckets(store, tid, width)
    lane_width = max(1, int(end // (2 * MAX_POINTS)))
    lane_events = reads.lane_events(store, tid, MAX_LANES)
    if any(e["kind"] == "ready" for e in lane_events):
        # Down, starting, paused: from the events, at the moment each happened (a host killed at 4.00 s is
        # red from 4.00 s); only "ejected" (the balancer's view) comes from the per-second samples. (A
        # simulated host has no start-up to wait for and no `ready` event, and a crash storm's exits and
        # restarts may be counted rather than stored: its lanes come from the samples.)
        lanes = [{"host": h, **row} for h, rows in lane_rows(lane_events, end).items() for row in rows]
        lanes += reads.ejected_lanes(store, tid, MAX_LANES, lane_width)
        lanes.sort(key=lambda r: (r["host"], r["t"]))
    else:   # a store without readiness events: the state each host was sampled in, per second
        lanes = reads.state_lanes(store, tid, lane_width)
    counted = read_crashes(store, tid)
    crashes = [(r["t"], r["host"]) for r in counted.rows]
    label = f"{trial['variant']}" + (f" #{trial['repeat'] + 1}" if trial["repeat"] else "") + f" (trial {tid})"
    windows = fault_windows(_timeline_events(store, tid), end)
    names = reads.host_names(store, tid)
    return TrialData(tid, label, samples, _by_host(memory), _by_host(lanes), crashes, windows,
                     [w for w in windows if w.kind == "gap"], trial["variant"], names, counted)


def _timeline_events(store: RunStore, tid: int) -> list[dict[str, Any]]:
    events = reads.fault_timeline_events(store, tid)
    if any(e["kind"] == "host-loss" for e in events):
        # a lost host's window ends at its next start or resume; a crash-looping fleet has many starts,
        # so they are only read (without their argv) when there was a host loss at all
        events += reads.start_resume_events(store, tid)
    for event in events:
        event["detail"] = json.loads(event["detail"] or "{}")
    return events


# --- plots ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeAxis:
    """Seconds are drawn in a unit that suits the run's length."""
    unit: float
    name: str

    @staticmethod
    def for_duration(seconds: float) -> "TimeAxis":
        if seconds > 3 * 3600:
            return TimeAxis(3600.0, "h")
        if seconds > 20 * 60:
            return TimeAxis(60.0, "min")
        return TimeAxis(1.0, "s")

    def x(self, values: Iterable[float]) -> list[float]:
        return [v / self.unit for v in values]


@dataclass
class PlotContext:
    axis: TimeAxis
    end: float                              # x limit (seconds), the same for every trial
    phases: list[dict[str, Any]]
    hosts: int
    rate_max: float = 1.0
    latency_range: tuple[float, float] = (0.1, 1000.0)   # ms
    crash_bin: float = 1.0                  # seconds per crash bar
    crash_max: int = 1                      # most crashes in one bar, over all trials
    trends: dict[str, Any] | None = None    # harness.analysis.trends.run_trends(run_dir): verdicts in the memory titles


def _rc() -> dict[str, Any]:
    return {"svg.fonttype": "none",        # text stays text: smaller, searchable, selectable
            "svg.hashsalt": "harness",      # stable clip-path ids, so the same run gives the same page
            "text.parse_math": False,       # a '$' in a phase or variant name is just a '$'
            "font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.25,
            "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 8,
            "legend.frameon": False}


def _decorate(ax: Axes, ctx: PlotContext, windows: Sequence[Window] = (), label_phases: bool = True) -> None:
    """Phases as dotted lines labelled along the top, fault windows shaded, gaps hatched."""
    ax.set_xlim(0, ctx.end / ctx.axis.unit)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for phase, row in zip(ctx.phases, label_rows([p["start"] / ctx.end for p in ctx.phases])):
        if phase["start"] > 0:
            ax.axvline(phase["start"] / ctx.axis.unit, color="#555555", linestyle=":", linewidth=0.8, zorder=1)
        if label_phases and phase["start"] < ctx.end:
            ax.text(phase["start"] / ctx.axis.unit, 1.0 + 0.075 * row, " " + str(phase["name"]), transform=top,
                    fontsize=7.5, va="bottom", ha="left", color="#333333", clip_on=False)
    for window in windows:
        color, alpha, hatch = WINDOW_STYLE[window.kind]
        if window.end > window.start:
            ax.axvspan(window.start / ctx.axis.unit, window.end / ctx.axis.unit, facecolor=color, alpha=alpha,
                       hatch=hatch, edgecolor="#888888" if hatch else "none", linewidth=0, zorder=0)
        else:
            ax.axvline(window.start / ctx.axis.unit, color=color, linewidth=1.5, zorder=1)


def label_rows(positions: Sequence[float], min_gap: float = 0.09, rows: int = 3) -> list[int]:
    """Which line each phase label goes on (0 = just above the plot): a label starting closer than
    `min_gap` (a fraction of the width) to the last one on a line goes up a line, so that short
    phases (a 10-minute spike in an 8-hour night) keep readable names."""
    last: list[float] = [-math.inf] * rows
    chosen = []
    for x in positions:
        row = next((r for r in range(rows) if x - last[r] >= min_gap), rows - 1)
        last[row] = x
        chosen.append(row)
    return chosen


def _mid(rows: Sequence[dict[str, Any]]) -> list[float]:
    return [r["t"] + r["span"] / 2 for r in rows]


def plot_load(trial: TrialData, ctx: PlotContext) -> Figure:
    fig, ax = plt.subplots(figsize=(7.2, 2.6), layout="constrained")
    rows = trial.samples
    t, spans = _mid(rows), [r["span"] for r in rows]
    series = [
        ("offered (scheduled)", [r["offered_rate"] for r in rows], "#7f7f7f", "--"),
        ("ok/s", [r["ok"] / r["span"] for r in rows], "#2ca02c", "-"),
        ("errors/s", [sum(r[kind] for kind in ERROR_KINDS) / r["span"] for r in rows],
         "#d62728", "-"),
    ]
    for name, values, color, style in series:
        xs, ys = decimate(t, values, MAX_POINTS, "mean", spans)
        ax.plot(ctx.axis.x(xs), ys, label=name, color=color, linestyle=style, linewidth=1.2)
    _decorate(ax, ctx, trial.gaps)
    ax.set_ylim(0, ctx.rate_max * 1.08)
    ax.set_ylabel("requests/s")
    ax.set_xlabel(f"t ({ctx.axis.name})")
    ax.legend(loc="upper left", ncols=3)
    return fig


def plot_cascade(trial: TrialData, ctx: PlotContext) -> Figure:
    """Hosts alive with crashes per second over it, and a lane per host showing when it was down."""
    lanes = min(max(len(trial.host_ids), 1), MAX_LANES)
    lane_height = min(3.2, max(0.9, 0.16 * lanes))
    fig, (ax, lane_ax) = plt.subplots(2, 1, figsize=(7.2, 2.7 + lane_height), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [2.7, lane_height]})
    rows = trial.samples
    xs, ys = decimate([r["t"] for r in rows], [r["hosts_alive"] for r in rows], MAX_POINTS, "min")
    _decorate(ax, ctx, trial.windows)
    (alive_line,) = ax.step(ctx.axis.x(xs), ys, where="post", color="#1f77b4", linewidth=1.6, label="hosts alive",
                            zorder=3)
    ax.set_ylim(0, ctx.hosts + 0.5)
    ax.set_ylabel("hosts alive")
    crash_ax = ax.twinx()
    ax.set_zorder(crash_ax.get_zorder() + 1)   # the hosts-alive line over the crash bars
    ax.patch.set_visible(False)
    bins = _crash_bins(trial, ctx.crash_bin)
    bars = None
    if bins:
        bars = crash_ax.bar([b / ctx.axis.unit for b in bins], list(bins.values()), width=ctx.crash_bin / ctx.axis.unit,
                     align="edge", color="#d62728", alpha=0.75, label="crashes", zorder=2)
    crash_ax.set_ylim(0, ctx.crash_max * 2.2)   # the same scale in every trial; bars stay in the lower half
    crash_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    crash_ax.set_ylabel("crashes" + (f" per {_fmt_seconds(ctx.crash_bin)}" if ctx.crash_bin != 1 else " per second"),
                        color="#d62728")
    crash_ax.tick_params(axis="y", colors="#d62728")
    crash_ax.grid(False)
    crash_ax.spines["right"].set_visible(True)
    handles = [alive_line] + ([bars] if bars is not None else [])
    handles += _window_legend(ax, trial.windows)
    long_labels = sum(len(str(h.get_label())) for h in handles) > 70
    ax.legend(handles=handles, loc="lower left", ncols=2 if long_labels else 4, fontsize=7.5)
    _plot_lanes(lane_ax, trial, ctx)
    _decorate(lane_ax, ctx, [w for w in trial.windows if w.kind in ("host-loss", "gap")], label_phases=False)
    lane_ax.set_xlabel(f"t ({ctx.axis.name})")
    return fig


def _crash_bins(trial: TrialData, width: float) -> dict[float, int]:
    """Crashes per bar of `width` seconds, from the exact counts."""
    if trial.counted is not None:
        return trial.counted.per_bin(width)
    bins: dict[float, int] = {}
    for t, _ in trial.crashes:
        start = math.floor(t / width) * width
        bins[start] = bins.get(start, 0) + 1
    return bins


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _window_legend(ax: Axes, windows: Sequence[Window]) -> list[Any]:
    from matplotlib.patches import Patch
    seen: dict[str, Any] = {}
    for window in windows:
        name = {"host-loss": "host lost", "gap": "gap in the run"}.get(window.kind, window.label)
        if name not in seen:
            color, alpha, hatch = WINDOW_STYLE[window.kind]
            seen[name] = Patch(facecolor=color, alpha=alpha, hatch=hatch, edgecolor="#888888", label=name)
    return list(seen.values())[:5]


def _plot_lanes(ax: Axes, trial: TrialData, ctx: PlotContext) -> None:
    """One lane per host: coloured where the host was not up; a cross at each of its crashes."""
    hosts = trial.host_ids[:MAX_LANES]
    min_width = ctx.end / 400   # a pixel or two: a 30 s restart in an 8-hour night stays visible
    if not hosts:
        ax.text(0.5, 0.5, "no per-host samples in this run", transform=ax.transAxes, ha="center", va="center",
                color="#555555")
        ax.set_yticks([])
        ax.grid(False)
        return
    for lane, host in enumerate(hosts):
        rows = trial.lanes.get(host, [])
        t, spans = [r["t"] for r in rows], [r["span"] for r in rows]
        for state, color in STATE_COLORS.items():
            segments = runs_of(t, spans, [r["state"] == state for r in rows])
            if segments:
                ax.broken_barh([(a / ctx.axis.unit, max(w, min_width) / ctx.axis.unit) for a, w in segments],
                               (lane - 0.4, 0.8),
                               facecolors=color, linewidth=0, zorder=2)
    lane_of = {host: lane for lane, host in enumerate(hosts)}
    marks = [(t, lane_of[h]) for t, h in trial.crashes if h in lane_of]
    crash_x = [t / ctx.axis.unit for t, _ in marks]
    crash_y = [lane for _, lane in marks]
    sampled = trial.counted is not None and trial.counted.sampled
    if 0 < len(marks) <= MAX_CRASH_MARKS and not sampled:   # beyond that a smear: the bars above count them
        ax.scatter(crash_x, crash_y, marker="x", s=14, color="black", linewidths=0.8, zorder=3)
    ax.set_ylim(len(hosts) - 0.5, -0.5)
    step = max(1, math.ceil(len(hosts) / 16))
    ax.set_yticks(range(0, len(hosts), step), [trial.name(h) for h in hosts[::step]], fontsize=7)
    ax.grid(False)
    ax.set_ylabel("host")


def plot_latency(trial: TrialData, ctx: PlotContext) -> Figure:
    fig, ax = plt.subplots(figsize=(7.2, 2.6), layout="constrained")
    rows = trial.samples   # seconds without a reply stay in as gaps: the line must not bridge them
    t, spans = _mid(rows), [r["span"] for r in rows]
    for key, name, color in (("p50", "p50", "#2ca02c"), ("p99", "p99", "#ff7f0e"), ("p999", "p99.9", "#d62728"),
                             ("max", "max", "#bbbbbb")):
        xs, ys = decimate(t, [r[key] * 1e3 if r[key] is not None else None for r in rows], MAX_POINTS, "max", spans)
        ax.plot(ctx.axis.x(xs), ys, label=name, color=color, linewidth=0.8 if key == "max" else 1.2,
                zorder=2 if key == "max" else 3)
    _decorate(ax, ctx, trial.gaps)
    ax.set_yscale("log")
    ax.set_ylim(*ctx.latency_range)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # plain numbers, not mathtext
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel(f"t ({ctx.axis.name})")
    ax.legend(loc="upper left", ncols=4)
    return fig


MEMORY_PANELS = (("rss", "RSS (MiB)", 1 / 2**20), ("live", "shim heap live (MiB)", 1 / 2**20),
                 ("threads", "threads", 1.0), ("fds", "open fds", 1.0))
TREND_METRIC = {"rss": "rss", "live": "heap", "threads": "threads", "fds": "fds"}   # our key -> trends' key


def plot_memory(trial: TrialData, ctx: PlotContext) -> Figure:
    """Per host, one line per process (a restart is a new pid: the line breaks there)."""
    panels = [p for p in MEMORY_PANELS if any(r[p[0]] is not None for rows in trial.hosts.values() for r in rows)]
    panels = panels or [MEMORY_PANELS[0]]
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7.2, 2.1 * nrows), sharex=True, layout="constrained",
                             squeeze=False)
    colors = plt.get_cmap("tab10" if len(trial.hosts) <= 10 else "viridis")
    budget = max(60, HOST_POINTS_BUDGET // max(len(trial.hosts), 1))
    for panel_ax, (key, title, scale) in zip(axes.flat, panels):
        for n, host in enumerate(sorted(trial.hosts)):
            color = colors(n % 10) if len(trial.hosts) <= 10 else colors(n / max(len(trial.hosts) - 1, 1))
            xs, ys = [], []
            for part_x, part_y in _process_series(trial.hosts[host], key, budget):
                xs += ctx.axis.x(part_x) + [math.nan]   # one line per host, broken between its processes
                ys += [y * scale for y in part_y] + [math.nan]
            panel_ax.plot(xs, ys, color=color, linewidth=0.9, label=trial.name(host))
        _decorate(panel_ax, ctx, trial.gaps, label_phases=False)
        verdict = trend_verdict(ctx.trends, trial.variant, TREND_METRIC[key])
        verdict = "" if verdict.startswith("too short") else verdict   # the table says why; titles stay short
        panel_ax.set_title(title + (f" — {verdict}" if verdict else ""), loc="left", fontsize=9,
                           color="#b00000" if verdict.startswith("leaks") else "black")
        panel_ax.set_ylim(bottom=0)
        if scale == 1.0:
            panel_ax.yaxis.set_major_locator(MaxNLocator(integer=True))   # counts of threads and fds
    for extra in list(axes.flat)[len(panels):]:
        extra.set_visible(False)
    for bottom in axes[-1]:
        bottom.set_xlabel(f"t ({ctx.axis.name})")
    if len(trial.hosts) <= 10:
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=10, fontsize=7.5)
    return fig


def trend_verdict(trends: dict[str, Any] | None, variant: str, metric: str) -> str:
    """The variant's verdict on one metric ("leaks 3.2 MiB/h", "flat"...), "" when there is none."""
    fit = ((trends or {}).get("variants", {}).get(variant, {}).get("metrics") or {}).get(metric)
    return str(fit["text"]) if fit else ""


def _process_series(rows: list[dict[str, Any]], key: str, budget: int) -> list[tuple[list[float], list[float]]]:
    """A host's rows split into one line per process: at each new pid, and where rows are missing (a
    pid the kernel reused for a later process must not join two lives). Each part is decimated with
    its share of the host's point budget."""
    parts: list[list[dict[str, Any]]] = []
    for row in rows:
        if row[key] is None:
            continue
        last = parts[-1][-1] if parts else None
        if last is None or row["pid"] != last["pid"] or row["t"] > last["t"] + 2 * max(last["span"], 1):
            parts.append([])
        parts[-1].append(row)
    total = sum(len(p) for p in parts) or 1
    series = []
    for part in parts:
        share = max(2, budget * len(part) // total)
        series.append(decimate(_mid(part), [r[key] for r in part], share, "max", [r["span"] for r in part]))
    return series


def svg_of(fig: Figure, svg_id: str, title: str) -> str:
    """The figure as an inline <svg>: no XML prolog, ids prefixed (several SVGs share one document, and
    matplotlib's own ids repeat across figures), scalable, with a <title> for tools and tests."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'(\bid=")([^"]+)"', lambda m: f'{m.group(1)}{svg_id}-{m.group(2)}"', text)
    text = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{svg_id}-{m.group(1)})", text)
    text = re.sub(r'(href=")#([^"]+)"', lambda m: f'{m.group(1)}#{svg_id}-{m.group(2)}"', text)
    head_end = text.index(">")
    head = re.sub(r'\s(width|height)="[^"]*"', "", text[:head_end])
    return (f'{head} id="{esc(svg_id)}" class="plot" role="img" aria-label="{esc(title)}">'
            f"<title>{esc(title)}</title>{text[head_end + 1:]}")


# --- page ----------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1500px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:12px 0 6px}
.meta{display:flex;flex-wrap:wrap;gap:6px 20px;margin:6px 0 10px;color:#333}.meta b{color:#000}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.complete,.held{background:#d8f3dc;color:#1b5e20}.interrupted,.incomplete,.failed,.FAILED{background:#ffe0e0;color:#8b0000}
.running{background:#fff3cd;color:#7a5b00}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.zero{color:#b00020;font-weight:600}
code,pre{font-family:"DejaVu Sans Mono",monospace;font-size:12px}
pre{background:#f4f4f4;padding:6px 10px;overflow-x:auto;border:1px solid #e4e4e4}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:14px}
.cell{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px 10px}
.cell h3{margin:0 0 4px}
svg.plot{width:100%;height:auto;display:block}
.note{color:#555;font-size:12.5px}
.bucket{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:6px 14px;margin:12px 0}
.bucket:target{outline:3px solid #ffbf47}
nav a{margin-right:14px}
"""


def write_html_report(run_dir: Path, out: Path | None = None, *, report: dict[str, Any] | None = None,
                      trends: dict[str, Any] | None = None) -> Path:
    """Write the run's HTML report (default `run_dir/report.html`) and return its path.

    `report` is `build_report(run_dir)` by default; pass a report that has been judged (with its
    "expectations", as `harness report`/`run` have it) to show the expectations too. `trends` is
    `harness.analysis.trends.run_trends(run_dir)` by default (pass it when already computed)."""
    out = out or run_dir / "report.html"
    report = report if report is not None else build_report(run_dir)
    page = render_html(run_dir, report, trends if trends is not None else _trends(run_dir))
    write_replace(out, page.encode("utf-8"))   # a reader never sees half a page; never through a symlink
    return out


def _trends(run_dir: Path) -> dict[str, Any]:
    from harness.analysis.trends import run_trends
    try:
        return run_trends(run_dir)
    except Exception as exc:  # noqa: BLE001 - an optional analysis must not cost the whole page
        return {"error": f"{type(exc).__name__}: {exc}"}


def render_html(run_dir: Path, report: dict[str, Any], trends: dict[str, Any] | None = None) -> str:
    store = open_run(run_dir)
    try:
        trials = [_read_trial(store, trial, int(report["hosts"])) for trial in report["trials"]]
        examples = _bucket_examples(store)
        footprint = reads.harness_footprint_rows(store)
    finally:
        store.close()
    ctx = _context(report, trials)
    ctx.trends = trends
    with plt.rc_context(_rc()):
        sections = [
            _header(report, trials),
            _resolution_note(ctx),
            _summary(report),
            _requests_section(report),
            _faults_section(report),
            _plot_section("cascade", "Cascade: hosts alive and crashes", trials, ctx, plot_cascade,
                          "Hosts alive (fewest in each second), crashes (red bars), fault windows "
                          "shaded; below, one lane per host: red down, pink starting, purple paused, orange "
                          "ejected by the balancer; a cross at each crash."),
            _plot_section("load", "Offered vs achieved load", trials, ctx, plot_load,
                          "Scheduled arrivals per second (dashed), good replies and errors per second."),
            _plot_section("latency", "Latency percentiles", trials, ctx, plot_latency,
                          "Measured from each request's intended send time; log scale."),
            _plot_section("memory", "Memory and resources per host", trials, ctx, plot_memory,
                          "One line per process: a restart starts a new line. Titles carry the variant's "
                          "trend verdict.", trend_table(trends)),
            _faults_section(report),
            _buckets_section(report, examples),
            _footprint_section(footprint, report),
        ]
    title = f"harness report — {report['scenario']} — {report['run_id']}"
    nav = "".join(f'<a href="#{s}">{s}</a>' for s in ("cascade", "load", "latency", "memory", "faults", "crashes")
                  if f'<section id="{s}">' in "".join(sections))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main><nav>{nav}</nav>" + "".join(sections)
            + f"<p class=\"note\">written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by harness</p></main></body></html>\n")


def _context(report: dict[str, Any], trials: list[TrialData]) -> PlotContext:
    """Shared scales, so trials side by side compare at a glance."""
    end = max([float(report["duration"])] + [float(t["end"]) for t in report["trials"]])
    ctx = PlotContext(axis=TimeAxis.for_duration(end), end=end, phases=report["phases"],
                      hosts=max([int(report["hosts"])] + [len(t.host_ids) for t in trials]))
    rates = [max(r["offered_rate"], r["ok"] / r["span"], r["offered"] / r["span"]) for t in trials for r in t.samples]
    ctx.rate_max = max(rates, default=1.0) or 1.0
    latencies = [v * 1e3 for t in trials for r in t.samples for v in (r["p50"], r["max"]) if v]
    if latencies:
        ctx.latency_range = (max(min(latencies) / 1.5, 1e-3), max(latencies) * 1.5)
    ctx.crash_bin = 1.0 if end <= MAX_POINTS else _nice_bin(end / MAX_POINTS)
    ctx.crash_max = max([1] + [n for t in trials for n in _crash_bins(t, ctx.crash_bin).values()])
    return ctx


def _nice_bin(seconds: float) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if step >= seconds:
            return float(step)
    return 3600.0 * math.ceil(seconds / 3600)


def _resolution_note(ctx: PlotContext) -> str:
    if ctx.end <= MAX_POINTS:
        return ""
    return (f'<p class="note">A long run: each plotted point merges about {_fmt_seconds(round(ctx.end / MAX_POINTS))} '
            "of samples (rates are averaged, latency and memory keep the highest value, hosts alive the fewest); "
            f"crashes are counted per {_fmt_seconds(ctx.crash_bin)}.</p>")


def _plot_section(key: str, title: str, trials: list[TrialData], ctx: PlotContext,
                  plot: Callable[[TrialData, PlotContext], Figure], note: str,
                  extra: str = "") -> str:
    cells = []
    for trial in trials:
        svg_id = f"{key}-t{trial.id}"
        svg = svg_of(plot(trial, ctx), svg_id, f"{title}: {trial.label}")
        cells.append(f'<div class="cell"><h3>{esc(trial.label)}</h3>{svg}</div>')
    body = "".join(cells) or '<p class="note">no trials recorded</p>'
    return (f'<section id="{key}"><h2>{esc(title)}</h2><p class="note">{esc(note)}</p>{extra}'
            f'<div class="grid">{body}</div></section>')


VERDICT_CLASS = {"leaks": "FAILED", "shrinks": "running", "flat": "held"}


def trend_table(trends: dict[str, Any] | None) -> str:
    """Per variant and metric: the trend verdict (Theil-Sen slope per hour, harness.analysis.trends) with its interval."""
    if not trends:
        return ""
    if "error" in trends:
        return f'<p class="note">trends unavailable: {esc(trends["error"])}</p>'
    from harness.analysis.trends import slope_text
    metrics = list(trends.get("metrics", []))
    rows = [(name, entry["metrics"], str(entry.get("series", ""))) for name, entry in trends.get("variants", {}).items()]
    harness = (trends.get("harness") or {}).get("metrics") or {}
    if any(harness.values()):
        rows.append(("(harness itself)", harness, ""))
    body = []
    for name, fits, processes in rows:
        cells = []
        for metric in metrics:
            fit = fits.get(metric)
            if fit is None:
                cells.append("<td>-</td>")
                continue
            badge = VERDICT_CLASS.get(str(fit["verdict"]), "")
            cells.append(f'<td><span class="badge {badge}">{esc(fit["text"])}</span><br>'
                         f'<span class="note">{esc(slope_text(fit))}</span></td>')
        body.append(f"<tr><td>{esc(name)}</td><td class=\"num\">{esc(processes)}</td>{''.join(cells)}</tr>")
    if not body:
        return ""
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    confidence = trends.get("settings", {}).get("confidence", 0.95)
    return (f'<h3>Trends</h3><p class="note">Slope per hour of each process (Theil–Sen, warm-up skipped), the median '
            f"over a variant's processes, {confidence:.0%} interval; a restart starts a new process.</p>"
            f'<table id="trends"><tr><th>variant</th><th>processes</th>{head}</tr>{"".join(body)}</table>')


def _fmt_time(wall: float | None) -> str:
    return "-" if wall is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _header(report: dict[str, Any], trials: list[TrialData]) -> str:
    status = str(report["status"])
    wall = (report["ended"] - report["started"]) if report.get("ended") else None
    items = [("run", report["run_id"]), ("scenario", f"{report['scenario']} ({report['scenario_file']})"),
             ("seed", report["seed"]), ("duration", f"{format_duration(report['duration'])} per trial"), ("hosts", report["hosts"]),
             ("started", _fmt_time(report["started"])), ("ended", _fmt_time(report.get("ended"))),
             ("wall time", "-" if wall is None else format_duration(wall)), ("results", report["run_dir"])]
    meta = "".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in items)
    parts = [f"<header><h1>{esc(report['scenario'])} <span class=\"badge {esc(status)}\">{esc(status)}</span></h1>"
             f"<div class=\"meta\">{meta}</div>"]
    gaps = [(t.label, g) for t in trials for g in t.gaps]
    if gaps:
        rows = "".join(f"<li>{esc(label)}: the harness stopped and the run was resumed at {g.start:.0f} s of load, "
                       f"{esc(g.label)}; the load after it continues the same seeded stream</li>" for label, g in gaps)
        parts.append(f"<p><b>Gaps</b></p><ul>{rows}</ul>")
    expectations = report.get("expectations")
    if expectations:
        rows = "".join(
            f"<tr><td><span class=\"badge {'held' if e['held'] else 'FAILED'}\">{verdict_word(e)}"
            f"</span></td><td>{esc(e.get('text'))}</td><td>{esc(e.get('phase') or '')}</td>"
            f"<td>{esc(e.get('variant') or '')}</td><td>{esc(e.get('observed_text'))}</td></tr>" for e in expectations)
        parts.append("<h3>Expectations</h3><table id=\"expectations\"><tr><th></th><th>expectation</th><th>phase</th>"
                     f"<th>variant</th><th>observed</th></tr>{rows}</table>")
    parts.append("</header>")
    return "".join(parts)


def verdict_word(expectation: dict[str, Any]) -> str:
    if expectation.get("evaluated", True) is False:
        return "not evaluated"
    return "held" if expectation["held"] else "FAILED"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _summary(report: dict[str, Any]) -> str:
    header = ("<tr><th>trial</th><th>variant</th><th>status</th><th>offered/s</th><th>ok/s</th><th>error rate</th>"
              "<th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>crashes</th><th>min alive</th><th>restarts</th></tr>")
    rows = []
    for trial in report["trials"]:
        o = trial["overall"]
        lat = o["latency"]
        cells = [trial["id"], f"{trial['variant']} #{trial['repeat'] + 1}", None, f"{o['offered_rate']:.0f}",
                 f"{o['achieved_rate']:.0f}", f"{o['error_rate'] * 100:.2f}%", _ms(lat["p50"]), _ms(lat["p99"]),
                 _ms(lat["p999"]), trial["crashes_total"],
                 "-" if o["hosts_alive_min"] is None else o["hosts_alive_min"], trial["restarts"]]
        tds = "".join(f'<td class="num">{esc(c)}</td>' if i >= 3 else
                      (f'<td><span class="badge {esc(trial["status"])}">{esc(trial["status"])}</span></td>'
                       if c is None else f"<td>{esc(c)}</td>") for i, c in enumerate(cells))
        rows.append(f"<tr>{tds}</tr>")
    return f'<section id="summary"><h2>Trials</h2><table>{header}{"".join(rows)}</table></section>'


def _requests_section(report: dict[str, Any]) -> str:
    """Per request of the mix, per trial; reply kinds and HTTP statuses. Empty for a single request."""
    rows = []
    for trial in report["trials"]:
        replies = trial.get("replies") or {}
        kinds = " ".join(f"{k}={v}" for k, v in (replies.get("bad_kinds") or {}).items())
        for name, metrics in (trial.get("requests") or {}).items():
            o = metrics["overall"]
            lat = o["latency"]
            cells = [trial["id"], f"{trial['variant']} #{trial['repeat'] + 1}", name, o["offered"],
                     f"{o['achieved_rate']:.0f}", f"{o['error_rate'] * 100:.2f}%", _ms(lat["p50"]), _ms(lat["p99"]),
                     _ms(lat["p999"])]
            rows.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i >= 3 else f"<td>{esc(c)}</td>"
                                         for i, c in enumerate(cells)) + "</tr>")
        if kinds or replies.get("status"):
            status = " ".join(f"{k}={v}" for k, v in (replies.get("status") or {}).items())
            rows.append(f'<tr><td>{esc(trial["id"])}</td><td colspan="8">bad replies by kind: {esc(kinds or "none")}'
                        + (f"; HTTP status: {esc(status)}" if status else "") + "</td></tr>")
    if not rows:
        return ""
    header = ("<tr><th>trial</th><th>variant</th><th>request</th><th>offered</th><th>ok/s</th><th>error rate</th>"
              "<th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th></tr>")
    return f'<section id="requests"><h2>Requests</h2><table>{header}{"".join(rows)}</table></section>'


def _faults_section(report: dict[str, Any]) -> str:
    """Network and resource faults per trial: when, where, and what each did (bytes delayed, connections
    reset or refused; limits set, OOM kills, throttling from the hosts' cgroups)."""
    rows = []
    for trial in report["trials"]:
        label = f"{trial['variant']} #{trial['repeat'] + 1}"
        for fault in trial.get("network_faults") or []:
            spans = ", ".join(f"{w['from']:.1f}-{w['to']:.1f} s" if round(w["to"] - w["from"], 2)
                              else f"at {w['from']:.1f} s" for w in fault["windows"])
            counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (fault.get("counts") or {}).items())
            if fault.get("unknown"):      # a machine lost took its proxy's counts with it (--cluster)
                counts = f"at least {counts or 'nothing'}{unknown_counts(fault['unknown'])}"
            rows.append((trial["id"], label, "network", fault["label"], ", ".join(fault["hosts"]), spans, counts))
        cgroups = trial.get("cgroups") or {}
        for fault in trial.get("resource_faults") or []:
            spans = ", ".join(f"{w['from']:.1f}-{w['to']:.1f} s" for w in fault["windows"])
            effect = []
            for host in fault["hosts"]:
                c = cgroups.get(host) or {}
                bits = [f"peak {c.get('memory_peak', 0) / 2**20:.1f} MiB"]
                if c.get("oom_kills"):
                    bits.append(f"OOM kills {c['oom_kills']}")
                if c.get("throttled"):
                    bits.append(f"throttled {c['throttled']}x")
                if c.get("pids_refused"):
                    bits.append(f"forks refused {c['pids_refused']}")
                effect.append(f"{host}: {' '.join(bits)}")
            rows.append((trial["id"], label, "resource", f"{fault['limit']} limit", ", ".join(fault["hosts"]), spans,
                         "; ".join(effect)))
    if not rows:
        return ""
    header = ("<tr><th>trial</th><th>variant</th><th>family</th><th>fault</th><th>hosts</th><th>when</th>"
              "<th>what it did</th></tr>")
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<section id="faults"><h2>Network and resource faults</h2><table>{header}{body}</table>'
            '<p class="note">Network faults act through the harness\'s fault proxy on the connections named; '
            "resource faults are cgroup limits (the cascade shades their windows).</p></section>")


def _bucket_examples(store: RunStore) -> dict[str, dict[str, Any]]:
    """Per bucket, the triage of its first crash whose core was kept (else its first), as `harness crashes`
    picks; only the chosen rows' JSON is decoded (a simulated night has ~100k crashes)."""
    chosen: dict[str, tuple[bool, dict[str, Any]]] = {}
    for row in reads.triaged_crashes(store):
        current = chosen.get(row["bucket"])
        if current is None or (row["kept"] and not current[0]):
            chosen[row["bucket"]] = (bool(row["kept"]), dict(row))
    examples = {}
    for bucket, (_, row) in chosen.items():
        data = reads.triage_data(store, row["uid"])
        examples[bucket] = {"data": json.loads(data or "{}"), "host": row["host"], "pid": row["pid"], "t": row["t"],
                            "trial": row["trial"]}
    return examples


def merge_buckets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's buckets (listed per trial) merged across trials: one row per bucket id."""
    merged: dict[str, dict[str, Any]] = {}
    for trial in report["trials"]:
        for b in trial["buckets"]:
            row = merged.setdefault(b["bucket"], {**b, "count": 0, "cores_kept": 0, "hosts": set(), "variants": {},
                                                  "first_seen": math.inf, "last_seen": -math.inf})
            row["count"] += b["count"]
            row["cores_kept"] += b["cores_kept"]
            row["hosts"] |= set(b["hosts"])
            row["variants"][trial["variant"]] = row["variants"].get(trial["variant"], 0) + b["count"]
            row["first_seen"] = min(row["first_seen"], b["first_seen"])
            row["last_seen"] = max(row["last_seen"], b["last_seen"])
            row["example_core"] = row.get("example_core") or b.get("example_core")
    rows = sorted(merged.values(), key=lambda r: (-r["count"], r["first_seen"]))
    for row in rows:
        row["hosts"] = sorted(row["hosts"], key=lambda h: (len(h), h))
    return rows


def clock(seconds: float) -> str:
    """Seconds from load start: 36.96 s, or 7:50:30 in a long run."""
    if seconds < 600:
        return f"{seconds:.2f} s"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def bucket_table(buckets: list[dict[str, Any]]) -> str:
    head = ("<tr><th>bucket</th><th>crashes</th><th>variants</th><th>class</th><th>signature</th><th>signal</th>"
            "<th>hosts</th><th>first seen</th><th>last seen</th><th>cores kept</th></tr>")
    rows = []
    for b in buckets:
        variants = ", ".join(f"{v}: {n}" for v, n in b["variants"].items())
        hosts = " ".join(b["hosts"]) if len(b["hosts"]) <= 16 else f"{len(b['hosts'])} hosts"
        rows.append(f'<tr class="bucket-row"><td><a href="#{anchor(b["bucket"])}"><code>{esc(b["bucket"])}</code></a>'
                    f'</td><td class="num">{b["count"]}</td><td>{esc(variants)}</td><td>{esc(b["crash_class"])}</td>'
                    f'<td><code>{esc(b["signature"] or "-")}</code></td><td>{esc(b["signal"])}</td>'
                    f'<td>{esc(hosts)}</td><td class="num">{clock(b["first_seen"])}</td>'
                    f'<td class="num">{clock(b["last_seen"])}</td><td class="num">{b["cores_kept"]}</td></tr>')
    return f'<table id="buckets">{head}{"".join(rows)}</table>'


def bucket_detail(bucket: dict[str, Any], example: dict[str, Any] | None, run_dir: str) -> str:
    data = (example or {}).get("data", {})
    command = shlex.join(["harness", "crashes", run_dir, bucket["bucket"]])
    lines = [f'<div class="bucket" id="{anchor(bucket["bucket"])}"><h3>bucket <code>{esc(bucket["bucket"])}</code> — '
             f'{esc(bucket["crash_class"])}</h3>',
             f'<p><code>{esc(bucket["signature"] or "(no signature)")}</code></p><p>']
    facts = [("class detail", data.get("class_detail")), ("signal", f"{bucket['signal']} {data.get('si_code_name') or ''}"),
             ("fault address", data.get("fault_address") or bucket.get("fault_address")
              or ("unknown" if data.get("signal_name") in ("SIGSEGV", "SIGBUS") else None)),
             ("access", data.get("access")), ("instruction", data.get("instruction")),
             ("in allocator", "yes" if bucket.get("in_allocator") else None),
             ("abort message", data.get("abort_message")), ("example core", bucket.get("example_core")),
             ("example", f"trial {example['trial']}, h{example['host']} pid {example['pid']} at {clock(example['t'])}"
              if example else None)]
    lines += [f"<b>{esc(k)}</b> <code>{esc(v)}</code><br>" for k, v in facts if v not in (None, "", " ")]
    lines.append("</p>")
    frames = data.get("crashing_thread") or []
    if frames:
        rows = []
        for index, frame in enumerate(frames[:MAX_FRAMES]):
            file, line = split_source(frame.get("source"))
            rows.append(f'<tr><td class="num">{index}</td><td><code>{esc(frame.get("function") or "??")}</code></td>'
                        f'<td><code>{esc(file)}</code></td><td class="num">{esc(line)}</td>'
                        f'<td><code>{esc(frame.get("module") or "")}</code></td></tr>')
        more = f'<p class="note">{len(frames) - MAX_FRAMES} more frames</p>' if len(frames) > MAX_FRAMES else ""
        lines.append("<table class=\"frames\"><tr><th>#</th><th>function</th><th>file</th><th>line</th><th>module</th>"
                     f"</tr>{''.join(rows)}</table>{more}")
    else:
        lines.append('<p class="note">no backtrace: these crashes were not triaged (their cores were not kept: '
                     "sampled out, over the size or disk cap, or not dumped)</p>")
    if example is not None:   # `harness crashes` knows triaged buckets only
        lines.append(f"<pre>{esc(command)}</pre>")
    lines.append("</div>")
    return "".join(lines)


MAX_FAULT_CRASH_ROWS = 50   # crash rows per trial in the fault-effects section (the JSON has them all)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _faults_section(report: dict[str, Any]) -> str:
    """Per fault window and host: injected failures of eligible calls, first and last injection; and each
    crash with the faults armed on its host at that moment. Empty without shim faults."""
    from harness.analysis.report import armed_text
    parts = []
    for trial in report["trials"]:
        windows = trial.get("fault_windows") or []
        crashes = [c for c in trial["crashes"] if c.get("faults_armed") is not None]
        if not windows and not crashes:
            continue
        label = f"{trial['variant']} #{trial['repeat'] + 1} (trial {trial['id']})"
        rows = []
        for w in windows:
            span = f"{_seconds(w['start'])} – {_seconds(w['end']) if w['end'] is not None else '?'}"
            for host in w["hosts"] or [{}]:
                injected, eligible = host.get("injected"), host.get("eligible")
                rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in (
                    f"f{w['fault']}", f"{w.get('fault_kind')} {w.get('mode')}", span, w.get("ended_by") or "",
                    host.get("host_name") or "(no host)")) +
                    f'<td class="num{" zero" if not injected else ""}">'
                    f'{esc("unknown" if injected is None else injected)}'
                    f' / {esc("unknown" if eligible is None else eligible)}</td>'
                    f'<td class="num">{esc(_seconds(host.get("first")))}</td>'
                    f'<td class="num">{esc(_seconds(host.get("last")))}</td></tr>')
        table = ("<table class=\"windows\"><tr><th>fault</th><th>kind</th><th>window</th><th>ended by</th><th>host</th>"
                 "<th>injected / eligible</th><th>first injection</th><th>last injection</th></tr>"
                 + "".join(rows) + "</table>") if rows else '<p class="note">no fault window opened</p>'
        crash_rows = "".join(
            "<tr>" + "".join(f'<td>{esc(v)}</td>' for v in (
                f"{c['t']:.2f}", c.get("when", ""), c.get("host_name") or f"h{c['host']}", c["signal_name"],
                c.get("bucket") or "-", armed_text(c["faults_armed"]))) + "</tr>"
            for c in crashes[:MAX_FAULT_CRASH_ROWS])
        more = (f'<p class="note">{len(crashes) - MAX_FAULT_CRASH_ROWS} more crashes: harness report --json</p>'
                if len(crashes) > MAX_FAULT_CRASH_ROWS else "")
        crash_table = ("<table><tr><th>t (s)</th><th>when</th><th>host</th><th>signal</th><th>bucket</th>"
                       "<th>faults armed (injected on the host, last at)</th></tr>" + crash_rows + "</table>" + more
                       ) if crashes else ""
        parts.append(f"<h3>{esc(label)}</h3>{table}{crash_table}")
    if not parts:
        return ""
    return ('<section id="faults"><h2>Fault effects</h2><p class="note">What each shim fault window did on each '
            "host it applied to: failures injected out of the calls that were eligible (a window that injected "
            "nothing is marked), the first and last injection; and each crash with the faults armed on its host "
            "at that moment.</p>" + "".join(parts) + "</section>")


def _buckets_section(report: dict[str, Any], examples: dict[str, dict[str, Any]]) -> str:
    buckets = merge_buckets(report)
    if not buckets:
        return '<section id="crashes"><h2>Crash buckets</h2><p>No crashes.</p></section>'
    details = "".join(bucket_detail(b, examples.get(b["bucket"]), str(report["run_dir"])) for b in buckets)
    total = sum(b["count"] for b in buckets)
    return (f'<section id="crashes"><h2>Crash buckets</h2><p class="note">{total} crashes in {len(buckets)} '
            f'bucket{"s" if len(buckets) != 1 else ""}; times are seconds from the start of the load.</p>'
            f"{bucket_table(buckets)}{details}</section>")


def _footprint_section(rows: list[dict[str, Any]], report: dict[str, Any]) -> str:
    """The harness's own RSS and threads over the run: a long soak must not be limited by the harness."""
    if len(rows) < 2:
        return ""
    start = rows[0]["wall"]
    t = [r["wall"] - start for r in rows]
    axis = TimeAxis.for_duration(t[-1])
    fig, ax = plt.subplots(figsize=(7.2, 1.8), layout="constrained")
    xs, ys = decimate(t, [r["rss"] / 2**20 for r in rows], MAX_POINTS, "max")
    ax.plot(axis.x(xs), ys, color="#1f77b4", linewidth=1.2, label="RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("harness RSS (MiB)")
    ax.set_xlabel(f"wall time since the first sample ({axis.name})")
    threads = ax.twinx()
    xs, ys = decimate(t, [r["threads"] for r in rows], MAX_POINTS, "max")
    threads.plot(axis.x(xs), ys, color="#7f7f7f", linewidth=0.9, linestyle="--")
    threads.set_ylabel("threads (dashed)")
    threads.set_ylim(bottom=0)
    threads.grid(False)
    svg = svg_of(fig, "footprint", f"harness footprint: {report['run_id']}")
    return (f'<section id="footprint"><h2>Harness footprint</h2><div class="grid"><div class="cell">{svg}</div></div>'
            "</section>")
