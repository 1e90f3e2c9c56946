"""Reading one page of a list endpoint through transient failures (discovery)."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from worker.backoff import action_delay
from worker.upstreams.base import ErrorKind, UpstreamError, reword
from worker.upstreams.gate import MAX_WAIT

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_TRIES = 5  # a walk of 100 pages at a 15 % fault rate then fails once in ~130 walks
PAGE_MAX_DELAY = 10.0  # a page is worth waiting for, not for as long as an action
TRANSIENT = (ErrorKind.RETRY, ErrorKind.UNKNOWN)  # a read's unknown outcome changed nothing


async def read_page(
    read: Callable[[], Awaitable[T]],
    where: str,
    base_delay: float,
    rng: random.Random | None = None,
) -> T:
    """`read()` until it succeeds, retrying transient failures (5xx, 429, timeouts, dropped
    connections, malformed answers) with capped backoff and full jitter. A permanent failure
    (refused credential, refused parameter) or the last try's failure is raised at once,
    prefixed with `where` and the number of tries."""
    for attempt in range(1, PAGE_TRIES + 1):
        try:
            return await read()
        except UpstreamError as exc:
            if exc.kind not in TRANSIENT:
                raise reword(exc, task_id=None, prefix=where) from None
            hopeless = (exc.retry_after or 0.0) > MAX_WAIT  # e.g. a day's quota is spent
            if attempt == PAGE_TRIES or hopeless:
                raise reword(exc, task_id=None, prefix=f"{where}(after {attempt} tries) ") from None
            delay = action_delay(attempt, base_delay, PAGE_MAX_DELAY, exc.retry_after, rng)
            log.debug("%s%s; try %d again in %.1fs", where, exc, attempt + 1, delay)
            await anyio.sleep(delay)
    raise AssertionError("unreachable")
