"""Rate control, circuit breaker and the sandbox's gateway as pure logic, on a fake clock."""

from __future__ import annotations

import anyio
import pytest

from worker.sandbox.gateway import Gateway, Throttle, parse_throttle
from worker.upstreams.gate import (
    HEADROOM,
    MAX_WAIT,
    PROBE_EVERY,
    CircuitBreaker,
    CircuitOpen,
    Policy,
    RateControl,
    parse_policy,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


GATEWAY = "The throttling threshold has been reached: policy {p} over ratelimit,limit:{n},time:{t}"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (GATEWAY.format(p="user", n=200, t="1 second"), Policy(200, 1.0)),
        (GATEWAY.format(p="api", n=40, t="1 second"), Policy(40, 1.0)),
        (GATEWAY.format(p="app", n=600, t="1 minute"), Policy(600, 60.0)),
        (GATEWAY.format(p="ip", n=100, t="5 minute"), Policy(100, 300.0)),
        (GATEWAY.format(p="user", n=5000, t="1 hour"), Policy(5000, 3600.0)),
        (GATEWAY.format(p="user", n=9, t="1 day"), Policy(9, 86400.0)),
        ("limit: 10 , time: 2 seconds", Policy(10, 2.0)),
        ("The throttling threshold has been reached", None),
        ("limit:0,time:1 second", None),
        ("limit:10,time:1 fortnight", None),
        (None, None),
        (42, None),
    ],
)
def test_parse_policy(message: object, expected: Policy | None) -> None:
    assert parse_policy(message) == expected


def test_never_throttled_costs_no_clock_read() -> None:
    def clock() -> float:
        raise AssertionError("the fast path read the clock")

    rate = RateControl(clock=clock)
    for _ in range(1000):
        assert rate.reserve() == (0.0, True)
    assert rate.requests == 1000 and rate.throttled == 0


def test_hard_limit_spaces_requests_from_the_first_one() -> None:
    clock = Clock()
    rate = RateControl(10.0, clock=clock)
    waits = [rate.reserve() for _ in range(25)]
    assert all(final for _, final in waits)  # type: ignore[misc]
    starts = [clock.now + w for w, _ in waits]  # type: ignore[misc]
    # no burst: in any one-second window at most 10 requests
    for i in range(len(starts) - 10):
        assert starts[i + 10] - starts[i] >= 1.0 - 1e-9
    assert starts[0] == clock.now


def test_first_429_pauses_and_paces_at_what_got_through() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    for _ in range(40):  # the window's 40 answered...
        rate.reserve()
        rate.accepted(clock.now)
    rate.throttled_by(Policy(40, 1.0), None)  # ...then the gateway says no
    assert rate.rate == pytest.approx(HEADROOM * 40)
    wait, final = rate.reserve()  # type: ignore[misc]
    assert not final and wait == pytest.approx(1.0)  # the spent window rolls over first
    clock.now += wait
    slots = []
    for _ in range(38):
        wait, final = rate.reserve()  # type: ignore[misc]
        assert final
        slots.append(clock.now + wait)
    assert slots[-1] - slots[0] == pytest.approx(37 / (HEADROOM * 40))


def test_two_workers_start_from_their_share_and_cut_once_per_window() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    for _ in range(20):  # this worker got half of a 40/s window
        rate.reserve()
        rate.accepted(clock.now)
    rate.throttled_by(Policy(40, 1.0), None)
    assert rate.rate == pytest.approx(20.0)
    for _ in range(10):  # answers to requests already in flight say the same again
        rate.throttled_by(Policy(40, 1.0), None)
    assert rate.rate == pytest.approx(20.0)
    clock.now += 1.5
    rate.throttled_by(Policy(40, 1.0), None)  # a new window, still too fast
    assert rate.rate == pytest.approx(14.0)
    # each second without a 429 wins back 2 % of the ceiling
    clock.now += 1.1
    rate.accepted(clock.now)
    clock.now += 1.1
    rate.accepted(clock.now)
    assert rate.rate == pytest.approx(14.0 + 0.02 * HEADROOM * 40)


def test_a_worker_that_got_nothing_through_starts_slow() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    rate.reserve()
    rate.throttled_by(Policy(40, 1.0), None)  # another worker had spent the window already
    assert rate.rate == pytest.approx(0.05 * HEADROOM * 40)  # the floor, then additive growth
    wait, final = rate.reserve()  # type: ignore[misc]
    assert not final and wait == pytest.approx(1.0)


def test_a_429_without_a_limit_pauses_for_retry_after_or_a_second() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    rate.throttled_by(None, None)
    assert rate.rate is None
    wait, final = rate.reserve()  # type: ignore[misc]
    assert not final and wait == pytest.approx(1.0)
    clock.now += 1.0
    assert rate.reserve() == (0.0, True)
    rate.throttled_by(None, 7.0)
    assert rate.state().paused_for == pytest.approx(7.0)


def test_minute_window_spends_a_budget_then_pauses_with_single_probes() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    for _ in range(100):
        rate.reserve()
        rate.accepted(clock.now)
    rate.throttled_by(Policy(100, 60.0), None)
    assert rate.rate is None  # long windows are spent as a budget, not paced
    # paused: nobody goes before the first probe, 5 s on
    wait, final = rate.reserve()  # type: ignore[misc]
    assert not final and wait == pytest.approx(PROBE_EVERY)
    clock.now += PROBE_EVERY
    assert rate.reserve() == (0.0, True)  # the probe
    wait, final = rate.reserve()  # type: ignore[misc]
    assert not final  # everyone else waits for what the probe finds
    rate.throttled_by(Policy(100, 60.0), None)  # still the spent window
    clock.now += PROBE_EVERY
    probe_sent = clock.now
    assert rate.reserve() == (0.0, True)
    rate.accepted(probe_sent)  # the window rolled over early
    sent = 0
    while (slot := rate.reserve()) is not None and slot == (0.0, True):
        sent += 1
    assert sent == int(HEADROOM * 100) - 1  # the budget (the probe took one)
    assert slot is not None and not slot[1]  # then a pause of a whole window, no probes
    assert rate.state().paused_for == pytest.approx(60.0)


def test_an_answer_to_a_request_sent_before_the_pause_does_not_end_it() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    for _ in range(100):
        rate.reserve()
        rate.accepted(clock.now)
    sent_before = clock.now
    clock.now += 0.01
    rate.throttled_by(Policy(100, 60.0), None)
    rate.accepted(sent_before)
    assert rate.state().paused_for > 59


def test_a_pause_beyond_max_wait_defers_callers_but_still_probes() -> None:
    clock = Clock()
    rate = RateControl(clock=clock)
    for _ in range(10):
        rate.reserve()
        rate.accepted(clock.now)
    rate.throttled_by(Policy(10, 3600.0), None)
    clock.now += PROBE_EVERY
    assert rate.reserve() == (0.0, True)  # a probe goes out even so
    assert rate.reserve() is None  # the rest would wait an hour: deferred
    assert rate.state().paused_for > MAX_WAIT


@pytest.mark.anyio
async def test_breaker_opens_after_five_failures_and_one_probe_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker("secmaster", clock=clock)
    assert await breaker.admit() is False  # closed, within the start window
    breaker.record(up=False, probe=False, failure="HTTP 503")
    for _ in range(4):
        probe = await breaker.admit()
        assert probe  # after a failure: one at a time
        breaker.record(up=False, probe=probe, failure="HTTP 503")
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        await breaker.admit()
    assert info.value.retry_in == pytest.approx(CircuitBreaker.BASE_COOLDOWN)
    assert "5 consecutive failures" in str(info.value) and "HTTP 503" in str(info.value)
    clock.now += CircuitBreaker.BASE_COOLDOWN
    assert await breaker.admit() is True
    breaker.record(up=False, probe=True, failure="cannot connect")
    with pytest.raises(CircuitOpen) as info:
        await breaker.admit()
    assert info.value.retry_in == pytest.approx(2 * CircuitBreaker.BASE_COOLDOWN)  # doubled
    clock.now += 2 * CircuitBreaker.BASE_COOLDOWN
    probe = await breaker.admit()
    breaker.record(up=True, probe=probe)
    assert breaker.state == "closed" and breaker.describe() == "closed"
    assert await breaker.admit() is False


@pytest.mark.anyio
async def test_breaker_starts_with_a_small_window_that_doubles() -> None:
    breaker = CircuitBreaker("koodrive")
    for _ in range(CircuitBreaker.START_WINDOW):
        assert await breaker.admit() is False
    with anyio.move_on_after(0.1) as waited:
        await breaker.admit()  # a fifth request waits for an answer
    assert waited.cancelled_caught
    breaker.record(up=True, probe=False)  # one answer: the window doubles to 8
    for _ in range(2 * CircuitBreaker.START_WINDOW - 3):
        assert await breaker.admit() is False
    for _ in range(20):
        breaker.record(up=True, probe=False)
    for _ in range(1000):  # past 64 the window is gone
        assert await breaker.admit() is False


@pytest.mark.anyio
async def test_breaker_holds_others_while_the_probe_is_out() -> None:
    breaker = CircuitBreaker("aicc")
    breaker.record(up=False, probe=False, failure="HTTP 500")  # half-open: one at a time
    order: list[str] = []

    async def request(name: str) -> None:
        probe = await breaker.admit()
        order.append(f"{name} sent")
        await anyio.sleep(0.05 if probe else 0)
        breaker.record(up=True, probe=probe)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(request, name)
    assert order[0] == "a sent" and len(order) == 3  # b and c went only once a answered
    assert breaker.state == "closed"


def test_throttle_spec_parses_and_refuses_bad_items() -> None:
    policies = parse_throttle("aicc=40/1s, secmaster=100/s,koodrive=600/1m")
    assert policies == {
        "aicc": Throttle(40, 1, "s"),
        "secmaster": Throttle(100, 1, "s"),
        "koodrive": Throttle(600, 1, "m"),
    }
    assert policies["koodrive"].message().endswith("limit:600,time:1 minute")
    assert parse_policy(policies["aicc"].message()) == Policy(40, 1.0)
    assert parse_throttle("") == {}
    for bad, fragment in (
        ("aicc=40", "expected SYSTEM=LIMIT/WINDOW"),
        ("nope=1/1s", "unknown system"),
        ("aicc=0/1s", "positive"),
        ("aicc=5/1w", "expected SYSTEM=LIMIT/WINDOW"),
    ):
        with pytest.raises(ValueError, match=fragment):
            parse_throttle(bad)


def test_gateway_counts_fixed_windows() -> None:
    clock = Clock(600.0)
    gateway = Gateway({"aicc": Throttle(3, 1, "m")}, clock=clock)
    assert [gateway.admit("aicc") is None for _ in range(5)] == [True, True, True, False, False]
    assert gateway.admit("secmaster") is None  # no policy: never refused
    clock.now = 659.9
    assert gateway.admit("aicc") is not None  # the same minute
    clock.now = 660.0
    assert gateway.admit("aicc") is None  # the next one
    assert gateway.refused["aicc"] == 3 and gateway.admitted["aicc"] == 4
