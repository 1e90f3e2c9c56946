"""What the workers know about the upstream systems: rate control and circuit state per cycle,
and how each system's discovery walk ended. Both are read by `status`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from worker.store.base import StoreBase, as_dict, utcnow
from worker.store.schema import discovery_walks, upstream_health

HEALTH_KEPT = timedelta(days=7)  # one-shot `sync` runs each leave a row under their own name


@dataclass(frozen=True, slots=True)
class HealthRow:
    system: str
    requests: int
    throttled: int
    rate: float | None
    ceiling: float | None
    policy: str | None
    circuit: str


@dataclass(frozen=True, slots=True)
class WalkRow:
    system: str
    started_at: datetime
    pages: int
    found: int
    new: int
    complete: bool
    error: str | None


class UpstreamStore(StoreBase):
    async def record_health(self, worker: str, rows: Sequence[HealthRow]) -> None:
        if not rows:
            return
        now = utcnow()
        values = [
            {
                "system": r.system,
                "worker": worker,
                "updated_at": now,
                "requests": r.requests,
                "throttled": r.throttled,
                "rate": r.rate,
                "ceiling": r.ceiling,
                "policy": r.policy,
                "circuit": r.circuit,
            }
            for r in rows
        ]
        statement = self.insert(upstream_health)
        statement = statement.on_conflict_do_update(
            index_elements=["system", "worker"],
            set_={
                name: statement.excluded[name]
                for name in (
                    "updated_at",
                    "requests",
                    "throttled",
                    "rate",
                    "ceiling",
                    "policy",
                    "circuit",
                )
            },
        )
        async with self.engine.begin() as conn:
            await conn.execute(statement, values)
            await conn.execute(
                upstream_health.delete().where(upstream_health.c.updated_at < now - HEALTH_KEPT)
            )

    async def record_walks(self, run_id: int, worker: str, walks: Sequence[WalkRow]) -> None:
        if not walks:
            return
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                discovery_walks.insert(),
                [
                    {
                        "run_id": run_id,
                        "system": w.system,
                        "worker": worker,
                        "started_at": w.started_at,
                        "finished_at": now,
                        "pages": w.pages,
                        "found": w.found,
                        "new": w.new,
                        "complete": w.complete,
                        "error": w.error,
                    }
                    for w in walks
                ],
            )

    async def upstream_report(self) -> dict[str, Any]:
        """Per system: the newest health row of any worker, and the newest discovery walk."""
        async with self.engine.connect() as conn:
            health = (
                await conn.execute(
                    sa.select(upstream_health).order_by(
                        upstream_health.c.system, upstream_health.c.updated_at.desc()
                    )
                )
            ).all()
            newest = (
                sa.select(sa.func.max(discovery_walks.c.id))
                .group_by(discovery_walks.c.system)
                .scalar_subquery()
            )
            walks = (
                await conn.execute(
                    sa.select(discovery_walks)
                    .where(discovery_walks.c.id.in_(newest))
                    .order_by(discovery_walks.c.system)
                )
            ).all()
        upstreams: dict[str, dict[str, Any]] = {}
        for row in health:
            info = as_dict(row)
            upstreams.setdefault(info.pop("system"), info)  # the newest row comes first
        discovery = {}
        for row in walks:
            info = as_dict(row)
            for private in ("id", "run_id"):
                info.pop(private, None)
            discovery[info.pop("system")] = info
        return {"upstreams": upstreams, "discovery": discovery}
