"""The offered load r(t), its integral Λ(t) and the inverse used to place arrivals (harness.scenario.loadshape)."""

from __future__ import annotations

import pytest

from harness.scenario.loadshape import LoadShape, PhaseSpec


def ramp(over, to, frm=None, name=None):
    return PhaseSpec("ramp", name, over, rate_from=frm, rate_to=to)


def hold(for_, rate=None, name=None):
    return PhaseSpec("hold", name, for_, rate_to=rate)


def spike(for_, factor=None, to=None, name=None):
    return PhaseSpec("spike", name, for_, rate_to=to, factor=factor)


def steps(each, to, count, frm=None, name=None):
    return PhaseSpec("steps", name, each, rate_from=frm, rate_to=to, count=count)


@pytest.fixture
def nye() -> LoadShape:
    """ramp 200 -> 1200 over 30s, hold 30s, spike x3 for 30s, hold 10s."""
    return LoadShape.build([ramp(30, 1200, frm=200), hold(30), spike(30, factor=3), hold(10)])


def integrate(shape: LoadShape, t: float, n: int = 20000) -> float:
    """Numeric ∫0^t r(s) ds by the midpoint rule (independent of Segment.area)."""
    h = t / n
    return sum(shape.rate((i + 0.5) * h) for i in range(n)) * h


# --- r(t) -----------------------------------------------------------------------------------------

def test_ramp_is_linear(nye):
    assert nye.rate(0) == pytest.approx(200)
    assert nye.rate(15) == pytest.approx(700)
    assert nye.rate(29.999) == pytest.approx(1200, abs=0.1)


def test_hold_keeps_the_rate_the_ramp_left(nye):
    for t in (30, 45, 59.9):
        assert nye.rate(t) == pytest.approx(1200)


def test_spike_multiplies_then_returns_to_the_pre_spike_rate(nye):
    for t in (60, 75, 89.9):
        assert nye.rate(t) == pytest.approx(3600)
    for t in (90, 95, 99.9):
        assert nye.rate(t) == pytest.approx(1200)


def test_spike_with_absolute_rate_and_return():
    shape = LoadShape.build([hold(10, 100), spike(5, to=50), hold(5)])
    assert shape.rate(12) == pytest.approx(50)
    assert shape.rate(17) == pytest.approx(100)


def test_ramp_after_spike_starts_from_the_pre_spike_rate():
    shape = LoadShape.build([hold(10, 100), spike(5, factor=4), ramp(10, 300)])
    assert shape.rate(15) == pytest.approx(100)
    assert shape.rate(20) == pytest.approx(200)


def test_steps_are_equal_stairs_ending_at_to():
    shape = LoadShape.build([hold(10, 100), steps(5, 400, count=3)])
    assert [shape.rate(t) for t in (12, 17, 22)] == pytest.approx([200, 300, 400])
    # constant within a stair
    assert shape.rate(10.1) == pytest.approx(shape.rate(14.9))
    assert shape.duration == pytest.approx(25)


def test_rate_is_zero_outside_the_load(nye):
    assert nye.rate(-1) == 0
    assert nye.rate(nye.duration + 1) == 0


# --- Λ(t) and its inverse -------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 7.3, 30.0, 44.4, 60.0, 77.7, 90.0, 95.5, 100.0])
def test_expected_is_the_integral_of_the_rate(nye, t):
    assert nye.expected(t) == pytest.approx(integrate(nye, t), rel=1e-4, abs=1e-6)


def test_expected_closed_form(nye):
    ramp_area = (200 + 1200) / 2 * 30
    assert nye.expected(30) == pytest.approx(ramp_area)
    assert nye.total_expected == pytest.approx(ramp_area + 1200 * 30 + 3600 * 30 + 1200 * 10)
    assert nye.expected(1e9) == pytest.approx(nye.total_expected)


def test_expected_is_monotonic(nye):
    values = [nye.expected(t / 10) for t in range(0, 1001)]
    assert all(b >= a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("t", [0.0, 0.001, 3.0, 29.5, 30.0, 42.0, 60.0, 61.5, 89.99, 90.0, 99.0])
def test_inverse_of_expected_is_identity(nye, t):
    assert nye.inverse(nye.expected(t)) == pytest.approx(t, abs=1e-9)


@pytest.mark.parametrize("specs", [
    [ramp(100, 0, frm=1e6)],                  # steep decreasing ramp down to 0
    [ramp(100, 1e6, frm=0)],                  # from 0: rate zero at the start
    [ramp(1000, 1000.0001, frm=1000)],        # nearly flat: the naive quadratic root cancels badly
    [ramp(1000, 999.9999, frm=1000)],
])
@pytest.mark.parametrize("t", [1e-3, 1.0, 10.0, 50.5, 99.0])
def test_inverse_is_accurate_on_extreme_ramps(specs, t):
    shape = LoadShape.build(specs)
    assert shape.inverse(shape.expected(t)) == pytest.approx(t, rel=1e-9, abs=1e-9)


def test_inverse_skips_zero_rate_stretches():
    shape = LoadShape.build([hold(10, 0), ramp(10, 100), hold(5, 0), hold(5, 10)])
    # the first arrival cannot land before the load starts
    assert shape.inverse(1e-9) == pytest.approx(10, abs=1e-3)
    # the next arrival after the ramp is in the final hold, not in the silent stretch
    assert shape.inverse(shape.expected(20) + 1e-9) == pytest.approx(25, abs=1e-6)
    assert shape.inverse(shape.total_expected + 1) is None


def test_inverse_past_the_end_is_none(nye):
    assert nye.inverse(nye.total_expected * 1.001) is None


# --- duration, names and windows ------------------------------------------------------------------

def test_shorter_duration_truncates(nye):
    short = LoadShape.build([ramp(30, 1200, frm=200), hold(30), spike(30, factor=3), hold(10)], duration=45)
    assert short.duration == 45
    assert [p.name for p in short.phases] == ["ramp", "hold"]
    assert short.phases[-1].end == 45
    assert short.expected(45) == pytest.approx(nye.expected(45))
    assert short.total_expected == pytest.approx(nye.expected(45))
    assert short.rate(50) == 0


def test_truncation_inside_a_ramp_cuts_the_segment_at_the_right_rate():
    shape = LoadShape.build([ramp(10, 100, frm=0), hold(10)], duration=5)
    assert shape.total_expected == pytest.approx(0.5 * 5 * 50)
    assert shape.phases[0].rate_to == pytest.approx(50)


def test_longer_duration_adds_a_tail_hold_at_the_last_rate():
    shape = LoadShape.build([ramp(10, 100, frm=0), spike(5, factor=2)], duration=30)
    tail = shape.phases[-1]
    assert (tail.name, tail.kind, tail.start, tail.end) == ("tail", "hold", 15, 30)
    assert shape.rate(20) == pytest.approx(100)          # the pre-spike rate, not the spike's
    assert shape.total_expected == pytest.approx(500 + 1000 + 15 * 100)


def test_exact_duration_adds_nothing():
    shape = LoadShape.build([hold(10, 5)], duration=10)
    assert [p.name for p in shape.phases] == ["hold"]


def test_phase_names_default_to_kind_with_numbered_repeats():
    shape = LoadShape.build([ramp(5, 10, frm=0), hold(5), spike(5, factor=2), hold(5), hold(5, name="cool"),
                             hold(5)])
    assert [p.name for p in shape.phases] == ["ramp", "hold", "spike", "hold#2", "cool", "hold#3"]
    assert [p.kind for p in shape.phases] == ["ramp", "hold", "spike", "hold", "hold", "hold"]


def test_phases_are_contiguous(nye):
    assert nye.phases[0].start == 0
    for a, b in zip(nye.phases, nye.phases[1:]):
        assert a.end == b.start
    assert nye.phases[-1].end == nye.duration


def test_windows_collects_every_phase_of_that_name():
    shape = LoadShape.build([ramp(5, 10, frm=0), hold(5), spike(5, factor=2), hold(7)])
    assert shape.windows("hold") == [(5, 10), (15, 22)]
    assert shape.windows("hold#2") == [(15, 22)]
    assert shape.windows("spike") == [(10, 15)]
    assert shape.windows("nope") == []


def test_windows_by_explicit_name():
    shape = LoadShape.build([hold(5, 10, name="warm"), hold(5, 20, name="peak")])
    assert shape.windows("peak") == [(5, 10)]
    assert shape.windows("hold") == []


def test_phase_at(nye):
    assert nye.phase_at(10).name == "ramp"
    assert nye.phase_at(30).name == "hold"
    assert nye.phase_at(75).name == "spike"
    assert nye.phase_at(95).name == "hold#2"
    assert nye.phase_at(nye.duration).name == "hold#2"


def test_shape_keeps_the_phases_as_written():
    specs = [ramp(30, 1200, frm=200), hold(30), spike(30, factor=3)]
    short = LoadShape.build(specs, duration=10)
    assert short.specs == tuple(specs)
    assert [p.name for p in LoadShape.build(list(short.specs)).phases] == ["ramp", "hold", "spike"]
