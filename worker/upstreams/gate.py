"""Admission in front of every request to one system: the gateway's rate, and the system's health.

Huawei's API gateway throttles per API and credential over fixed windows and says so in the
429 body (`limit:200,time:1 second`; docs/upstream.md). `RateControl` is an AIMD controller
that uses that message when it is there:

- Until a system throttles, nothing is paced: `reserve()` returns 0 without a clock read.
- A 429 that states no limit pauses the system for its Retry-After, or one second.
- The first 429 pauses the system until the window has surely rolled over (the window was used
  up: a request sent earlier would be refused too) and sets the pace to what this process got
  through in the last window, capped by 95 % of the stated limit. Several workers that share one
  credential each got their share of the window, so they start near a fair split instead of
  each claiming the whole limit.
- A later 429 pauses again and cuts the pace by 30 %, at most once per window (the answers to
  requests already in flight say the same thing again). Each second without one adds 2 % of the
  ceiling back. Two workers on one limit converge like two TCP flows on one link.
- Windows longer than `PACED_WINDOW` (`time:5 minute`, `time:1 day`) are not paced: a budget of
  95 % of the limit is spent as it comes, then the system pauses for a whole window, so each of
  the gateway's windows holds requests from one budget only, whatever its alignment.
- A configured `rate_limit` is a hard ceiling from the first request: requests are spaced
  1/rate apart, so no window of any length sees a burst.

Pacing is by reservation (each caller takes the next free slot), so a woken crowd of fetchers
is spread over time rather than released at once. This is hand-written because aiolimiter's
leaky bucket starts full (a burst of `rate` requests at once, which the gateway refuses) and
cannot change its rate while callers wait.

`CircuitBreaker` stops hammering a system that does not answer: five consecutive outage-class
failures (no connection, timeouts, 5xx) open it for a capped exponential cool-down; then one
probe decides. It also starts cautiously, with at most START_WINDOW requests in flight, doubling
with each answer (TCP's slow start), so a system that is down from the start costs a handful of
requests rather than one per fetcher, and one slow first answer holds nothing back.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

log = logging.getLogger(__name__)

HEADROOM = 0.95  # of a stated limit: clocks and the gateway's window edges are not ours
DECREASE = 0.7  # multiplicative cut on a 429
INCREASE = 0.02  # of the ceiling, added back per second without a 429
PACED_WINDOW = 10.0  # seconds: windows up to this are paced, longer ones spent as a budget
MAX_WAIT = 65.0  # a caller waits this long for its slot (a minute window); longer: deferred
MEASURE = 1.0  # seconds of accepted answers counted for the first cut
PROBE_EVERY = 5.0  # during a long pause, one request this often tests whether it is over

_POLICY = re.compile(
    r"limit\s*:\s*(\d+)\s*,\s*time\s*:\s*(\d+)\s*(second|minute|hour|day)s?", re.IGNORECASE
)
_UNIT = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(frozen=True, slots=True)
class Policy:
    """A gateway throttling policy as its 429 states it: `limit` requests per `window` s."""

    limit: int
    window: float

    @property
    def per_second(self) -> float:
        return self.limit / self.window


def parse_policy(message: object) -> Policy | None:
    """`...over ratelimit,limit:200,time:1 second` -> Policy(200, 1.0); None when absent."""
    if not isinstance(message, str):
        return None
    match = _POLICY.search(message)
    if match is None:
        return None
    limit, count, unit = int(match[1]), int(match[2]), match[3].lower()
    if limit < 1 or count < 1:
        return None
    return Policy(limit, count * _UNIT[unit])


@dataclass(frozen=True, slots=True)
class RateState:
    """What `status` shows of one system's rate control."""

    rate: float | None  # requests per second paced at; None: not paced
    ceiling: float | None  # the most it will pace at (rate_limit, or 95 % of a stated limit)
    policy: str | None  # the gateway's policy as last stated, e.g. "200/1s"
    paused_for: float  # seconds until requests go out again


class RateControl:
    """One system's pace. Not thread-safe: one event loop owns it."""

    def __init__(
        self, hard_limit: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hard_limit = hard_limit
        self.rate: float | None = hard_limit
        self.policy: Policy | None = None
        self._clock = clock
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._paused_at = 0.0
        self._next_probe = 0.0
        self._last_cut = -math.inf
        self._last_raise = 0.0
        self._budget_size: int | None = None  # long windows: requests allowed per window
        self._budget = 0
        self._accepted: deque[float] = deque(maxlen=20_000)
        self.requests = 0  # counters for status: every request let through, every 429
        self.throttled = 0

    @property
    def ceiling(self) -> float | None:
        stated = None
        if self.policy is not None and self.policy.window <= PACED_WINDOW:
            stated = HEADROOM * self.policy.per_second
        if stated is None:
            return self.hard_limit
        return stated if self.hard_limit is None else min(stated, self.hard_limit)

    def reserve(self) -> tuple[float, bool] | None:
        """Ask to send: (seconds to wait, final). A final wait is a reserved slot: send when it
        ends. A wait that is not final is a pause: wait, then ask again (a probe may have found
        the window open meanwhile). None: nothing before MAX_WAIT; the caller defers its work."""
        if self.rate is None and self._budget_size is None and not self._paused_until:
            self.requests += 1
            return 0.0, True  # never throttled: the fast path
        now = self._clock()
        if now < self._paused_until:
            if now >= self._next_probe:
                # One request every PROBE_EVERY seconds tests whether the window rolled over
                # early (the gateway's windows are fixed, their edges unknown to us).
                self._next_probe = now + PROBE_EVERY
                self.requests += 1
                return 0.0, True
            if self._paused_until - now > MAX_WAIT:
                return None  # an hour's or a day's quota: not worth holding a cycle for
            return min(self._paused_until, self._next_probe) - now, False
        if self._budget_size is not None:
            if self._budget <= 0:
                assert self.policy is not None
                self._pause(now, self.policy.window, probes=False)  # our own budget: no probes
                self._budget = self._budget_size
                return self.reserve()
            self._budget -= 1
        start = now
        if self.rate is not None:
            start = max(now, self._next_slot)
            if start - now > MAX_WAIT:
                if self._budget_size is not None:
                    self._budget += 1
                return None
            self._next_slot = start + 1.0 / self.rate
        self.requests += 1
        return start - now, True

    def now(self) -> float:
        return self._clock()

    def accepted(self, sent_at: float) -> None:
        """An answer that was not a 429 to a request sent at `sent_at` (`now()`): remember it,
        and win back some rate."""
        now = self._clock()
        self._accepted.append(now)
        if now < self._paused_until and sent_at >= self._paused_at:
            # sent during the pause (a probe) and let through: the window rolled over early
            self._paused_until = 0.0
            self._budget = max(0, (self._budget_size or 0) - 1)  # the probe was one of them
        rate, ceiling = self.rate, self.ceiling
        if rate is None or ceiling is None or rate >= ceiling or now - self._last_raise < 1.0:
            return
        self._last_raise = now
        self.rate = min(ceiling, rate + INCREASE * ceiling)

    def throttled_by(self, policy: Policy | None, retry_after: float | None) -> None:
        """A 429: pause until the window rolls over and, once per window, cut the pace."""
        now = self._clock()
        self.throttled += 1
        if retry_after is not None:
            self._pause(now, min(retry_after, 86_400.0))  # the gateway said when: believe it
        if policy is None and self.policy is None:
            # No limit stated, ever: nothing to pace by. Wait out the window and go on.
            if retry_after is None:
                self._pause(now, 1.0)
            return
        if policy is not None:
            self.policy = policy
        assert self.policy is not None
        window = self.policy.window
        if now - self._last_cut < window:
            # The same spent window, told again by requests already in flight.
            if retry_after is None:
                self._pause(now, window)
            return
        self._last_cut = now
        if retry_after is None:
            self._pause(now, window)
        self._last_raise = self._paused_until
        if window > PACED_WINDOW:
            full = max(1, int(HEADROOM * self.policy.limit))
            if self._budget_size is not None:
                full = max(1, int(self._budget_size * DECREASE))
            self._budget_size = self._budget = full
            return
        ceiling = self.ceiling
        assert ceiling is not None  # a paced window has a stated limit
        # first cut: what this process got through in the window; later ones: by DECREASE
        fresh = self._recent(now, window) / window if self.rate is None else self.rate * DECREASE
        self.rate = max(0.05 * ceiling, min(fresh, ceiling))
        self._next_slot = max(self._next_slot, self._paused_until)

    def _pause(self, now: float, seconds: float, *, probes: bool = True) -> None:
        until = now + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._paused_at = now
            self._next_probe = now + min(PROBE_EVERY, seconds) if probes else until

    def _recent(self, now: float, window: float = MEASURE) -> int:
        accepted = self._accepted
        while accepted and accepted[0] < now - 60.0:
            accepted.popleft()
        return sum(1 for t in accepted if t >= now - window)

    def state(self) -> RateState:
        policy = self.policy
        shown = None
        if policy is not None:
            shown = f"{policy.limit}/{_window_text(policy.window)}"
        return RateState(
            rate=self.rate,
            ceiling=self.ceiling,
            policy=shown,
            paused_for=max(0.0, self._paused_until - self._clock()),
        )


def _window_text(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class CircuitOpen(Exception):
    """Raised by `CircuitBreaker.admit` while the circuit is open."""

    def __init__(self, retry_in: float, reason: str) -> None:
        self.retry_in = retry_in
        self.reason = reason
        super().__init__(reason)


class CircuitBreaker:
    """closed: everything goes; half-open: one request at a time (the probe) until one answers;
    open: nothing goes until the cool-down ends, then half-open again."""

    THRESHOLD = 5  # consecutive outage-class failures that open the circuit
    BASE_COOLDOWN = 5.0
    MAX_COOLDOWN = 300.0
    START_WINDOW = 4  # requests in flight before the system has answered at all
    OPEN_WINDOW = 64  # past this the window is dropped: no more counting

    def __init__(self, system: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.system = system
        self._clock = clock
        self.state = "closed"
        self._window: int | None = self.START_WINDOW
        self._in_flight = 0  # counted while the start window holds
        self.failures = 0
        self.opens = 0  # consecutive openings: the cool-down doubles with each
        self.open_until = 0.0
        self.opened_at = 0.0
        self.last_failure = ""
        self._probing = False
        self._settled: anyio.Event | None = None  # made at first wait: needs an event loop

    async def admit(self) -> bool:
        """Wait for permission to send. True when this request is the probe (then `record`
        must be called with probe=True). Raises CircuitOpen while the circuit is open."""
        while True:
            if self.state == "closed":
                if self._window is None:
                    return False
                if self._in_flight < self._window:
                    self._in_flight += 1
                    return False
            elif self.state == "open":
                remaining = self.open_until - self._clock()
                if remaining > 0:
                    raise CircuitOpen(
                        remaining,
                        f"circuit open after {self.failures} consecutive failures "
                        f"(last: {self.last_failure}); next probe in {remaining:.0f}s",
                    )
                self.state = "half-open"
            if self.state == "half-open" and not self._probing:
                self._probing = True
                return True
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    def record(self, *, up: bool, probe: bool, failure: str = "") -> None:
        """The outcome of an admitted request: `up` when the system answered (anything but
        a 5xx), else `failure` says what went wrong."""
        self._landed()
        if up:
            if self._window is not None:
                self._window *= 2
                if self._window > self.OPEN_WINDOW:
                    self._window = None
                self._wake()
            self.failures = 0
            if self.state != "closed":
                if self.opens:
                    log.warning(
                        "%s: circuit closed: the system answers again (was open %.0fs)",
                        self.system,
                        self._clock() - self.opened_at,
                    )
                self.state = "closed"
                self.opens = 0
                self._wake()
        else:
            self.failures += 1
            self.last_failure = failure
            if self.failures >= self.THRESHOLD and (probe or self.state != "open"):
                self._open()
            elif self.state == "closed":
                self.state = "half-open"
        if probe:
            self._probing = False
            self._wake()

    def cancelled(self, *, probe: bool) -> None:
        """An admitted request ended without an outcome (cancelled): free its slot."""
        self._landed()
        if probe:
            self._probing = False
            self._wake()

    def _landed(self) -> None:
        if self._window is not None and self._in_flight:
            self._in_flight -= 1
            self._wake()

    def _open(self) -> None:
        now = self._clock()
        cooldown = min(self.MAX_COOLDOWN, self.BASE_COOLDOWN * 2**self.opens)
        if self.opens == 0:
            self.opened_at = now
            log.warning(
                "%s: circuit open after %d consecutive failures (last: %s); "
                "requests paused, first probe in %.0fs",
                self.system,
                self.failures,
                self.last_failure,
                cooldown,
            )
        self.opens += 1
        self.state = "open"
        self.open_until = now + cooldown
        self._wake()

    def _wake(self) -> None:
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def describe(self) -> str:
        if self.state == "half-open" and not self.opens:
            return "closed"  # a lone failure: nothing to report yet
        if self.state == "open":
            return f"open ({max(0.0, self.open_until - self._clock()):.0f}s to probe)"
        return self.state
