"""The HTML report: pure helpers, and a real cascade run rendered by real headless Chromium."""

from __future__ import annotations

import math
import re
import shutil
import sqlite3
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from conftest import HARNESS, run_dir_of, write_scenario
from harness.present.html import (MAX_POINTS, PlotContext, TimeAxis, TrialData, anchor, bucket_detail, bucket_table,
                                  clock, decimate, fault_windows, label_rows, plot_latency, plot_load, runs_of,
                                  split_source, svg_of, trend_table, trend_verdict, write_html_report)

# Three estats hosts under a heap budget: the spike makes malloc fail, estats dereferences the NULL
# stats block, hosts crash and restart (a cascade); a host-loss kill early on gives a down_for window.
CASCADE = """
name: html-cascade
seed: 11
target:
  root: @REPO@
  command: [targets/estats/estats-server, --port, "{port}", --estats, "on", --service-ms, "100",
            --scratch-kb, "16", --stats-kb, "4"]
  restart: {policy: always, backoff: 300ms}
  expect_reply: "^OK"
fleet: {hosts: 3, balancer: least-loaded}
load:
  - {ramp: {from: 100, to: 200, over: 3s}}
  - {hold: {for: 3s}}
  - {spike: {factor: 5, for: 6s, name: midnight}}
  - {hold: {for: 3s, name: after}}
faults:
  - {kind: alloc-fail, mode: budget, budget: 400KiB}
  - {kind: host-loss, at: 2s, hosts: 1, how: kill, down_for: 2s}
variants:
  - {name: estats-on}
  - {name: estats-off, args: {--estats: "off"}}
expect:
  - {variant: estats-off, crashes: 0}
"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


# --- pure helpers ------------------------------------------------------------------------------

def test_decimate_keeps_short_series_and_caps_long_ones() -> None:
    t = list(range(100))
    assert decimate(t, [float(x) for x in t], 200) == ([float(x) for x in t], [float(x) for x in t])
    long_t = list(range(28800))
    xs, ys = decimate(long_t, [1.0] * len(long_t), 800)
    assert len(xs) == len(ys) <= 800
    assert xs == sorted(xs) and xs[0] == 0


def test_decimate_max_keeps_a_one_second_spike_and_min_keeps_the_worst_moment() -> None:
    t = list(range(10000))
    spiky = [0.1] * 10000
    spiky[5003] = 9.0
    assert max(decimate(t, spiky, 100, "max")[1]) == 9.0
    assert max(decimate(t, spiky, 100, "mean")[1]) < 9.0    # a mean would hide it: why latency uses max
    alive = [8] * 10000
    alive[777] = 0
    assert min(decimate(t, alive, 100, "min")[1]) == 0


def test_decimate_mean_weights_rolled_up_rows_by_their_span() -> None:
    # one per-minute row (rate 10) and 60 per-second rows (rate 70) merged into one bucket
    t = [0] + list(range(60, 120))
    values = [10.0] + [70.0] * 60
    spans = [60] + [1] * 60
    _, ys = decimate(t, values, 1, "mean", spans)
    assert ys == [pytest.approx(40.0)]


def test_decimate_turns_missing_values_into_gaps() -> None:
    t = list(range(20))
    values: list[float | None] = [1.0] * 10 + [None] * 10
    _, ys = decimate(t, values, 4, "max")
    assert ys[:2] == [1.0, 1.0] and all(math.isnan(y) for y in ys[2:])
    assert math.isnan(decimate([0, 1], [None, 2.0], 10)[1][0])


def test_fault_windows_pair_arms_with_disarms_and_follow_lost_hosts_back() -> None:
    events = [
        {"t": 0.0, "kind": "fault-arm", "host": None, "detail": {"fault": 0, "fault_kind": "alloc-fail", "mode": "budget"}},
        {"t": 5.0, "kind": "fault-arm", "host": None, "detail": {"fault": 1, "fault_kind": "lock-error", "mode": "after"}},
        {"t": 9.0, "kind": "fault-disarm", "host": None, "detail": {"fault": 1}},
        {"t": 20.0, "kind": "fault-arm", "host": None, "detail": {"fault": 1, "fault_kind": "lock-error", "mode": "after"}},
        {"t": 25.0, "kind": "fault-disarm", "host": None, "detail": {"fault": 1}},
        {"t": 6.0, "kind": "host-loss", "host": None, "detail": {"how": "kill", "hosts": [2, 4]}},
        {"t": 7.0, "kind": "start", "host": 9, "detail": {}},       # another host: not the end of the loss
        {"t": 8.5, "kind": "start", "host": 2, "detail": {}},
        {"t": 9.5, "kind": "start", "host": 4, "detail": {}},
        {"t": 30.0, "kind": "host-loss", "host": None, "detail": {"how": "pause", "hosts": [1]}},
        {"t": 30.2, "kind": "start", "host": 1, "detail": {}},      # a start does not end a pause...
        {"t": 32.0, "kind": "resume", "host": 1, "detail": {}},     # ...its resume does
        {"t": 40.0, "kind": "host-loss", "host": None, "detail": {"how": "kill", "hosts": []}},
        {"t": 41.0, "kind": "gap", "host": None, "detail": {"resumed_at": 41, "down_seconds": 9.0}},
        {"t": 55.0, "kind": "host-loss", "host": None, "detail": {"how": "kill", "hosts": [3]}},   # never back
    ]
    windows = fault_windows(events, end=60.0)
    spans = [(w.kind, w.start, w.end) for w in windows]
    assert ("shim", 0.0, 60.0) in spans                     # armed to the end: no disarm recorded
    assert ("shim", 5.0, 9.0) in spans and ("shim", 20.0, 25.0) in spans
    assert ("host-loss", 6.0, 9.5) in spans                 # until the last lost host is back
    assert ("host-loss", 30.0, 32.0) in spans
    assert ("host-loss", 40.0, 40.0) in spans                # nobody up to lose: an instant
    assert ("gap", 41.0, 41.0) in spans
    assert ("host-loss", 55.0, 60.0) in spans
    assert [w.start for w in windows] == sorted(w.start for w in windows)
    assert next(w for w in windows if w.start == 0.0).label == "alloc-fail budget armed"


def test_runs_of_joins_adjacent_rows_and_merges_short_gaps_past_the_cap() -> None:
    t = [0, 1, 2, 3, 4, 5, 6, 60, 120]
    spans = [1, 1, 1, 1, 1, 1, 1, 60, 60]
    flags = [True, True, False, True, False, False, True, True, True]
    assert runs_of(t, spans, flags) == [(0, 2), (3, 1), (6, 1), (60, 120)]
    merged = runs_of(t, spans, flags, max_segments=2)
    assert len(merged) <= 2 and merged[0][0] == 0 and merged[-1][0] + merged[-1][1] == 180


def test_anchor_and_source_helpers() -> None:
    assert anchor("876c35929fc8") == "bucket-876c35929fc8"
    assert anchor("untriaged:SIGSEGV") == "bucket-untriaged_SIGSEGV"
    assert anchor('"><script>') == "bucket-___script_"
    assert split_source("/src/estats.c:105:12") == ("/src/estats.c", "105")
    assert split_source("a.c:7") == ("a.c", "7")
    assert split_source(None) == ("", "")
    assert split_source("weird") == ("weird", "")


def test_phase_labels_close_together_go_up_a_line_and_clock_reads_long_times() -> None:
    # an 8-hour night: evening 0, late 3h, midnight 4h, after 4h10m -> "after" must not overlap "midnight"
    assert label_rows([0, 3 / 8, 4 / 8, (4 + 1 / 6) / 8]) == [0, 0, 0, 1]
    assert label_rows([0.0, 0.01, 0.02, 0.03, 0.5]) == [0, 1, 2, 2, 0]
    assert clock(36.964) == "36.96 s" and clock(28230.5) == "7:50:30"


HOSTILE = '<script>alert("x")</script>'


def _fit(verdict: str, text: str) -> dict:
    return {"slope": 3.2 * 2**20, "low": 3.0 * 2**20, "high": 3.4 * 2**20, "unit": "bytes", "verdict": verdict,
            "text": text, "series": 4, "too_short": 0}


def test_trend_table_shows_each_variants_verdicts_escaped() -> None:
    trends = {"metrics": ["rss", "heap"], "settings": {"confidence": 0.95},
              "variants": {HOSTILE: {"series": 4, "metrics": {"rss": _fit("leaks", "leaks 3.2 MiB/h"), "heap": None}},
                           "b": {"series": 2, "metrics": {"rss": _fit("flat", "flat"), "heap": None}}},
              "harness": {"metrics": {"rss": None}}}
    table = trend_table(trends)
    assert 'id="trends"' in table and "<script" not in table and "&lt;script&gt;" in table
    assert "leaks 3.2 MiB/h" in table and "+3.2MiB/h [+3MiB, +3.4MiB]" in table
    assert trend_verdict(trends, HOSTILE, "rss") == "leaks 3.2 MiB/h"
    assert trend_verdict(trends, HOSTILE, "heap") == "" and trend_verdict(None, "b", "rss") == ""
    assert "trends unavailable: ValueError: &lt;bad&gt;" in trend_table({"error": "ValueError: <bad>"})
    assert trend_table(None) == ""


def _bucket(**over: object) -> dict:
    bucket = {"bucket": "abc123", "count": 2, "crash_class": "null-deref", "signature": HOSTILE, "signal": "SIGSEGV",
              "hosts": ["h0", "h1"], "first_seen": 1.0, "last_seen": 2.0, "cores_kept": 1, "variants": {HOSTILE: 2},
              "fault_address": "0x40", "in_allocator": False, "example_core": f"/tmp/{HOSTILE}/core"}
    bucket.update(over)
    return bucket


def test_bucket_table_and_detail_escape_what_the_store_holds() -> None:
    frames = [{"function": HOSTILE, "source": f"{HOSTILE}.c:3", "module": "<img src=x onerror=alert(1)>"}]
    example = {"data": {"crashing_thread": frames, "instruction": "<b>mov</b>"}, "trial": 1, "host": 0, "pid": 7, "t": 1.0}
    page = bucket_table([_bucket()]) + bucket_detail(_bucket(), example, f"results/{HOSTILE}")
    assert "<script" not in page.lower() and "<img" not in page.lower() and "<b>mov" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert 'href="#bucket-abc123"' in page and 'id="bucket-abc123"' in page


def test_svgs_get_unique_ids_so_they_can_share_one_page() -> None:
    figures = []
    for name in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], marker="o")
        figures.append(svg_of(fig, f"plot-{name}", f"title {name} <&>"))
    ids = [i for svg in figures for i in re.findall(r'\bid="([^"]+)"', svg)]
    assert len(ids) == len(set(ids))
    assert figures[0].startswith("<svg") and 'id="plot-a"' in figures[0]
    assert "<title>title a &lt;&amp;&gt;</title>" in figures[0]
    for svg in figures:  # every internal reference points inside its own svg
        own = set(re.findall(r'\bid="([^"]+)"', svg))
        refs = re.findall(r'url\(#([^)]+)\)', svg) + re.findall(r'href="#([^"]+)"', svg)
        assert refs and set(refs) <= own


def _long_trial(seconds: int) -> TrialData:
    samples = [{"t": t, "span": 1, "offered": 100, "ok": 99 - (t % 7), "timeout": 1, "conn_error": 0, "no_host": 0,
                "bad_reply": 0, "p50": 0.001, "p99": 0.002 + (t % 13) / 1000, "p999": 0.01, "max": 0.02,
                "hosts_alive": 8, "offered_rate": 100.0} for t in range(seconds)]
    return TrialData(1, "night", samples, {}, {}, [], [])


@pytest.mark.slow
def test_plots_of_an_eight_hour_trial_draw_at_most_max_points_per_series() -> None:
    trial = _long_trial(8 * 3600)
    ctx = PlotContext(axis=TimeAxis.for_duration(8 * 3600), end=8 * 3600, phases=[], hosts=8, rate_max=100.0,
                      latency_range=(0.5, 50.0))
    assert ctx.axis.name == "h"
    for plot in (plot_load, plot_latency):
        svg = svg_of(plot(trial, ctx), "x", "x")
        # each line is one <path d="M ... L ... L ..."> inside a line2d group
        paths = re.findall(r'<g id="x-line2d_\d+">\s*<path d="([^"]+)"', svg)
        assert paths, "the series were drawn"
        assert max(p.count(" L ") for p in paths) < MAX_POINTS
        assert len(svg) < 400_000


# --- a real run, in a real browser -------------------------------------------------------------

@pytest.fixture(scope="module")
def cascade_run(targets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("html-run")
    scenario = write_scenario(work, CASCADE)
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", "results", "--quiet"], cwd=work,
                            capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr
    run_dir = run_dir_of(work / "results")
    assert run_dir is not None
    return run_dir


@pytest.fixture(scope="module")
def page(cascade_run: Path) -> Path:
    """The report as the command line writes it (`harness report RUN --html`)."""
    result = subprocess.run([*HARNESS, "report", str(cascade_run), "--html"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode in (0, 1), result.stderr
    assert result.stdout.strip() == str(cascade_run / "report.html")
    return cascade_run / "report.html"


def chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (bash scripts/setup.sh installs it)"
    profile = tempfile.mkdtemp(prefix="harness-chromium-")
    try:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class _Dom(HTMLParser):
    """Elements (tag, attributes) and the text inside each <title>, as the browser serialized them."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.titles.append(data)

    def by_id(self, ident: str) -> tuple[str, dict[str, str]] | None:
        return next((e for e in self.elements if e[1].get("id") == ident), None)


@pytest.fixture(scope="module")
def dom(page: Path) -> tuple[_Dom, str]:
    result = chromium(["--dump-dom", page.as_uri()])
    assert result.returncode == 0, result.stderr[-2000:]
    parser = _Dom()
    parser.feed(result.stdout)
    return parser, result.stdout


@pytest.mark.slow
def test_browser_sees_the_plots_of_every_trial(dom: tuple[_Dom, str], cascade_run: Path) -> None:
    parsed, text = dom
    trials = [r[0] for r in sqlite3.connect(cascade_run / "run.db").execute("SELECT id FROM trials ORDER BY id")]
    assert len(trials) == 2
    for trial in trials:
        for key in ("load", "cascade", "latency", "memory"):
            element = parsed.by_id(f"{key}-t{trial}")
            assert element is not None and element[0] == "svg", f"{key}-t{trial}"
    assert any(t.startswith("Cascade: hosts alive and crashes: estats-on") for t in parsed.titles)
    assert any(t.startswith("Cascade: hosts alive and crashes: estats-off") for t in parsed.titles)
    cascade = text[text.index('id="cascade-t1"'):]
    cascade = cascade[:cascade.index("</svg>")]
    # the legend names what is drawn: the alive line, crash bars, the budget window, the lost host
    for label in ("hosts alive", "crashes", "alloc-fail budget armed", "host lost", "midnight"):
        assert label in cascade, label


@pytest.mark.slow
def test_browser_sees_the_bucket_table_with_working_anchors(dom: tuple[_Dom, str]) -> None:
    parsed, text = dom
    rows = [e for e in parsed.elements if e[0] == "tr" and e[1].get("class") == "bucket-row"]
    assert rows, "the estats-on trial crashed: at least one bucket row"
    links = [e[1]["href"] for e in parsed.elements if e[0] == "a" and e[1].get("href", "").startswith("#bucket-")]
    assert len(links) == len(rows)
    for link in links:
        target = parsed.by_id(link[1:])
        assert target is not None and target[0] == "div"
    # cores past keep_per_bucket are sampled out and not triaged: those crashes form an untriaged bucket
    triaged = [link for link in links if not link.startswith("#bucket-untriaged")]
    assert triaged, "the first cores of the bucket were kept and triaged"
    for link in triaged:
        section = text[text.index(f'id="{link[1:]}"'):]
        section = section[:section.index("</div>")]
        assert "estats_update" in section and "handle_request" in section    # backtrace frames
        command = section.split("<pre>")[1].split("</pre>")[0]
        assert command.startswith("harness crashes ") and command.endswith(" " + link[len("#bucket-"):])
    assert parsed.by_id("expectations") is not None
    assert parsed.by_id("trends") is not None            # harness.analysis.trends verdicts (too short in 15 s)


@pytest.mark.slow
def test_screenshot_of_the_page(page: Path, tmp_path: Path) -> None:
    from PIL import Image
    shot = tmp_path / "shot.png"
    result = chromium([f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()])
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1400, 3000)
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colors is not None and len(colors) > 50     # plots and text, not a blank page


@pytest.mark.slow
def test_report_reads_the_real_fault_windows(cascade_run: Path) -> None:
    from harness.present.html import _read_trial
    from harness.store.runstore import open_run
    store = open_run(cascade_run)
    try:
        trial = _read_trial(store, {"id": 1, "end": 15.0, "variant": "estats-on", "repeat": 0}, 3)
    finally:
        store.close()
    kinds = {w.kind for w in trial.windows}
    assert kinds == {"shim", "host-loss"}
    loss = next(w for w in trial.windows if w.kind == "host-loss")
    assert loss.start == pytest.approx(2.0, abs=0.5) and loss.end >= loss.start + 1.5    # down_for 2s, then restarted
    assert trial.crashes and set(trial.hosts) == {0, 1, 2}
    assert any(row["live"] for rows in trial.hosts.values() for row in rows)    # the shim's heap counter


def _copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    copy = tmp_path / "run"
    copy.mkdir()
    source = sqlite3.connect(run_dir / "run.db")
    target = sqlite3.connect(copy / "run.db")
    source.backup(target)
    source.close()
    return copy, target


@pytest.mark.slow
def test_gaps_and_the_harness_footprint_are_drawn_when_recorded(cascade_run: Path, tmp_path: Path) -> None:
    # a resumed run records its gap; the runner samples its own footprint (both optional in a store)
    copy, db = _copy_run(cascade_run, tmp_path)
    db.execute("INSERT INTO events (trial, t, wall, kind, detail) VALUES (1, 9, 0, 'gap', "
               "'{\"resumed_at\": 9, \"down_seconds\": 42.4}')")
    db.executemany("INSERT INTO harness_samples VALUES (?, 1, ?, 20, 9)", [(1000.0 + i, (80 + i) * 2**20) for i in range(30)])
    db.commit()
    db.close()
    text = write_html_report(copy).read_text(encoding="utf-8")
    assert "resumed at 9 s of load, resumed after 42 s down" in text
    cascade = text[text.index('id="cascade-t1"'):]
    assert "gap in the run" in cascade[:cascade.index("</svg>")]
    assert 'id="footprint"' in text


@pytest.mark.slow
def test_hostile_strings_from_the_store_are_escaped_on_the_page(cascade_run: Path, tmp_path: Path) -> None:
    copy, target = _copy_run(cascade_run, tmp_path)
    target.execute("UPDATE triage SET signature=?", (HOSTILE,))
    target.execute("UPDATE trials SET variant=? WHERE id=1", (HOSTILE,))
    target.execute("UPDATE phases SET name=? WHERE idx=0", ("$<script>",))
    target.commit()
    target.close()
    out = write_html_report(copy, tmp_path / "page.html")
    text = out.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text


@pytest.mark.slow
def test_a_mixed_fleets_hosts_are_labelled_by_their_group_names(cascade_run: Path, tmp_path: Path) -> None:
    copy, db = _copy_run(cascade_run, tmp_path)
    db.execute("UPDATE events SET detail = json_set(detail, '$.name', 'estats-' || host) "
               "WHERE kind = 'start' AND trial = 1")
    db.commit()
    db.close()
    text = write_html_report(copy).read_text(encoding="utf-8")
    cascade = text[text.index('id="cascade-t1"'):]
    cascade = cascade[:cascade.index("</svg>")]
    assert "estats-0" in cascade and "estats-2" in cascade
