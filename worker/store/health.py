"""What monitoring asks of the database: the scrape-time gauges, the schema revision, and the
facts `tasksync healthcheck` judges. Every statement is a cheap aggregate; none takes a lock.

Functions over a store (like worker/store/listen.py) rather than Store methods: only the
listener and the healthcheck use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from worker.metrics import DatabaseView
from worker.store.base import StoreBase, utcnow
from worker.store.schema import actions, sync_runs, tasks


async def database_view(
    store: StoreBase, systems: Sequence[str] = (), now: datetime | None = None
) -> DatabaseView:
    """Two aggregate queries: tracked tasks by (system, state) with their failing count and
    earliest next poll, and actions by status with the earliest due pending one. `systems`
    (the configured ones) get gauges even before they track anything."""
    now = now or utcnow()
    failing = sa.func.sum(sa.case((tasks.c.consecutive_failures > 0, 1), else_=0))
    task_rows = sa.select(
        tasks.c.system, tasks.c.state, sa.func.count(), failing, sa.func.min(tasks.c.next_poll_at)
    ).where(tasks.c.tracked)
    due_pending = sa.case(
        (
            sa.and_(actions.c.status == "pending", actions.c.next_attempt_at <= now),
            actions.c.next_attempt_at,
        )
    )
    action_rows = sa.select(actions.c.status, sa.func.count(), sa.func.min(due_pending))
    async with store.engine.connect() as conn:
        by_state = (await conn.execute(task_rows.group_by(tasks.c.system, tasks.c.state))).all()
        by_status = (await conn.execute(action_rows.group_by(actions.c.status))).all()
    view = DatabaseView()
    earliest: dict[str, datetime | None] = dict.fromkeys(systems)
    for system, state, count, failed, next_poll in by_state:
        view.tasks[str(system), str(state)] = int(count)
        view.failing[system] = view.failing.get(system, 0) + int(failed or 0)
        next_poll = _aware(next_poll)
        known = earliest.get(system)
        if next_poll is not None and (known is None or next_poll < known):
            earliest[system] = next_poll
        else:
            earliest.setdefault(system, None)
    for system, due in earliest.items():
        view.poll_lag[system] = max(0.0, (now - due).total_seconds()) if due else 0.0
    oldest: datetime | None = None
    for status, count, due in by_status:
        view.actions[str(status)] = int(count)
        due = _aware(due)
        if due is not None and (oldest is None or due < oldest):
            oldest = due
    view.queue_age = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
    return view


async def schema_revision(store: StoreBase) -> str | None:
    """The database's Alembic revision; None when it was never migrated."""
    async with store.engine.connect() as conn:
        exists = await conn.run_sync(lambda c: sa.inspect(c).has_table("alembic_version"))
        if not exists:
            return None
        value = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
    return None if value is None else str(value)


@dataclass(frozen=True)
class SystemCycle:
    """One system's polls in the newest sync cycle that polled it."""

    system: str
    polled: int
    failed: int  # consecutive_failures > 0 and not "not found"
    last_error: str | None


async def last_cycle_end(store: StoreBase, kind: str = "sync") -> datetime | None:
    async with store.engine.connect() as conn:
        value = await conn.scalar(
            sa.select(sa.func.max(sync_runs.c.finished_at)).where(sync_runs.c.kind == kind)
        )
    return _aware(value)


async def newest_cycle_polls(store: StoreBase, systems: Sequence[str]) -> list[SystemCycle]:
    """Per system: the tasks polled since the start of the newest sync cycle that polled it
    (the cycle that started last before its newest poll), and how many of them failed."""
    out: list[SystemCycle] = []
    async with store.engine.connect() as conn:
        for system in systems:
            newest = _aware(
                await conn.scalar(
                    sa.select(sa.func.max(tasks.c.last_polled_at)).where(
                        tasks.c.tracked, tasks.c.system == system
                    )
                )
            )
            if newest is None:
                continue
            started = _aware(
                await conn.scalar(
                    sa.select(sa.func.max(sync_runs.c.started_at)).where(
                        sync_runs.c.kind == "sync", sync_runs.c.started_at <= newest
                    )
                )
            )
            polled_since = sa.and_(
                tasks.c.tracked,
                tasks.c.system == system,
                tasks.c.last_polled_at >= (started or newest),
            )
            failing = sa.and_(tasks.c.consecutive_failures > 0, sa.not_(tasks.c.not_found))
            row: Any = (
                await conn.execute(
                    sa.select(
                        sa.func.count(),
                        sa.func.sum(sa.case((failing, 1), else_=0)),
                        sa.func.max(sa.case((failing, tasks.c.last_error))),
                    ).where(polled_since)
                )
            ).one()
            out.append(SystemCycle(system, int(row[0]), int(row[1] or 0), row[2]))
    return out


def _aware(value: Any) -> datetime | None:
    """Aggregates lose the column type on SQLite (naive text back): make them aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    moment: datetime = value
    return moment
