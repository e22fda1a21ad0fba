"""Units in scenarios: durations, sizes, rates and fractions (harness.base.units)."""

from __future__ import annotations

import pytest

from harness.base import units


# --- durations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0),
    ("250ms", 0.25),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    ("1.5m", 90.0),
    ("2min", 120.0),
    ("8h", 28800.0),
    ("1d", 86400.0),
    ("500us", 0.0005),
    ("500µs", 0.0005),
    ("100ns", 1e-7),
    (".5s", 0.5),
    ("  2 m ", 120.0),
    ("30S", 30.0),
    ("0s", 0.0),
    ("10", 10.0),          # a bare number written as a string is seconds too (CLI --duration 10)
    ("2.5", 2.5),
    (10, 10.0),
    (2.5, 2.5),
    (0, 0.0),
])
def test_duration_parses(text, seconds):
    assert units.parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("value", ["-5s", "- 5s", "-1", -1, -0.5])
def test_negative_duration_is_rejected_as_negative(value):
    with pytest.raises(ValueError, match="must not be negative"):
        units.parse_duration(value)


@pytest.mark.parametrize("value", ["", "s", "10 parsecs", "3x", "1m30", "1e3s", "inf", "nan", "thirty seconds",
                                   "30s!", "ms30"])
def test_garbage_duration_names_the_expected_form(value):
    with pytest.raises(ValueError, match=r"expected a duration like '30s'"):
        units.parse_duration(value)


@pytest.mark.parametrize("value", [None, True, [1], {"s": 1}, float("nan"), float("inf"), float("-inf")])
def test_non_duration_values_are_rejected(value):
    with pytest.raises(ValueError):
        units.parse_duration(value)


def test_duration_too_large_is_a_value_error_not_overflow():
    with pytest.raises(ValueError, match="too large"):
        units.parse_duration(10**400)
    with pytest.raises(ValueError, match="too large"):
        units.parse_duration("9" * 400 + "s")


def test_duration_message_is_one_short_line():
    with pytest.raises(ValueError) as info:
        units.parse_duration("x" * 500 + "\nmore")
    message = str(info.value)
    assert "\n" not in message and len(message) < 120


# --- sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("48MiB", 48 * 1024**2),
    ("64k", 64_000),
    ("64KiB", 64 * 1024),
    ("64kb", 64_000),
    ("1GiB", 1024**3),
    ("1G", 1000**3),
    ("2TiB", 2 * 1024**4),
    ("1.5k", 1500),
    ("1 MB", 1_000_000),
    ("4096", 4096),
    ("10b", 10),
    (4096, 4096),
    (0, 0),
])
def test_size_parses(text, size):
    assert units.parse_size(text) == size
    assert isinstance(units.parse_size(text), int)


@pytest.mark.parametrize("value", ["-1k", "-5", -1])
def test_negative_size_is_rejected_as_negative(value):
    with pytest.raises(ValueError, match="must not be negative"):
        units.parse_size(value)


@pytest.mark.parametrize("value", ["", "KiB", "1e3", "12 parsecs", "48MiBs", "1.2.3k", None, True, [48],
                                   float("nan"), float("inf")])
def test_garbage_size_is_rejected(value):
    with pytest.raises(ValueError, match="expected a size like '48MiB'"):
        units.parse_size(value)


def test_huge_size_is_a_value_error_not_overflow():
    with pytest.raises(ValueError, match="too large"):
        units.parse_size(10**400)


# --- rates ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rate", [
    ("1200/s", 1200.0),
    ("1200 /s", 1200.0),
    ("1200rps", 1200.0),
    ("600/m", 10.0),
    ("600/min", 10.0),
    ("3600/h", 1.0),
    ("1200", 1200.0),
    (1200, 1200.0),
    (0.5, 0.5),
    (0, 0.0),
])
def test_rate_parses(text, rate):
    assert units.parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("value", [-1, -0.001, "-5", "-5/s", "-600/m"])
def test_negative_rate_is_rejected(value):
    with pytest.raises(ValueError, match="rate must not be negative"):
        units.parse_rate(value)


@pytest.mark.parametrize("value", ["", "/s", "fast", "1200/d", "1e3", "nan", None, True, [1],
                                   float("nan"), float("inf")])
def test_garbage_rate_is_rejected(value):
    with pytest.raises(ValueError, match="expected a rate like 1200"):
        units.parse_rate(value)


# --- fractions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, fraction", [
    ("1%", 0.01),
    ("0.5%", 0.005),
    (" 5 %", 0.05),
    ("100%", 1.0),
    ("0%", 0.0),
    (0.01, 0.01),
    (1, 1.0),
    (0, 0.0),
    ("0.25", 0.25),
])
def test_fraction_parses(value, fraction):
    assert units.parse_fraction(value) == pytest.approx(fraction)


@pytest.mark.parametrize("value", ["150%", 1.5, 2, -0.1, "-1%", "1.5"])
def test_fraction_out_of_range_is_rejected(value):
    with pytest.raises(ValueError, match="between 0 and 1"):
        units.parse_fraction(value)


@pytest.mark.parametrize("value", ["often", "%", "1 percent", None, True, float("nan"), [0.1]])
def test_garbage_fraction_is_rejected(value):
    with pytest.raises(ValueError):
        units.parse_fraction(value)


# --- formatting round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("seconds", [0.0005, 0.25, 1.5, 30, 90, 600, 7200, 36000])
def test_format_duration_parses_back(seconds):
    text = units.format_duration(seconds)
    assert units.parse_duration(text) == pytest.approx(seconds, rel=5e-3)


@pytest.mark.parametrize("nbytes", [512, 64 * 1024, 48 * 1024**2, 3 * 1024**3])
def test_format_size_parses_back(nbytes):
    assert units.parse_size(units.format_size(nbytes)) == pytest.approx(nbytes, rel=5e-3)

