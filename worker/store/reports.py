"""Read-only views for `status` and `show`, and the sync_runs log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from worker.store.base import StoreBase, as_dict, utcnow
from worker.store.retention import last_prune, table_rows
from worker.store.schema import actions, sync_runs, task_events, task_snapshots, tasks


class ReportStore(StoreBase):
    async def start_run(self, worker: str, kind: str, now: datetime | None = None) -> int:
        async with self.engine.begin() as conn:
            run_id = await conn.scalar(
                sync_runs.insert()
                .values(worker=worker, kind=kind, started_at=now or utcnow())
                .returning(sync_runs.c.id)
            )
        return int(run_id)

    async def finish_run(
        self, run_id: int, *, polled: int, changed: int, failed: int, discovered: int = 0
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sync_runs.update()
                .where(sync_runs.c.id == run_id)
                .values(
                    finished_at=utcnow(),
                    polled=polled,
                    changed=changed,
                    failed=failed,
                    discovered=discovered,
                )
            )

    async def status_report(self, failing_limit: int = 20, runs_limit: int = 5) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            by_state = (
                await conn.execute(
                    sa.select(tasks.c.system, tasks.c.state, sa.func.count())
                    .where(tasks.c.tracked)
                    .group_by(tasks.c.system, tasks.c.state)
                    .order_by(tasks.c.system, tasks.c.state)
                )
            ).all()
            untracked = await conn.scalar(
                sa.select(sa.func.count()).select_from(tasks).where(sa.not_(tasks.c.tracked))
            )
            queue = (
                await conn.execute(
                    sa.select(actions.c.status, sa.func.count())
                    .group_by(actions.c.status)
                    .order_by(actions.c.status)
                )
            ).all()
            runs = (
                await conn.execute(
                    sa.select(sync_runs).order_by(sync_runs.c.id.desc()).limit(runs_limit)
                )
            ).all()
            failing = (
                await conn.execute(
                    sa.select(
                        tasks.c.system,
                        tasks.c.task_id,
                        tasks.c.consecutive_failures,
                        tasks.c.last_error,
                        tasks.c.next_poll_at,
                    )
                    .where(tasks.c.tracked, tasks.c.consecutive_failures > 0)
                    .order_by(tasks.c.consecutive_failures.desc(), tasks.c.id)
                    .limit(failing_limit)
                )
            ).all()
            rows_per_table = await table_rows(conn)
            pruned = await last_prune(conn)
        systems: dict[str, dict[str, int]] = {}
        for system, state, count in by_state:
            systems.setdefault(system, {})[state] = int(count)
        return {
            "tasks": systems,
            "untracked": int(untracked or 0),
            "actions": {status: int(count) for status, count in queue},
            "runs": [as_dict(r) for r in runs],
            "failing": [as_dict(r) for r in failing],
            "rows": rows_per_table,
            "last_prune": pruned,
        }

    async def show_task(self, system: str, task_id: str, limit: int = 200) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            task = (
                await conn.execute(
                    sa.select(tasks).where(tasks.c.system == system, tasks.c.task_id == task_id)
                )
            ).first()
            if task is None:
                return None
            info = as_dict(task)
            snapshot = (
                await conn.execute(
                    sa.select(task_snapshots).where(
                        task_snapshots.c.system == system,
                        task_snapshots.c.task_id == task_id,
                        task_snapshots.c.seq == info["snapshot_seq"],
                    )
                )
            ).first()
            events = (
                await conn.execute(
                    sa.select(task_events)
                    .where(task_events.c.system == system, task_events.c.task_id == task_id)
                    .order_by(task_events.c.id)
                    .limit(limit)
                )
            ).all()
            task_actions = (
                await conn.execute(
                    sa.select(
                        actions.c.id,
                        actions.c.kind,
                        sa.cast(actions.c.params, sa.Text).label("params"),
                        actions.c.status,
                        actions.c.attempts,
                        actions.c.last_error,
                        actions.c.created_at,
                        actions.c.finished_at,
                        actions.c.requested_by,
                    )
                    .where(actions.c.system == system, actions.c.task_id == task_id)
                    .order_by(actions.c.id)
                    .limit(limit)
                )
            ).all()
        for private in ("id", "lease_owner", "lease_until"):
            info.pop(private, None)
        return {
            "task": info,
            "snapshot": as_dict(snapshot) if snapshot else None,
            "events": [as_dict(e) for e in events],
            "actions": [as_dict(a) for a in task_actions],
        }
