"""Helpers shared by the tests that drive tasksync against the sandbox."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa

from worker.config import Settings
from worker.model import System
from worker.sandbox import Sandbox
from worker.store import Store
from worker.upstreams import build_upstreams
from worker.upstreams.base import Upstream


def settings_for(sb: Sandbox, url: str, **worker: Any) -> Settings:
    data: dict[str, Any] = tomllib.loads(sb.config_toml())
    data["database"] = {"url": url}
    data["worker"] = {"concurrency": 16, **worker}
    data["retry"] = {"base_delay": 0.01, "max_delay": 0.05}  # backoff switched off in tests
    return Settings.model_validate(data)


@asynccontextmanager
async def clients(settings: Settings) -> AsyncIterator[Mapping[System, Upstream]]:
    upstreams = build_upstreams(settings)
    try:
        yield upstreams
    finally:
        for client in upstreams.values():
            await client.aclose()


async def track_all(store: Store, sb: Sandbox) -> int:
    total = 0
    for system in ("aicc", "secmaster", "koodrive"):
        total += await store.track(system, sb.task_ids(system))  # type: ignore[arg-type]
    return total


async def count(store: Store, table: str, where: str = "1=1", **params: Any) -> int:
    async with store.engine.connect() as conn:
        value = await conn.scalar(sa.text(f"SELECT count(*) FROM {table} WHERE {where}"), params)
    return int(value or 0)


async def rows(store: Store, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        result = await conn.execute(sa.text(sql), params)
        return [dict(r._mapping) for r in result]
