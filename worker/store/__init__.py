"""The store owns every SQL statement: no other module builds queries.

`Store` is one object over one engine; its parts are split by table family.
"""

from __future__ import annotations

from worker.store.actions import ActionStore, ClaimedAction, Finish
from worker.store.base import utcnow, worker_name
from worker.store.engine import (
    DatabaseUrlError,
    SqliteWorkerLock,
    WorkerLockError,
    create_engine,
    redact_url,
    sqlite_path,
)
from worker.store.events import EventStore
from worker.store.reports import ReportStore
from worker.store.retention import RetentionPolicy, RetentionStore
from worker.store.tasks import ClaimedTask, PollResult, TaskStore
from worker.store.upstream import HealthRow, UpstreamStore, WalkRow


class Store(TaskStore, ActionStore, ReportStore, UpstreamStore, RetentionStore, EventStore):
    """Everything the commands and loops need from the database."""

    @classmethod
    def open(cls, url: str, *, pool_size: int = 10) -> Store:
        return cls(create_engine(url, pool_size=pool_size))


__all__ = [
    "ClaimedAction",
    "ClaimedTask",
    "DatabaseUrlError",
    "Finish",
    "HealthRow",
    "PollResult",
    "RetentionPolicy",
    "SqliteWorkerLock",
    "Store",
    "WalkRow",
    "WorkerLockError",
    "create_engine",
    "redact_url",
    "sqlite_path",
    "utcnow",
    "worker_name",
]
