"""The one small protocol every upstream client implements, and its error classes.

The sync loop and the action runner only ever see these names; they never branch on a
system's name.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from worker.model import JSON, Fetched, Observation, System


class ErrorKind(enum.StrEnum):
    RETRY = "retry"  # nothing was applied: connect error, 429, 502/503/504, read of a GET failed
    UNKNOWN = "unknown"  # a write was sent and its answer was lost: it may have been applied
    AUTH = "auth"  # the credential was refused even after one refresh
    PERMANENT = "permanent"  # validation or business error: retrying cannot help
    NOT_FOUND = "not_found"  # the upstream says the task does not exist


class UpstreamError(Exception):
    """A classified failure. `str()` is one line naming the system, the task and the cause,
    with every secret redacted; it is what ends up in `last_error`."""

    @property
    def throttled(self) -> bool:
        return self.http_status == 429

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        system: System,
        task_id: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
        deferred: bool = False,
    ) -> None:
        self.kind = kind
        self.system = system
        self.task_id = task_id
        self.http_status = http_status
        self.retry_after = retry_after
        self.code = code
        # Nothing was sent: the system's circuit is open or its rate pushes the request past
        # any reasonable wait. A poll leaves the task due; an action is retried after
        # `retry_after` without counting as a failed try of the upstream.
        self.deferred = deferred
        self.detail = message
        where = f"{system} task {task_id}" if task_id else system
        super().__init__(f"{where}: {message}")


def reword(
    error: UpstreamError,
    *,
    task_id: str | None,
    prefix: str = "",
    kind: ErrorKind | None = None,
) -> UpstreamError:
    """The same failure for another task, with context (e.g. "task list at 200: ") prefixed,
    or reclassified (`kind`). The detail was redacted when first built."""
    return UpstreamError(
        kind or error.kind,
        prefix + error.detail,
        system=error.system,
        task_id=task_id,
        http_status=error.http_status,
        retry_after=error.retry_after,
        code=error.code,
        deferred=error.deferred,
    )


@dataclass(slots=True)
class Walk:
    """How far one discovery walk got: pages read."""

    pages: int = 0


@dataclass(frozen=True, slots=True)
class Health:
    """A client's view of its system: request and 429 counters since it was built, the pace
    its rate control keeps (None: not paced) and the state of its circuit breaker."""

    requests: int
    throttled: int
    rate: float | None
    ceiling: float | None
    policy: str | None
    circuit: str


class Upstream(Protocol):
    """One upstream system. Implementations live in aicc.py, secmaster.py, koodrive.py."""

    system: System

    async def fetch(self, task_id: str) -> Fetched:
        """Read one task's detail. Raises UpstreamError."""
        ...

    async def apply(self, task_id: str, kind: str, params: Mapping[str, str]) -> Mapping[str, JSON]:
        """Send one action exactly once (never re-sent by the HTTP layer).

        Returns the upstream answer (stored as the action's `result`). Raises UpstreamError;
        ErrorKind.UNKNOWN when the request may have reached the server but no answer came.
        """
        ...

    def discover(self, walk: Walk | None = None) -> AsyncIterator[str]:
        """Page through the list endpoint, yielding task ids (each once) and counting pages in
        `walk`. Systems without one yield nothing. Transient failures of a page are retried
        (paging.read_page); the error that finally stops a walk names the page."""
        ...

    def observe(self, payload: Mapping[str, JSON]) -> Observation:
        """Pure: read status, state, title and history items out of a stored payload."""
        ...

    def health(self) -> Health:
        """Rate control and circuit state, for `status` and the logs."""
        ...

    async def aclose(self) -> None: ...


Payload = Mapping[str, Any]
