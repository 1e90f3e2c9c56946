"""Pure backoff schedules: for actions (capped exponential, full jitter) and failing tasks."""

from __future__ import annotations

import random

RETRY_AFTER_LIMIT = 86_400.0  # a Retry-After further out than a day is taken as a day


def action_delay(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the next attempt after `attempt` attempts (1 = the first failed).

    Full jitter (uniform in [0, min(cap, base * 2**(attempt-1))]) spreads retries of many
    actions that failed together. An upstream's Retry-After is a floor.
    """
    ceiling = min(cap, base * 2.0 ** max(0, min(attempt - 1, 60)))
    delay = (rng or random).uniform(0, ceiling)
    if retry_after is not None:
        # the server said when: never earlier, even past our own cap (bounded to a day)
        delay = max(delay, min(retry_after, RETRY_AFTER_LIMIT))
    return delay


def poll_delay(
    failures: int,
    poll_interval: float,
    cap: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds before a task that failed `failures` times in a row is polled again.

    Starts at min(poll_interval, 30 s), doubles per failure, never beyond max(cap, interval);
    ±10 % jitter so a burst of failures does not come back as one burst.
    """
    start = min(poll_interval, 30.0) or 1.0
    delay = min(max(cap, poll_interval), start * 2.0 ** max(0, min(failures - 1, 60)))
    jitter: float = (rng or random).uniform(0.9, 1.1)
    return delay * jitter
