"""The change stream: history events in id order for `tasksync events`, and the PostgreSQL
`NOTIFY tasksync_events` sent by every transaction that stores events.

Why the store sends the NOTIFY rather than a trigger: the events of one batch go in through
SQLAlchemy's executemany, which PostgreSQL sees as one statement per row or per chunk of rows, so
a statement-level trigger would notify several times per transaction (and a row-level one once
per event); the store knows when its transaction stored events and which ids they got.

Why event-storing transactions take a transaction-scoped advisory lock on PostgreSQL: ids come
from a sequence, and two workers committing out of order would let a consumer that read up to
id 20 (committed first) never see id 15 (committed a moment later). Under the lock, ids are
handed out and committed in order, so "everything after the last id I saw" has no gaps. SQLite
runs one write transaction at a time, so it needs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from worker.store.base import StoreBase
from worker.store.schema import task_events, tasks

EVENTS_CHANNEL = "tasksync_events"
# pg_advisory_xact_lock key of "storing events"; any constant no other code of ours uses
EVENT_ORDER_LOCK = 0x7461736B_6576  # "task" "ev"
PAGE = 1000  # events per query when reading a range


async def lock_event_order(conn: Any) -> None:
    """Call in a PostgreSQL transaction before it stores events (see the module doc). It is
    held until the commit: take it as late as possible."""
    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(EVENT_ORDER_LOCK)))


async def notify_events(conn: Any, highest_id: int) -> None:
    """Delivered at commit, and only if the transaction commits."""
    await conn.execute(sa.select(sa.func.pg_notify(EVENTS_CHANNEL, str(highest_id))))


def _columns() -> sa.Select[Any]:
    e = task_events
    return sa.select(
        e.c.id,
        e.c.system,
        e.c.task_id,
        e.c.kind,
        e.c.occurred_at,
        e.c.observed_at,
        e.c.data,
        tasks.c.title,
    ).select_from(
        e.outerjoin(tasks, sa.and_(tasks.c.system == e.c.system, tasks.c.task_id == e.c.task_id))
    )


def _filtered(
    query: sa.Select[Any], systems: Sequence[str], kinds: Sequence[str]
) -> sa.Select[Any]:
    if systems:
        query = query.where(task_events.c.system.in_(list(systems)))
    if kinds:
        query = query.where(task_events.c.kind.in_(list(kinds)))
    return query


class EventStore(StoreBase):
    async def events_after(
        self,
        since: int,
        *,
        systems: Sequence[str] = (),
        kinds: Sequence[str] = (),
        limit: int = PAGE,
    ) -> list[dict[str, Any]]:
        """Events with id > since, oldest first, at most `limit`."""
        query = _filtered(_columns(), systems, kinds).where(task_events.c.id > since)
        async with self.engine.connect() as conn:
            found = (await conn.execute(query.order_by(task_events.c.id).limit(limit))).all()
        return [dict(r._mapping) for r in found]

    async def latest_events(
        self, *, systems: Sequence[str] = (), kinds: Sequence[str] = (), limit: int = 10
    ) -> tuple[list[dict[str, Any]], int]:
        """The newest `limit` matching events in id order, and the highest event id of all at
        that moment: following from there misses nothing and repeats nothing."""
        async with self.engine.connect() as conn:
            high = int(await conn.scalar(sa.select(sa.func.max(task_events.c.id))) or 0)
            query = _filtered(_columns(), systems, kinds).where(task_events.c.id <= high)
            found = (await conn.execute(query.order_by(task_events.c.id.desc()).limit(limit))).all()
        return [dict(r._mapping) for r in reversed(found)], high
