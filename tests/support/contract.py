"""The contract suite's helpers: the command, a workspace, plain-SQL readers, a threaded sandbox.

The suite is a black box: it runs the command and reads the documented tables with plain SQL
(sqlite3, asyncpg), and imports nothing of the product but the sandbox (a simulator).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.cli import run_cli
from tests.support.contract_sim import ContractSim, aicc_task, koodrive_task, secmaster_task

UTC = dt.UTC


# --------------------------------------------------------------------------------------------
# running the command
# --------------------------------------------------------------------------------------------


def tasksync(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`run_cli`, and never a traceback on either stream."""
    result = run_cli(*args, env=env, cwd=cwd, timeout=timeout)
    assert "Traceback" not in result.stderr, f"traceback from {args}:\n{result.stderr}"
    assert "Traceback" not in result.stdout, f"traceback from {args}:\n{result.stdout}"
    return result


def parallel(calls: Sequence[Callable[[], Any]], workers: int = 8) -> list[Any]:
    """Independent commands at once: each subprocess costs ~0.7 s of interpreter start-up."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda f: f(), calls))


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result


# --------------------------------------------------------------------------------------------
# reading the database with plain SQL
# --------------------------------------------------------------------------------------------


def query(url: str, sql: str) -> list[dict[str, Any]]:
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :], timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql)]
        finally:
            con.close()

    async def go() -> list[dict[str, Any]]:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(go())


def execute(url: str, sql: str) -> None:
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :], timeout=10)
        try:
            con.execute(sql)
            con.commit()
        finally:
            con.close()
        return

    async def go() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def js(value: Any) -> Any:
    """A JSON column: text on SQLite (and from asyncpg without a codec)."""
    return json.loads(value) if isinstance(value, str) else value


def ts(value: Any) -> dt.datetime | None:
    """A timestamp column as an aware UTC datetime (SQLite stores naive UTC text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def scalar(url: str, sql: str) -> Any:
    rows = query(url, sql)
    return next(iter(rows[0].values())) if rows else None


# --------------------------------------------------------------------------------------------
# a workspace: a directory, a configuration file, a database
# --------------------------------------------------------------------------------------------


FAST_RETRY = '[retry]\nbase_delay = "1h"\nmax_delay = "2h"\n'


@dataclass
class Workspace:
    dir: Path
    db_url: str
    config: Path
    env: dict[str, str] | None = None  # extra environment for every command

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
        full = {**(self.env or {}), **(env or {})}
        return tasksync(
            "--config", str(self.config), *args, cwd=self.dir, env=full, timeout=timeout
        )

    def ok(self, *args: str, env: dict[str, str] | None = None):
        return ok(self.run(*args, env=env))

    def q(self, sql: str) -> list[dict[str, Any]]:
        return query(self.db_url, sql)

    def x(self, sql: str) -> None:
        execute(self.db_url, sql)

    def task(self, system: str, task_id: str) -> dict[str, Any]:
        rows = self.q(f"SELECT * FROM tasks WHERE system='{system}' AND task_id='{task_id}'")
        assert len(rows) == 1, rows
        return rows[0]

    def events(self, system: str, task_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        extra = f" AND kind='{kind}'" if kind else ""
        return self.q(
            f"SELECT * FROM task_events WHERE system='{system}' AND task_id='{task_id}'{extra} "
            "ORDER BY id"
        )

    def action(self, action_id: int | str) -> dict[str, Any]:
        rows = self.q(f"SELECT * FROM actions WHERE id={int(action_id)}")
        assert len(rows) == 1, rows
        return rows[0]


def make_workspace(tmp_path: Path, db_url: str, body: str, worker: str = "") -> Workspace:
    config = tmp_path / "tasksync.toml"
    text = f'[database]\nurl = "{db_url}"\n\n[worker]\nconcurrency = 8\n{worker}\n{body}'
    config.write_text(text)
    config.chmod(0o600)
    return Workspace(tmp_path, db_url, config)


# --------------------------------------------------------------------------------------------
# the in-process sandbox, served from a thread so that tests can block on subprocesses
# --------------------------------------------------------------------------------------------


class ThreadedSandbox:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.sb: Any = None
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _main(self) -> None:
        from worker.sandbox import Sandbox

        async def body() -> None:
            self._done = asyncio.Event()
            try:
                async with Sandbox(**self.kwargs) as sb:
                    self.sb = sb
                    self._ready.set()
                    await self._done.wait()
            except BaseException as exc:  # pragma: no cover
                self._error = exc
                self._ready.set()

        self.loop.run_until_complete(body())
        self.loop.close()

    def __enter__(self) -> ThreadedSandbox:
        self._thread.start()
        assert self._ready.wait(15), "sandbox did not start"
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._done is not None
        self.loop.call_soon_threadsafe(self._done.set)
        self._thread.join(15)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a synchronous sandbox method on its own loop thread."""

        async def run() -> Any:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


def sim_workspace(
    tmp_path: Path, sim: ContractSim, db_url: str, worker: str = "", extra: str = FAST_RETRY
) -> Workspace:
    return make_workspace(tmp_path, db_url, extra + "\n" + sim.config_toml(), worker)


AICC_IDS = [
    "ccqG0000014iXvGKONQO",
    "ccqG0000014iXvGKONQ1",
    "ccqG0000014iXvGKONQ2",
    "ccqG0000014iXvGKONQ3",
]


def seed_sim(sim: ContractSim) -> None:
    """One task per documented status, plus one unknown status, in every system."""
    with sim.lock:
        for task_id, status in zip(
            AICC_IDS, ["Pending", "Processing", "Completed", "Reopened"], strict=True
        ):
            sim.aicc[task_id] = aicc_task(task_id, status, title=f"aicc {status}")
        for status in ["waiting", "finished", "canceled", "archived"]:
            sim.secmaster[f"sm-{status}"] = secmaster_task(f"sm-{status}", status, f"sm {status}")
        for status in [0, 1, 2, 3, 7]:
            sim.koodrive[f"kd-{status}"] = koodrive_task(f"kd-{status}", status)
