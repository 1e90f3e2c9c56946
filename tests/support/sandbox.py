"""Driving tasksync in-process against the sandbox: its settings, its clients, its tasks."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

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
