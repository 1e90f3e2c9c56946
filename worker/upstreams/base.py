"""The one small protocol every upstream client implements, and its error classes.

The sync loop and the action runner only ever see these names; they never branch on a
system's name.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
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
    ) -> None:
        self.kind = kind
        self.system = system
        self.task_id = task_id
        self.http_status = http_status
        self.retry_after = retry_after
        self.code = code
        self.detail = message
        where = f"{system} task {task_id}" if task_id else system
        super().__init__(f"{where}: {message}")


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

    def discover(self) -> AsyncIterator[str]:
        """Page through the list endpoint, yielding task ids. Systems without one yield nothing."""
        ...

    def observe(self, payload: Mapping[str, JSON]) -> Observation:
        """Pure: read status, state, title and history items out of a stored payload."""
        ...

    async def aclose(self) -> None: ...


Payload = Mapping[str, Any]
