"""Pure domain types shared by the store, the upstream clients, sync and actions.

Nothing here does I/O; everything is plain data that tests can build by hand.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from worker.hashing import canonical_json, hash_of

System = Literal["aicc", "secmaster", "koodrive"]
SYSTEMS: tuple[System, ...] = ("aicc", "secmaster", "koodrive")

JSON = Any  # a value decoded from JSON: dict, list, str, int, float, bool or None


class State(enum.StrEnum):
    """The normalised task state (docs/upstream.md, "Normalised state")."""

    OPEN = "open"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"
    UNKNOWN = "unknown"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({State.DONE, State.FAILED, State.CANCELED})


class EventKind(enum.StrEnum):
    STATUS_CHANGED = "status_changed"
    TRACE = "trace"
    COMMENT_ADDED = "comment_added"
    COMMENT_REMOVED = "comment_removed"
    ATTACHMENT_ADDED = "attachment_added"
    ATTACHMENT_REMOVED = "attachment_removed"


class ActionStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class AttemptOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One AICC taskTrace entry. Entries have no id upstream: position + content identify one."""

    position: int
    digest: str  # hash of the entry's canonical JSON
    entry: Mapping[str, JSON]


@dataclass(frozen=True, slots=True)
class Comment:
    id: str
    message: str
    time: datetime | None
    entry: Mapping[str, JSON]


@dataclass(frozen=True, slots=True)
class Observation:
    """What tasksync reads out of one upstream payload: the facts history is made of.

    Built by each system's pure ``observe(payload)`` so the previous snapshot (loaded from
    the database) and the fresh one (from the wire) go through the same code.
    """

    status: str | None
    state: State
    title: str | None
    changed_at: datetime | None = None  # upstream "update time" when the payload carries one
    trace: tuple[TraceEntry, ...] = ()
    comments: Mapping[str, Comment] = field(default_factory=dict)
    attachments: frozenset[str] = frozenset()
    extra_status: Mapping[str, JSON] = field(default_factory=dict)  # e.g. KooDrive resultCode


@dataclass(frozen=True, slots=True)
class Fetched:
    """One task detail as received: the stored payload, its hash and what it says."""

    system: System
    task_id: str
    payload: Mapping[str, JSON]
    content_hash: str
    observe: Callable[[Mapping[str, JSON]], Observation] = field(repr=False, compare=False)
    # the canonical JSON the hash was taken of: stored as the snapshot's payload text, so a
    # changed payload is not serialised a second time
    canonical: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def of(
        cls,
        system: System,
        task_id: str,
        payload: Mapping[str, JSON],
        observe: Callable[[Mapping[str, JSON]], Observation],
    ) -> Fetched:
        canonical = canonical_json(payload)
        return cls(system, task_id, payload, hash_of(canonical), observe, canonical)

    @property
    def observation(self) -> Observation:
        """What the payload says. Derived on use: a poll whose content hash is unchanged
        never needs it (the task row keeps its state), and that is most polls."""
        return self.observe(self.payload)


@dataclass(frozen=True, slots=True)
class Event:
    """A history entry derived by diffing two observations (``worker.diff``)."""

    kind: EventKind
    dedup_key: str  # unique per (system, task_id, kind): repeated cycles insert nothing new
    occurred_at: datetime | None
    data: Mapping[str, JSON]
