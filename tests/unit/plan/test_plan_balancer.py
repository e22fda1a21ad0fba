"""The plan (seeded arrivals, keys, host-loss choices) and the balancer. Pure logic, fixed seeds.

Statistical bounds are 5 sigma: with fixed seeds the tests are deterministic, and the bounds are
loose enough that any honest seed passes while a wrong rate, distribution or stream fails.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from harness.run.balancer import Balancer
from harness.scenario.loader import load_scenario_text
from harness.scenario.loadshape import LoadShape, PhaseSpec
from harness.plan.streams import LossEvent, arrivals, choose_hosts, loss_events
from harness.scenario.model import HostLoss, HostSelection, Keys, Window

UNIFORM = Keys(space=10000, distribution="uniform")


def hold_shape(rate: float, seconds: float) -> LoadShape:
    return LoadShape.build([PhaseSpec("hold", None, seconds, rate_to=rate)])


def within_poisson(count: int, mean: float, sigmas: float = 5.0) -> bool:
    return abs(count - mean) <= sigmas * math.sqrt(mean)


# --- arrivals -------------------------------------------------------------------------------------

def test_arrivals_are_deterministic_for_a_seed():
    shape = hold_shape(500, 10)
    first = list(arrivals(shape, UNIFORM, seed=42))
    second = list(arrivals(shape, UNIFORM, seed=42))
    assert first == second
    assert len(first) > 0


def test_another_seed_gives_other_arrivals():
    shape = hold_shape(500, 10)
    a = [x.t for x in arrivals(shape, UNIFORM, seed=1)]
    b = [x.t for x in arrivals(shape, UNIFORM, seed=2)]
    assert a[:50] != b[:50]


@pytest.mark.parametrize("seed", [1, 7, 20261231])
@pytest.mark.parametrize("rate, seconds", [(1000, 20), (50, 60), (3.5, 400)])
def test_count_over_a_hold_is_poisson_around_rate_times_duration(seed, rate, seconds):
    count = sum(1 for _ in arrivals(hold_shape(rate, seconds), UNIFORM, seed))
    assert within_poisson(count, rate * seconds), (count, rate * seconds)


def test_arrival_times_increase_and_stay_inside_the_load():
    shape = LoadShape.build([PhaseSpec("ramp", None, 10, rate_from=0, rate_to=800),
                             PhaseSpec("spike", None, 5, factor=3)])
    times = [a.t for a in arrivals(shape, UNIFORM, seed=3)]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[0] >= 0 and times[-1] < shape.duration
    indexes = [a.index for a in arrivals(shape, UNIFORM, seed=3)]
    assert indexes == list(range(len(indexes)))


def test_more_arrivals_in_the_spike_in_proportion():
    shape = LoadShape.build([PhaseSpec("hold", None, 10, rate_to=400), PhaseSpec("spike", None, 10, factor=3),
                             PhaseSpec("hold", None, 10)])
    counts = Counter(shape.phase_at(a.t).name for a in arrivals(shape, UNIFORM, seed=11))
    assert within_poisson(counts["hold"], 4000)
    assert within_poisson(counts["spike"], 12000)
    assert within_poisson(counts["hold#2"], 4000)
    ratio = counts["spike"] / counts["hold"]
    assert 2.7 < ratio < 3.3


def test_arrivals_follow_a_ramp_second_by_second():
    shape = LoadShape.build([PhaseSpec("ramp", None, 40, rate_from=50, rate_to=2000)])
    per_second = Counter(int(a.t) for a in arrivals(shape, UNIFORM, seed=5))
    for second in range(40):
        mean = shape.expected(second + 1) - shape.expected(second)
        assert within_poisson(per_second[second], mean), (second, per_second[second], mean)


def test_time_rescaled_gaps_are_unit_exponential():
    """Λ(t_i) - Λ(t_{i-1}) must be Exp(1) for a Poisson process with rate r(t): mean 1, variance 1."""
    shape = LoadShape.build([PhaseSpec("ramp", None, 20, rate_from=10, rate_to=1500),
                             PhaseSpec("spike", None, 5, factor=2), PhaseSpec("hold", None, 10)])
    marks = [shape.expected(a.t) for a in arrivals(shape, UNIFORM, seed=9)]
    gaps = [b - a for a, b in zip([0.0] + marks, marks)]
    n = len(gaps)
    mean = sum(gaps) / n
    variance = sum((g - mean) ** 2 for g in gaps) / n
    assert abs(mean - 1) < 5 / math.sqrt(n)
    assert abs(variance - 1) < 5 * math.sqrt(8 / n)   # Var of the sample variance of Exp(1) ≈ 8/n


def test_no_arrivals_where_the_rate_is_zero():
    shape = LoadShape.build([PhaseSpec("hold", None, 5, rate_to=0), PhaseSpec("hold", None, 5, rate_to=200),
                             PhaseSpec("hold", None, 5, rate_to=0)])
    times = [a.t for a in arrivals(shape, UNIFORM, seed=4)]
    assert times and all(5 <= t < 10 for t in times)


# --- keys -----------------------------------------------------------------------------------------

def keys_of(keys: Keys, n: int = 20000, seed: int = 1) -> list[str]:
    """The keys of the first n arrivals of a plan (the driver's own stream)."""
    keys_seen = [a.key for a in arrivals(hold_shape(n / 10 * 1.2, 10), keys, seed)][:n]
    assert len(keys_seen) == n
    return keys_seen


def test_uniform_keys_cover_the_space_evenly():
    counts = Counter(keys_of(Keys(space=100, distribution="uniform")))
    assert set(counts) == {f"k{i}" for i in range(100)}
    for count in counts.values():
        assert within_poisson(count, 200)


def test_zipf_concentrates_on_low_ranks():
    keys = Keys(space=1000, distribution="zipf", zipf_s=1.1)
    counts = Counter(keys_of(keys))
    harmonic = sum(1 / r ** 1.1 for r in range(1, 1001))
    for rank in (1, 2, 10):
        expected = 20000 / (rank ** 1.1 * harmonic)
        assert within_poisson(counts[f"k{rank - 1}"], expected), rank
    top = [key for key, _ in counts.most_common(3)]
    assert top == ["k0", "k1", "k2"]
    assert all(key.startswith("k") and 0 <= int(key[1:]) < 1000 for key in counts)


def test_zipf_differs_from_uniform():
    uniform = Counter(keys_of(Keys(space=1000, distribution="uniform")))
    zipf = Counter(keys_of(Keys(space=1000, distribution="zipf", zipf_s=1.1)))
    assert zipf["k0"] > 10 * max(uniform.values())


def test_small_key_space_forces_reuse():
    keys = keys_of(Keys(space=3, distribution="uniform"), n=300)
    assert set(keys) == {"k0", "k1", "k2"}
    shape = hold_shape(100, 2)
    picked = [a.key for a in arrivals(shape, Keys(space=2), seed=8)]
    assert len(picked) > len(set(picked)) and set(picked) <= {"k0", "k1"}


def test_key_choice_does_not_move_arrival_times():
    shape = hold_shape(300, 5)
    uniform = list(arrivals(shape, Keys(space=10), seed=12))
    zipf = list(arrivals(shape, Keys(space=5000, distribution="zipf"), seed=12))
    assert [a.t for a in uniform] == [a.t for a in zipf]
    assert [a.key for a in uniform] != [a.key for a in zipf]


SCENARIO = """
name: plan-test
seed: 99
target: {{command: [./server, --port, "{{port}}"]}}
fleet: {{hosts: {hosts}, balancer: {balancer}}}
load:
  - {{ramp: {{from: 100, to: 600, over: 4s}}}}
  - {{spike: {{factor: 2, for: 2s}}}}
faults:
  - {{kind: host-loss, every: 1s, from: 1s, until: 5s, hosts: 1}}
"""


def test_arrivals_do_not_depend_on_the_number_of_hosts():
    small = load_scenario_text(SCENARIO.format(hosts=2, balancer="round-robin"))
    large = load_scenario_text(SCENARIO.format(hosts=64, balancer="least-loaded"))
    a = list(arrivals(small.load, small.client.keys, small.seed))
    b = list(arrivals(large.load, large.client.keys, large.seed))
    assert a == b and len(a) > 500


# --- host loss ------------------------------------------------------------------------------------

def loss(index=0, times=(1.0,), count=1):
    return HostLoss(index=index, how="kill", times=tuple(times), hosts=HostSelection(count=count))


def test_loss_events_are_sorted_and_inside_the_run():
    a = loss(0, times=(5.0, 1.0, 30.0))
    b = loss(1, times=(1.0, 3.0))
    events = loss_events((a, b), duration=10)
    assert [(e.t, e.fault.index) for e in events] == [(1.0, 0), (1.0, 1), (3.0, 1), (5.0, 0)]
    assert [e.occurrence for e in events if e.fault is a] == [1, 0]   # numbered in the order written


def test_choose_hosts_is_deterministic_and_picks_only_candidates():
    event = LossEvent(5.0, loss(count=3), 0)
    candidates = [1, 3, 4, 6, 7]
    first = choose_hosts(7, event, candidates, 3)
    assert first == choose_hosts(7, event, list(reversed(candidates)), 3)
    assert len(first) == 3 and len(set(first)) == 3 and set(first) <= set(candidates)
    assert first == sorted(first)


def test_choose_hosts_never_asks_for_more_than_there_are():
    event = LossEvent(5.0, loss(count=5), 0)
    assert choose_hosts(1, event, [2, 4], 5) == [2, 4]
    assert choose_hosts(1, event, [], 5) == []


def test_choose_hosts_varies_with_occurrence_and_seed():
    fault = loss(count=1)
    by_occurrence = {tuple(choose_hosts(3, LossEvent(float(n), fault, n), list(range(16)), 1)) for n in range(40)}
    by_seed = {tuple(choose_hosts(seed, LossEvent(1.0, fault, 0), list(range(16)), 1)) for seed in range(40)}
    assert len(by_occurrence) > 4
    assert len(by_seed) > 4


def test_host_selection_resolves_against_the_fleet():
    assert HostSelection().resolve(8) == 8
    assert HostSelection(count=3).resolve(8) == 3
    assert HostSelection(count=30).resolve(8) == 8
    assert HostSelection(fraction=0.25).resolve(8) == 2
    assert HostSelection(fraction=0.01).resolve(8) == 1     # a positive share is at least one host
    assert HostSelection(fraction=0.0).resolve(8) == 0
    assert HostSelection(fraction=0.625).resolve(4) == 3     # 2.5 hosts: half rounds up, not to even
    assert HostSelection(fraction=0.375).resolve(4) == 2
    assert HostSelection(fraction=1.0).resolve(7) == 7


def test_window_intervals():
    assert Window(start=2, until=8).intervals(10) == [(2, 8)]
    assert Window(start=2).intervals(10) == [(2, 10)]
    assert Window(start=12).intervals(10) == []
    assert Window(start=0, every=4, active=1).intervals(10) == [(0, 1), (4, 5), (8, 9)]
    assert Window(start=1, until=6, every=2).intervals(10) == [(1, 3), (3, 5), (5, 6)]


# --- balancer -------------------------------------------------------------------------------------

def all_up(hosts: int, policy: str) -> Balancer:
    balancer = Balancer(hosts, policy)
    for host in range(hosts):
        balancer.set_in_rotation(host, True)
    return balancer


def test_round_robin_cycles_over_hosts_in_rotation():
    balancer = all_up(4, "round-robin")
    assert [balancer.pick() for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_round_robin_ignores_load():
    balancer = all_up(3, "round-robin")
    for _ in range(5):
        balancer.started(1)
    assert [balancer.pick() for _ in range(3)] == [0, 1, 2]


def test_least_loaded_picks_fewest_in_flight():
    balancer = all_up(4, "least-loaded")
    for host, load in enumerate([3, 1, 0, 2]):
        for _ in range(load):
            balancer.started(host)
    assert balancer.pick() == 2
    balancer.started(2)
    balancer.started(2)
    assert balancer.pick() == 1         # 1 in flight beats 2, 2, 3


def test_least_loaded_spreads_evenly_when_requests_pile_up():
    balancer = all_up(5, "least-loaded")
    for _ in range(50):
        balancer.started(balancer.pick())
    assert balancer.inflight == [10] * 5


def test_least_loaded_breaks_ties_in_rotation():
    balancer = all_up(3, "least-loaded")
    picks = []
    for _ in range(6):
        host = balancer.pick()
        picks.append(host)
        balancer.started(host)
        balancer.finished(host)
    assert picks == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("policy", ["round-robin", "least-loaded"])
def test_host_out_of_rotation_gets_nothing_and_its_share_spreads_evenly(policy):
    balancer = all_up(4, policy)
    balancer.set_in_rotation(2, False)
    counts = Counter()
    for _ in range(300):
        host = balancer.pick()
        counts[host] += 1
        balancer.started(host)
        balancer.finished(host)
    assert counts[2] == 0
    assert counts == {0: 100, 1: 100, 3: 100}


@pytest.mark.parametrize("policy", ["round-robin", "least-loaded"])
def test_host_back_in_rotation_gets_its_share_again(policy):
    balancer = all_up(3, policy)
    balancer.set_in_rotation(0, False)
    assert {balancer.pick() for _ in range(10)} == {1, 2}
    balancer.set_in_rotation(0, True)
    assert {balancer.pick() for _ in range(9)} == {0, 1, 2}
    assert balancer.live_hosts() == [0, 1, 2]


@pytest.mark.parametrize("policy", ["round-robin", "least-loaded"])
def test_nobody_in_rotation_gives_none(policy):
    balancer = Balancer(3, policy)
    assert balancer.pick() is None
    balancer.set_in_rotation(1, True)
    balancer.set_in_rotation(1, False)
    assert balancer.pick() is None
    assert Balancer(0, policy).pick() is None


def test_finished_never_goes_negative():
    balancer = all_up(2, "least-loaded")
    balancer.finished(0)
    balancer.started(1)
    balancer.finished(1, count=5)
    assert balancer.inflight == [0, 0]


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError):
        Balancer(2, "random")
