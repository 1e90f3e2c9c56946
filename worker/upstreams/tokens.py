"""A cached credential per client, renewed before it expires and shared by concurrent callers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from worker.upstreams.base import UpstreamError, reword

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    refresh_at: float  # monotonic: renew proactively from here on
    expires_at: float  # monotonic: the issuer's own expiry
    generation: int


Issuer = Callable[[str | None], Awaitable[tuple[str, float]]]
"""Fetch a new token for (the task that needs it): returns (token, lifetime in seconds)."""


class TokenCache:
    """One cached credential per client, renewed at `refresh_fraction` of its lifetime.

    Concurrent callers share one renewal: they wait on the lock and, when they get it, see that
    the attempt counter moved and take its result (the new token, or the same failure) instead
    of issuing another token request.
    """

    def __init__(
        self,
        issue: Issuer,
        *,
        refresh_fraction: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issue = issue
        self._fraction = refresh_fraction
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: Token | None = None
        self._attempts = 0
        self._failure: UpstreamError | None = None

    async def get(self, task_id: str | None) -> Token:
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token
        return await self._renew(task_id, stale=token, forced=False)

    async def renew(self, stale: Token, task_id: str | None) -> Token:
        """After the upstream refused `stale`: a new token (shared with concurrent callers)."""
        return await self._renew(task_id, stale=stale, forced=True)

    async def _renew(self, task_id: str | None, *, stale: Token | None, forced: bool) -> Token:
        seen = self._attempts
        async with self._lock:
            current = self._token
            if self._attempts != seen:  # someone renewed while this caller waited
                if current is not None and current is not stale:
                    return current
                if self._failure is not None:
                    raise _for_task(self._failure, task_id)
            if current is not None and current is not stale:
                return current
            if not forced and current is not None and self._clock() < current.refresh_at:
                return current
            try:
                value, lifetime = await self._issue(task_id)
            except UpstreamError as exc:
                # Counted when the attempt ends, so callers that queued behind it see it.
                self._attempts += 1
                self._failure = exc
                if not forced and current is not None and self._clock() < current.expires_at:
                    # A proactive renewal failed but the old token still lives: keep using it.
                    log.warning("token renewal failed, old token still valid: %s", exc)
                    return current
                self._token = None
                raise
            self._attempts += 1
            now = self._clock()
            self._failure = None
            self._token = Token(
                value, now + self._fraction * lifetime, now + lifetime, self._attempts
            )
            return self._token


def _for_task(error: UpstreamError, task_id: str | None) -> UpstreamError:
    return reword(error, task_id=task_id)
