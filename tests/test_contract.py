"""Black-box contract suite: the real `tasksync` command against /work/shared/spec/interface.md.

Every check runs `python -m worker ...` in a subprocess, against either our own independent
simulator (tests/contract_sim.py, written from upstream.md only) or the in-process sandbox, and
reads the result back through the documented tables with plain SQL. Nothing here imports the
product except `worker.sandbox.Sandbox` (a simulator) — the code is a black box.

Deviations from the contract are pinned as `xfail(strict=True, reason="BUG: ...")` tests: they
fail while the bug is there and turn the suite red (XPASS) the day it is fixed, so the marker is
removed and the test stays as a regression test (section 8).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Database
from tests.contract_sim import (
    AICC_PREFIX,
    CREATOR_ID,
    KOODRIVE_TOKEN,
    SECMASTER_PREFIX,
    SECMASTER_TOKEN,
    Canned,
    ContractSim,
    aicc_task,
    koodrive_task,
    secmaster_task,
)

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
    """The real command; no TASKSYNC_* from the outer environment leaks in. Never a traceback."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TASKSYNC_")
        and k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET")
    }
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
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


@pytest.fixture
def sim() -> Iterator[ContractSim]:
    s = ContractSim().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'contract.db'}"


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


# ============================================================================================
# 1. bad usage: exit 2, one line on stderr naming what is wrong, never a traceback
# ============================================================================================


def test_bad_usage_exits_2_with_one_line_naming_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "tasksync.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "u.db"}"\n')
    long = {"title": "t" * 129, "description": "d" * 20001, "attachment": "a" * 256}
    process = ["enqueue", "aicc", "ccqG0000014iXvGKONQO", "process"]
    cases: list[tuple[list[str], list[str]]] = [
        # (argv, words the one stderr line must contain — case-insensitive)
        (["enqueue", "nosuch", "t1", "comment", "--comment", "x"], ["nosuch"]),
        (["enqueue", "secmaster", "t1", "nosuch"], ["nosuch"]),
        (
            ["enqueue", "secmaster", "t1", "comment", "--comment", "x", "--nosuch", "1"],
            ["--nosuch"],
        ),
        (["enqueue", "secmaster", "t1", "comment"], ["comment"]),
        (["enqueue", "secmaster", "t1", "delete-comment"], ["comment"]),
        (["enqueue", "secmaster", "t1", "add-attachment"], ["attachment"]),
        ([*process, "--description", "d"], ["title"]),
        ([*process, "--title", "t"], ["description"]),
        ([*process, "--title", long["title"], "--description", "d"], ["title"]),
        ([*process, "--title", "t", "--description", long["description"]], ["description"]),
        (
            [*process, "--title", "t", "--description", "d", "--attachment", long["attachment"]],
            ["attachment"],
        ),
        (["enqueue", "koodrive", "1534087020903704704", "comment", "--comment", "x"], ["koodrive"]),
        (["track", "nosuch", "x"], ["nosuch"]),
        (["sync", "nosuch"], ["nosuch"]),
        (["sync", "--nosuch"], ["--nosuch"]),
        (["discover", "nosuch"], ["nosuch"]),
        (["show", "nosuch", "x"], ["nosuch"]),
        (["actions", "--status", "nosuch"], ["nosuch"]),
        (["nosuch"], ["nosuch"]),
        (["cancel", "abc"], ["abc"]),
    ]

    def check(argv: list[str], words: list[str]) -> str | None:
        r = tasksync("--config", str(config), *argv, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        problem = None
        if r.returncode != 2:
            problem = f"exit {r.returncode}"
        elif len(lines) != 1:
            problem = f"{len(lines)} stderr lines"
        elif not all(w.lower() in lines[0].lower() for w in words):
            problem = f"message does not name {words}"
        elif r.stdout.strip():
            problem = "printed on stdout"
        return None if problem is None else f"{argv[:5]}: {problem}: {r.stderr.strip()[:200]!r}"

    problems = [p for p in parallel([lambda a=a, w=w: check(a, w) for a, w in cases]) if p]
    assert not problems, "\n".join(problems)
    # nothing was queued by any refused enqueue
    if (tmp_path / "u.db").exists():
        assert (
            query(f"sqlite:///{tmp_path / 'u.db'}", "SELECT count(*) AS n FROM actions")[0]["n"]
            == 0
        )


def test_field_limits_are_inclusive_and_defaults_apply(tmp_path: Path) -> None:
    """≤128 / ≤20000 / ≤255 accept the limit itself; --type defaults to the literal `Iternal`;
    --creator-id defaults to the configured creator_id; enqueue prints the id alone."""
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ws = make_workspace(
        tmp_path,
        db,
        '[systems.aicc]\nbase_url = "https://aicc.example.com"\nclient_id = "c"\n'
        'client_secret = "s"\ncreator_id = "10gg00000148QvgpaLAm"\n',
    )
    first = ws.ok(
        "enqueue",
        "aicc",
        "ccqG0000014iXvGKONQO",
        "process",
        "--title",
        "t" * 128,
        "--description",
        "d" * 20000,
        "--attachment",
        "a" * 255,
    )
    assert first.stdout.strip().isdigit() and first.stdout == first.stdout.strip() + "\n"
    second = ws.ok(
        "enqueue",
        "aicc",
        "ccqG0000014iXvGKONQO",
        "process",
        "--title",
        "t2",
        "--description",
        "d2",
        "--type",
        "Other",
        "--creator-id",
        "10gg0000000000000001",
    )
    params = {r["id"]: js(r["params"]) for r in ws.q("SELECT id, params FROM actions ORDER BY id")}
    a, b = params[int(first.stdout)], params[int(second.stdout)]
    assert a["title"] == "t" * 128 and len(a["description"]) == 20000
    assert a["attachment"] == "a" * 255
    assert a["type"] == "Iternal"
    # the default creator id is either stored now or resolved at apply time; when stored it must
    # be the configured one
    assert a.get("creator_id", CREATOR_ID) == CREATOR_ID
    assert b["type"] == "Other" and b["creator_id"] == "10gg0000000000000001"


# Regression (found by this suite, fixed in 07e829d): `enqueue aicc ... process --type ''` is
#  queued with an empty processInfo.type (a mandatory upstream field) instead of exit 2
def test_empty_type_is_refused(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, f"sqlite:///{tmp_path / 'e.db'}", "")
    r = ws.run(
        "enqueue",
        "aicc",
        "ccqG0000014iXvGKONQO",
        "process",
        "--title",
        "t",
        "--description",
        "d",
        "--type",
        "",
    )
    assert r.returncode == 2, r.stdout


# ============================================================================================
# 2. bad configuration: exit 78 naming the key
# ============================================================================================


AICC_OK = 'base_url = "https://aicc.example.com"\nclient_id = "c"\nclient_secret = "s"\n'
SM_BASE = 'base_url = "https://sm.example.com"\nproject_id = "p"\nworkspace_id = "w"\n'
SM_NO_PROJECT = 'base_url = "https://sm.example.com"\nworkspace_id = "w"\n'


def test_bad_configuration_exits_78_naming_the_key(tmp_path: Path) -> None:
    cases: list[tuple[str, dict[str, str], list[str]]] = [
        # (file body, environment, words the message must contain)
        ("[worker]\nconcurency = 3\n", {}, ["worker.concurency"]),
        ("", {"TASKSYNC_WORKER__CONCURENCY": "3"}, ["concurency", "TASKSYNC_WORKER__CONCURENCY"]),
        (
            '[systems.aicc]\nbase_url = "https://a.example"\nclient_id = "c"\n',
            {},
            ["client_secret"],
        ),
        ('[systems.aicc]\nclient_id = "c"\nclient_secret = "s"\n', {}, ["base_url"]),
        ("[systems.secmaster]\n" + SM_NO_PROJECT + 'token = "t"\n', {}, ["project_id"]),
        (f'[systems.secmaster]\n{SM_BASE}ak = "a"\nsk = "s"\ntoken = "t"\n', {}, ["secmaster"]),
        (
            '[systems.koodrive]\nbase_url = "https://k.example"\ntoken = "t"\napp_id = "a"\n'
            'app_secret = "s"\nuser_id = "u"\n',
            {},
            ["koodrive"],
        ),
        (
            '[systems.koodrive]\nbase_url = "http://koodrive.example.com"\ntoken = "t"\n',
            {},
            ["base_url"],
        ),
        ("[systems.aicc]\n" + AICC_OK + 'colour = "blue"\n', {}, ["colour"]),
        ("[nosuch]\nx = 1\n", {}, ["nosuch"]),
        ('[worker]\npoll_interval = "5 minutes"\n', {}, ["poll_interval"]),
        ('[worker]\nsync_schedule = "*/5 * * *"\n', {}, ["sync_schedule"]),
        ('[worker]\ndiscover_schedule = "often"\n', {}, ["discover_schedule"]),
        ('[retry]\nmax_attempts = "many"\n', {}, ["max_attempts"]),
        ("", {"TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL": "http://10.0.0.1"}, ["base_url"]),
        ("", {"TASKSYNC_SYSTEMS__AICC__BASE_URL": "https://a.example"}, ["client_id"]),
    ]

    def check(i: int, body: str, env: dict[str, str], words: list[str]) -> str | None:
        d = tmp_path / f"c{i}"
        d.mkdir()
        cfg = d / "tasksync.toml"
        cfg.write_text(f'[database]\nurl = "sqlite:///{d / "x.db"}"\n' + body)
        cfg.chmod(0o600)
        r = tasksync("--config", str(cfg), "status", cwd=d, env=env)
        line = r.stderr.strip()
        if r.returncode != 78:
            return f"case {i} {words}: exit {r.returncode}: {line[:200]!r}"
        if not all(w.lower() in line.lower() for w in words):
            return f"case {i}: message does not name {words}: {line[:300]!r}"
        return None

    problems = [
        p for p in parallel([lambda i=i, c=c: check(i, *c) for i, c in enumerate(cases)]) if p
    ]
    assert not problems, "\n".join(problems)


def test_loopback_http_is_allowed(tmp_path: Path) -> None:
    def check(host: str) -> subprocess.CompletedProcess[str]:
        d = tmp_path / host.strip("[]").replace(":", "_")
        d.mkdir()
        cfg = d / "tasksync.toml"
        cfg.write_text(
            f'[database]\nurl = "sqlite:///{d / "x.db"}"\n'
            f'[systems.koodrive]\nbase_url = "http://{host}:8080"\ntoken = "t"\n'
        )
        cfg.chmod(0o600)
        return tasksync("--config", str(cfg), "status", cwd=d)

    # 127.0.0.1 is what every simulator test uses
    for r in parallel([lambda h=h: check(h) for h in ("localhost", "[::1]")]):
        ok(r)


# ============================================================================================
# 3. the tables, against an independent simulator, on both databases
# ============================================================================================

EXPECTED_STATE = {
    ("aicc", "Pending"): "open",
    ("aicc", "Processing"): "in_progress",
    ("aicc", "Completed"): "done",
    ("aicc", "Reopened"): "unknown",
    ("secmaster", "waiting"): "open",
    ("secmaster", "finished"): "done",
    ("secmaster", "canceled"): "canceled",
    ("secmaster", "archived"): "unknown",
    ("koodrive", "0"): "open",
    ("koodrive", "1"): "in_progress",
    ("koodrive", "2"): "done",
    ("koodrive", "3"): "failed",
    ("koodrive", "7"): "unknown",
}


@pytest.fixture
def pg_database(_templates: dict[str, str]) -> Iterator[Database | None]:
    """A clean, migrated PostgreSQL database like conftest's, or None without a server."""
    from tests import conftest

    if not conftest.PG_URL:
        if conftest.IN_CI:
            pytest.fail("CI=true but TASKSYNC_TEST_POSTGRES_URL is not set")
        yield None
        return
    name = f"tasksync_contract_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    conftest._psql_admin(f"CREATE DATABASE {name} TEMPLATE {_templates['postgres']}")
    try:
        yield Database("postgres", conftest._pg_url_for(name))
    finally:
        conftest._psql_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_tables_snapshots_and_history(tmp_path: Path, pg_database: Database | None) -> None:
    """The whole history flow on SQLite and PostgreSQL at once (two simulators, two threads)."""
    flows = [("sqlite", f"sqlite:///{tmp_path / 'sqlite' / 'h.db'}")]
    if pg_database is not None:
        flows.append(("postgres", pg_database.url))

    def flow(kind: str, url: str) -> None:
        d = tmp_path / kind
        d.mkdir()
        sim = ContractSim().start()
        try:
            _tables_flow(Database(kind, url), d, sim)
        finally:
            sim.stop()

    parallel([lambda f=f: flow(*f) for f in flows])
    if pg_database is None:
        pytest.skip("the PostgreSQL half needs TASKSYNC_TEST_POSTGRES_URL (the SQLite half passed)")


def _tables_flow(database: Database, tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, database.url)
    ws.ok("migrate")
    if database.kind == "postgres":
        ws.ok("migrate")  # safe to repeat (SQLite: test_sql_queued_actions migrates a used file)
    # discover with no SYSTEM: every configured system with a list endpoint (not KooDrive)
    ws.ok("discover", "--quiet")
    kd_ids = sorted(sim.koodrive)
    ws.ok("track", "koodrive", *kd_ids)
    if database.kind == "sqlite":
        ws.ok("track", "koodrive", *kd_ids)  # idempotent
    tracked = ws.q("SELECT system, task_id, tracked FROM tasks ORDER BY system, task_id")
    assert sorted((r["system"], r["task_id"]) for r in tracked) == sorted(
        [("aicc", i) for i in sim.aicc]
        + [("secmaster", i) for i in sim.secmaster]
        + [("koodrive", i) for i in kd_ids]
    )
    assert all(r["tracked"] in (True, 1) for r in tracked)

    before = now()
    r = ws.ok("sync", "--quiet")
    assert r.stdout.strip() == "", "--quiet prints nothing but errors"
    after = now()

    # -- tasks: status as text, state normalised per upstream.md, title, timestamps UTC
    rows = {(r["system"], r["task_id"]): r for r in ws.q("SELECT * FROM tasks")}
    for (system, _task_id), row in rows.items():
        assert row["last_error"] is None and row["consecutive_failures"] == 0, row
        status = row["status"]
        assert isinstance(status, str), row
        assert EXPECTED_STATE[(system, status)] == row["state"], row
        assert row["content_hash"]
        first_seen, polled = ts(row["first_seen_at"]), ts(row["last_polled_at"])
        assert first_seen is not None and polled is not None
        assert before - dt.timedelta(seconds=60) <= first_seen <= after, row
        assert before - dt.timedelta(seconds=2) <= polled <= after + dt.timedelta(seconds=2), row
        assert ts(row["next_poll_at"]) > after, "a polled task is not due again at once"
    assert rows[("aicc", AICC_IDS[0])]["title"] == "aicc Pending"
    assert rows[("secmaster", "sm-waiting")]["title"] == "sm waiting"
    assert rows[("koodrive", "kd-3")]["title"] == "contract transfer"

    # -- task_snapshots: one each; payload = AICC `result`, SecMaster `data`, KooDrive body
    snaps = ws.q("SELECT * FROM task_snapshots ORDER BY id")
    assert len(snaps) == len(rows)
    for s in snaps:
        key = (s["system"], s["task_id"])
        expected = {"aicc": sim.aicc, "secmaster": sim.secmaster, "koodrive": sim.koodrive}[
            s["system"]
        ][s["task_id"]]
        assert js(s["payload"]) == expected, key
        assert s["status"] == rows[key]["status"] and s["state"] == rows[key]["state"]
        assert s["content_hash"] == rows[key]["content_hash"]
        assert ts(s["fetched_at"]) is not None

    # -- first observation: no status_changed event
    assert ws.q("SELECT * FROM task_events WHERE kind = 'status_changed'") == []

    # -- sync_runs: one row for the cycle with its counts
    runs = ws.q("SELECT * FROM sync_runs ORDER BY id")
    sync_runs = [r for r in runs if r.get("kind", "sync") == "sync"]
    assert len(sync_runs) == 1
    assert sync_runs[0]["polled"] == len(rows) and sync_runs[0]["failed"] == 0
    assert sync_runs[0]["worker"] and ts(sync_runs[0]["finished_at"]) is not None

    # -- upstream changes
    a0 = AICC_IDS[0]
    same = {
        "creatorId": "u2",
        "creatorName": "u2",
        "description": "same words",
        "relatedId": None,
        "title": "same",
        "type": "StatusUpdate",
    }
    with sim.lock:
        sim.aicc[a0]["taskInfo"]["status"] = "Processing"
        sim.aicc[a0]["taskTrace"] += [dict(same), dict(same)]  # no ids: position + content
        sm = sim.secmaster["sm-waiting"]
        sm["comments"].append(
            {
                "id": "c-1",
                "message": "hello",
                "user_id": "u",
                "user_name": "n",
                "time": 1755586422424,
            }
        )
        sm["attachment_id_list"].append("att-1")
        sim.koodrive["kd-1"]["status"] = 3
        sim.koodrive["kd-1"]["resultCode"] = "18000205"
    ws.ok("sync", "--all", "--quiet")

    ev = ws.events("aicc", a0)
    status_changes = [e for e in ev if e["kind"] == "status_changed"]
    assert len(status_changes) == 1
    traces = [js(e["data"]) for e in ev if e["kind"] == "trace"]
    assert sum(1 for t in traces if t.get("title") == "same") == 2, traces
    assert {e["system"] for e in ev} == {"aicc"} and {e["task_id"] for e in ev} == {a0}
    assert all(ts(e["observed_at"]) is not None for e in ev)
    smev = [e["kind"] for e in ws.events("secmaster", "sm-waiting")]
    assert sorted(smev) == ["attachment_added", "comment_added"], smev
    kdev = ws.events("koodrive", "kd-1")
    assert [e["kind"] for e in kdev] == ["status_changed"]
    assert ws.task("aicc", a0)["state"] == "in_progress"
    assert ws.task("koodrive", "kd-1")["state"] == "failed"
    # one snapshot per distinct content
    counts = {
        (r["system"], r["task_id"]): r["n"]
        for r in ws.q(
            "SELECT system, task_id, count(*) AS n FROM task_snapshots GROUP BY system, task_id"
        )
    }
    assert counts[("aicc", a0)] == 2 and counts[("secmaster", "sm-waiting")] == 2
    assert counts[("koodrive", "kd-1")] == 2 and counts[("aicc", AICC_IDS[1])] == 1

    # -- removals and a status change on SecMaster
    with sim.lock:
        sm = sim.secmaster["sm-waiting"]
        sm["comments"] = []
        sm["attachment_id_list"] = []
        sm["status"] = "canceled"
    ws.ok("sync", "--all", "--quiet")
    n_before = ws.q("SELECT count(*) AS n FROM task_events")[0]["n"]
    s_before = ws.q("SELECT count(*) AS n FROM task_snapshots")[0]["n"]
    ws.ok("sync", "--all", "--quiet")  # a repeated cycle adds nothing
    assert ws.q("SELECT count(*) AS n FROM task_events")[0]["n"] == n_before
    assert ws.q("SELECT count(*) AS n FROM task_snapshots")[0]["n"] == s_before
    smev = sorted(e["kind"] for e in ws.events("secmaster", "sm-waiting"))
    assert smev == [
        "attachment_added",
        "attachment_removed",
        "comment_added",
        "comment_removed",
        "status_changed",
    ], smev
    change = js(ws.events("secmaster", "sm-waiting", "status_changed")[0]["data"])
    assert "waiting" in json.dumps(change) and "canceled" in json.dumps(change)
    assert ws.task("secmaster", "sm-waiting")["state"] == "canceled"
    # sync_runs: one per cycle (plus whatever discover records), counts per cycle
    sync_runs = [
        r for r in ws.q("SELECT * FROM sync_runs ORDER BY id") if r.get("kind", "sync") == "sync"
    ]
    assert len(sync_runs) == 4
    assert [r["polled"] for r in sync_runs] == [len(rows)] * 4
    assert [r["changed"] for r in sync_runs][1:] == [3, 1, 0]

    # -- untrack keeps history and stops polling; show still works
    ws.ok("untrack", "secmaster", "sm-waiting")
    if database.kind == "sqlite":
        ws.ok("untrack", "secmaster", "sm-waiting")  # idempotent
    assert ws.task("secmaster", "sm-waiting")["tracked"] in (False, 0)
    n_events = len(ws.events("secmaster", "sm-waiting"))
    seen = len(sim.requests("GET", "/soc/tasks/sm-waiting"))
    ws.ok("sync", "--all", "--quiet")
    assert len(sim.requests("GET", "/soc/tasks/sm-waiting")) == seen
    assert len(ws.events("secmaster", "sm-waiting")) == n_events
    shown = json.loads(ws.ok("show", "secmaster", "sm-waiting", "--json").stdout)
    assert isinstance(shown, dict)
    assert "comment_removed" in json.dumps(shown)


def test_json_columns_and_utc_timestamps_on_postgres(tmp_path: Path, database: Database) -> None:
    """JSON columns are JSONB on PostgreSQL; every table carries system and task_id."""
    if database.kind != "postgres":
        cols = {
            t: {r["name"] for r in query(database.url, f"PRAGMA table_info({t})")}
            for t in (
                "tasks",
                "task_snapshots",
                "task_events",
                "actions",
                "action_attempts",
                "sync_runs",
            )
        }
    else:
        rows = query(
            database.url,
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'",
        )
        cols = {}
        for r in rows:
            cols.setdefault(r["table_name"], set()).add(r["column_name"])
        types = {(r["table_name"], r["column_name"]): r["data_type"] for r in rows}
        for key in [
            ("task_snapshots", "payload"),
            ("task_events", "data"),
            ("actions", "params"),
            ("actions", "result"),
        ]:
            assert types[key] == "jsonb", (key, types[key])
    required = {
        "tasks": "system task_id tracked status state title content_hash first_seen_at "
        "last_polled_at last_changed_at next_poll_at last_error consecutive_failures",
        "task_snapshots": "id system task_id fetched_at content_hash status state payload",
        "task_events": "id system task_id kind occurred_at observed_at data",
        "actions": "id system task_id kind params status attempts max_attempts next_attempt_at "
        "idempotency_key last_error result created_at updated_at finished_at",
        "action_attempts": "id action_id started_at finished_at outcome http_status error worker",
        "sync_runs": "id worker started_at finished_at polled changed failed",
    }
    for table, names in required.items():
        missing = set(names.split()) - cols[table]
        assert not missing, (table, missing)


# ============================================================================================
# 4. actions: what goes on the wire, idempotency keys, order, effects, SQL-queued rows
# ============================================================================================


def test_every_action_reaches_the_wire_as_documented(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'a.db'}")
    a0, a1 = AICC_IDS[0], AICC_IDS[1]
    with sim.lock:
        sim.secmaster["sm-waiting"]["comments"].append(
            {"id": "old-comment", "message": "old", "user_id": "u", "user_name": "n", "time": 1}
        )
        sim.secmaster["sm-waiting"]["attachment_id_list"].append("old-att")
    groups = [
        # per task, queued in order (the order of queueing is the order of applying)
        [
            ["secmaster", "sm-waiting", "comment", "--comment", "first"],
            ["secmaster", "sm-waiting", "delete-comment", "--comment-id", "old-comment"],
            ["secmaster", "sm-waiting", "add-attachment", "--attachment-id", "new-att"],
            ["secmaster", "sm-waiting", "delete-attachment", "--attachment-id", "old-att"],
            ["secmaster", "sm-waiting", "comment", "--comment", "last"],
            ["secmaster", "sm-waiting", "terminate"],
        ],
        [
            ["aicc", a0, "process", "--title", "T1", "--description", "D1"],
            [
                "aicc",
                a0,
                "process",
                "--title",
                "T2",
                "--description",
                "D2",
                "--type",
                "Other",
                "--attachment",
                "report.pdf",
                "--creator-id",
                "10gg0000000000000001",
            ],
            ["secmaster", "sm-finished", "continue"],
        ],
        [  # idempotency key: the second enqueue prints the first id and creates nothing
            ["aicc", a1, "process", "--title", "K", "--description", "K", "--key", "ticket-42"],
            ["aicc", a1, "process", "--title", "other", "--description", "x", "--key", "ticket-42"],
        ],
    ]

    def queue(group: list[list[str]]) -> list[str]:
        return [ws.ok("enqueue", *argv).stdout for argv in group]

    outs = parallel([lambda g=g: queue(g) for g in groups])
    for out in [o for group in outs for o in group]:
        assert out.strip().isdigit() and out.endswith("\n") and out.count("\n") == 1, out
    ids = [int(o) for o in outs[0] + outs[1]]
    assert ids[:6] == sorted(ids[:6]) and ids[6:] == sorted(ids[6:])
    assert len(set(ids)) == len(ids)
    keyed, again = outs[2]
    assert keyed == again
    assert (
        ws.q("SELECT count(*) AS n FROM actions WHERE idempotency_key = 'ticket-42'")[0]["n"] == 1
    )
    # enqueue started tracking every task it named: they are polled at the next cycle
    tracked = {(r["system"], r["task_id"]) for r in ws.q("SELECT * FROM tasks WHERE tracked")}
    assert tracked == {
        ("aicc", a0),
        ("aicc", a1),
        ("secmaster", "sm-waiting"),
        ("secmaster", "sm-finished"),
    }
    ws.ok("sync", "--quiet")  # stores the pre-existing comment and attachment
    assert ws.action(keyed)["status"] == "pending"

    sim.seen.clear()
    r = ws.ok("apply")
    statuses = {r["id"]: r["status"] for r in ws.q("SELECT id, status FROM actions")}
    assert set(statuses.values()) == {"succeeded"}, (statuses, r.stderr)

    process = [s.body for s in sim.requests("POST", "/openapi/task/process")]
    by_title = {b["processInfo"]["title"]: b for b in process}
    assert by_title["T1"] == {
        "taskId": a0,
        "creatorId": CREATOR_ID,
        "processInfo": {"type": "Iternal", "title": "T1", "description": "D1"},
    }
    assert by_title["T2"] == {
        "taskId": a0,
        "creatorId": "10gg0000000000000001",
        "processInfo": {
            "type": "Other",
            "title": "T2",
            "description": "D2",
            "attachment": "report.pdf",
        },
    }
    assert [b["processInfo"]["title"] for b in process if b["taskId"] == a0] == ["T1", "T2"]
    puts = [s.body for s in sim.requests("PUT", "/soc/tasks/sm-waiting")]
    assert puts == [
        {"action": "ADD_COMMENT", "comment": "first"},
        {"action": "DELETE_COMMENT", "comment_id": "old-comment"},
        {"action": "ADD_ATTACHMENT", "attachment_id": "new-att"},
        {"action": "DELETE_ATTACHMENT", "attachment_id": "old-att"},
        {"action": "ADD_COMMENT", "comment": "last"},
        {"action": "TERMINATE"},
    ]
    assert [s.body for s in sim.requests("PUT", "/soc/tasks/sm-finished")] == [
        {"action": "CONTINUE"}
    ]
    # every attempt recorded
    attempts = ws.q("SELECT * FROM action_attempts ORDER BY id")
    assert len(attempts) == len(ids) + 1
    assert {a["outcome"] for a in attempts} == {"succeeded"}
    assert all(a["http_status"] == 200 and a["worker"] for a in attempts)
    done = ws.action(ids[0])
    assert done["attempts"] == 1 and ts(done["finished_at"]) is not None

    # the effect appears after the next (plain) sync: applied tasks are due again
    ws.ok("sync", "--quiet")
    kinds = [e["kind"] for e in ws.events("secmaster", "sm-waiting")]
    for kind in (
        "comment_added",
        "comment_removed",
        "attachment_added",
        "attachment_removed",
        "status_changed",
    ):
        assert kind in kinds, kinds
    assert ws.task("secmaster", "sm-waiting")["state"] == "canceled"
    assert ws.task("secmaster", "sm-finished")["status"] == "finished"
    titles = [js(e["data"]).get("title") for e in ws.events("aicc", a0, "trace")]
    assert titles[-2:] == ["T1", "T2"]

    # actions / show in JSON
    listed = json.loads(ws.ok("actions", "--json").stdout)
    assert {a["id"] for a in listed} == set(ids) | {int(keyed)}
    # the human forms, the global --log-level option, and an unknown task (exit 1)
    status, show, actions, unknown = parallel(
        [
            lambda: ws.run("--log-level", "warning", "status"),
            lambda: ws.run("show", "aicc", a0),
            lambda: ws.run("actions", "--status", "succeeded"),
            lambda: ws.run("show", "aicc", "ccqG00000000nosuch00"),
        ]
    )
    for r in (status, show, actions):
        assert r.returncode == 0 and r.stdout.strip(), (r.args, r.stderr)
    assert "T2" in show.stdout and "sm-waiting" in actions.stdout
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1


def test_sql_queued_actions_get_defaults_and_invalid_rows_fail(
    database: Database, tmp_path: Path, sim: ContractSim
) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        database.url,
        extra='[retry]\nmax_attempts = 1\nbase_delay = "1h"\nmax_delay = "2h"\n',
    )
    ws.ok("migrate")
    t0 = now()
    rows = [
        ("secmaster", "sm-waiting", "comment", '{"comment": "checked"}'),
        ("aicc", AICC_IDS[0], "process", '{"title": "sql", "description": "queued by SQL"}'),
        ("secmaster", "sm-waiting", "explode", "{}"),
        ("secmaster", "sm-finished", "comment", "{}"),
        ("koodrive", "kd-0", "comment", '{"comment": "x"}'),
        ("nosuch", "x", "comment", '{"comment": "x"}'),
        ("aicc", AICC_IDS[1], "process", '{"title": "' + "t" * 129 + '", "description": "d"}'),
        ("secmaster", "sm-canceled", "comment", '{"comment": 5}'),
    ]
    for system, task_id, kind, params in rows:
        ws.x(
            "INSERT INTO actions (system, task_id, kind, params) "
            f"VALUES ('{system}', '{task_id}', '{kind}', '{params}')"
        )
    fresh = ws.q("SELECT * FROM actions ORDER BY id")
    for a in fresh:
        assert a["status"] == "pending" and a["attempts"] == 0 and a["max_attempts"] is None, a
        assert abs((ts(a["next_attempt_at"]) - t0).total_seconds()) < 120, a
        assert ts(a["created_at"]) is not None and ts(a["updated_at"]) is not None
        assert a["idempotency_key"] is None and a["finished_at"] is None
    # a SQL row with max_attempts NULL uses retry.max_attempts (= 1 here)
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-waiting",
        Canned(503, {"error_code": "APIGW.0308", "error_msg": "busy", "request_id": "r"}),
    )
    r = ws.ok("apply")
    got = {(a["system"], a["task_id"], a["kind"]): a for a in ws.q("SELECT * FROM actions")}
    ok_row = got[("aicc", AICC_IDS[0], "process")]
    assert ok_row["status"] == "succeeded", ok_row
    retried = got[("secmaster", "sm-waiting", "comment")]
    assert retried["status"] == "failed" and retried["attempts"] == 1, retried
    assert retried["last_error"]
    for key in [
        ("secmaster", "sm-waiting", "explode"),
        ("secmaster", "sm-finished", "comment"),
        ("koodrive", "kd-0", "comment"),
        ("nosuch", "x", "comment"),
        ("aicc", AICC_IDS[1], "process"),
        ("secmaster", "sm-canceled", "comment"),
    ]:
        a = got[key]
        assert a["status"] == "failed", (key, a)
        assert a["last_error"], (key, a)
    assert "explode" in got[("secmaster", "sm-waiting", "explode")]["last_error"]
    assert "koodrive" in got[("koodrive", "kd-0", "comment")]["last_error"].lower()
    # nothing invalid reached the upstream
    assert [s.body for s in sim.requests("PUT")] == [
        {"action": "ADD_COMMENT", "comment": "checked"}
    ]
    assert "Traceback" not in r.stderr


# ============================================================================================
# 5. retries, permanent failures, cancel and retry
# ============================================================================================

GATEWAY_BUSY = {"error_code": "APIGW.0308", "error_msg": "throttled", "request_id": "r"}


def test_retryable_and_permanent_outcomes(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        f"sqlite:///{tmp_path / 'r.db'}",
        extra='[retry]\nmax_attempts = 5\nbase_delay = "10m"\nmax_delay = "1h"\n',
    )
    a0 = AICC_IDS[0]
    ws.ok("migrate")
    sim.push("POST " + AICC_PREFIX + "/process", Canned(503, {"resCode": "503", "resMsg": "busy"}))
    sim.push("PUT " + SECMASTER_PREFIX + "/sm-waiting", Canned(429, GATEWAY_BUSY))
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-finished",
        Canned(400, {"code": "SecMaster.20030001", "message": "bad parameter"}),
    )
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-archived",
        Canned(429, GATEWAY_BUSY, headers={"Retry-After": "300"}),
    )
    jobs = [  # queued by SQL (the CLI path is covered above); never synced: apply reads them once
        ("aicc", a0, "process", '{"title": "t", "description": "d"}'),
        ("secmaster", "sm-waiting", "comment", '{"comment": "throttled"}'),
        ("secmaster", "sm-finished", "comment", '{"comment": "refused"}'),
        ("secmaster", "sm-archived", "comment", '{"comment": "retry-after"}'),
        ("secmaster", "sm-archived", "comment", '{"comment": "queued behind"}'),
    ]
    for job in jobs:
        ws.x(
            "INSERT INTO actions (system, task_id, kind, params) VALUES ({})".format(
                ", ".join(f"'{v}'" for v in job)
            )
        )
    ids = [r["id"] for r in ws.q("SELECT id FROM actions ORDER BY id")]
    t0 = now()
    ws.ok("apply")
    busy, throttled, refused, later, behind = (ws.action(i) for i in ids)
    for a in (busy, throttled, later):
        assert a["status"] == "pending", a
        assert a["attempts"] == 1, a
        assert ts(a["next_attempt_at"]) > t0 + dt.timedelta(seconds=5), a
        assert a["last_error"], a
    assert refused["status"] == "failed" and refused["attempts"] == 1 and refused["last_error"]
    # Retry-After is honoured (300 s, below max_delay)
    wait = (ts(later["next_attempt_at"]) - t0).total_seconds()
    assert 280 <= wait <= 3700, wait
    # the action queued behind a pending one on the same task waits its turn
    assert behind["status"] == "pending" and behind["attempts"] == 0
    assert [s.body["comment"] for s in sim.requests("PUT", "/sm-archived")] == ["retry-after"]
    attempts = {a["action_id"]: a for a in ws.q("SELECT * FROM action_attempts")}
    assert attempts[ids[0]]["http_status"] == 503 and attempts[ids[0]]["outcome"] in (
        "retry",
        "unknown",
    )
    assert attempts[ids[1]]["http_status"] == 429 and attempts[ids[1]]["outcome"] == "retry"
    assert attempts[ids[2]]["http_status"] == 400 and attempts[ids[2]]["outcome"] == "failed"
    assert all(ts(a["started_at"]) and ts(a["finished_at"]) for a in attempts.values())

    # apply again: nothing is due, nothing is sent
    sent = len(sim.seen)
    ws.ok("apply")
    assert len([s for s in sim.seen[sent:] if s.method != "GET"]) == 0

    # cancel: only pending; retry: only failed, back in the queue
    ok(ws.run("cancel", str(ids[4])))
    assert ws.action(ids[4])["status"] == "canceled"
    for r in parallel(
        [
            lambda: ws.run("cancel", str(ids[4])),
            lambda: ws.run("cancel", str(ids[2])),
            lambda: ws.run("retry", str(ids[1])),
            lambda: ws.run("cancel", "999999"),
        ]
    ):
        assert r.returncode == 1, (r.args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    ok(ws.run("retry", str(ids[2])))
    requeued = ws.action(ids[2])
    assert requeued["status"] == "pending"
    ws.ok("apply")  # the simulator now accepts it
    assert ws.action(ids[2])["status"] == "succeeded"
    failed = json.loads(ws.ok("actions", "--status", "failed", "--json").stdout)
    assert failed == []


# Regression (found by this suite, fixed in 07e829d): a Retry-After longer than retry.max_delay is
#  cut down to max_delay: the action is retried before the server allows it
def test_retry_after_longer_than_max_delay_is_honoured(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        f"sqlite:///{tmp_path / 'ra.db'}",
        extra='[retry]\nbase_delay = "1s"\nmax_delay = "30s"\n',
    )
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-waiting",
        Canned(429, GATEWAY_BUSY, headers={"Retry-After": "600"}),
    )
    action = ws.ok("enqueue", "secmaster", "sm-waiting", "comment", "--comment", "x").stdout
    t0 = now()
    ws.ok("apply")
    a = ws.action(action)
    assert a["status"] == "pending"
    assert (ts(a["next_attempt_at"]) - t0).total_seconds() >= 590, a["next_attempt_at"]


# ============================================================================================
# 6. configuration: discovery order, environment, credentials, durations, defaults
# ============================================================================================


def _tracked(db: Path) -> list[str]:
    if not db.exists():
        return []
    return [r["task_id"] for r in query(f"sqlite:///{db}", "SELECT task_id FROM tasks")]


@pytest.mark.skipif(
    Path("/etc/tasksync/tasksync.toml").exists(),
    reason="a system-wide configuration exists on this host",
)
def test_configuration_discovery_order_and_database_defaults(tmp_path: Path) -> None:
    def cfg(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / name}.db"\n')
        return path

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "tasksync.toml").write_text(f'[database]\nurl = "sqlite:///{tmp_path / "cwdfile"}.db"\n')
    envfile, flagfile = cfg("envfile"), cfg("flagfile")
    bare, state, rel = tmp_path / "bare", tmp_path / "state", tmp_path / "rel"
    for d in (bare, state, rel):
        d.mkdir()
    (rel / "tasksync.toml").write_text('[database]\nurl = "sqlite:///relative.db"\n')
    statedir = tmp_path / "statedir"
    statedir.mkdir()

    runs = [
        lambda: tasksync("track", "aicc", "from-cwd", cwd=cwd),
        lambda: tasksync(
            "track", "aicc", "from-env", cwd=cwd, env={"TASKSYNC_CONFIG": str(envfile)}
        ),
        lambda: tasksync(
            "--config",
            str(flagfile),
            "track",
            "aicc",
            "from-flag",
            cwd=cwd,
            env={"TASKSYNC_CONFIG": str(envfile)},
        ),
        lambda: tasksync("track", "aicc", "default-db", cwd=bare),
        lambda: tasksync(
            "track", "aicc", "state-db", cwd=state, env={"STATE_DIRECTORY": str(statedir)}
        ),
        lambda: tasksync(
            "track", "aicc", "relative-db", cwd=rel, env={"STATE_DIRECTORY": str(statedir)}
        ),
        lambda: tasksync(
            "track",
            "aicc",
            "env-url",
            cwd=cwd,
            env={"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'envurl.db'}"},
        ),
    ]
    for r in parallel(runs):
        ok(r)
    assert _tracked(tmp_path / "cwdfile.db") == ["from-cwd"]
    assert _tracked(tmp_path / "envfile.db") == ["from-env"]
    assert _tracked(tmp_path / "flagfile.db") == ["from-flag"]
    assert _tracked(bare / "tasksync.db") == ["default-db"]  # SQLite tasksync.db in the cwd
    assert _tracked(statedir / "tasksync.db") == ["state-db"]  # ... or in $STATE_DIRECTORY
    assert _tracked(statedir / "relative.db") == ["relative-db"]
    assert _tracked(tmp_path / "envurl.db") == ["env-url"]  # environment wins over the file
    assert not (state / "tasksync.db").exists() and not (rel / "relative.db").exists()


def test_environment_and_credentials_directory(tmp_path: Path, sim: ContractSim) -> None:
    from tests.contract_sim import CLIENT_SECRET

    seed_sim(sim)
    base = sim.base_url

    def workspace(name: str, body: str) -> Workspace:
        d = tmp_path / name
        d.mkdir()
        return make_workspace(d, f"sqlite:///{d / 'x.db'}", FAST_RETRY + body)

    # 1. the file holds a wrong AICC secret; the nested environment variable wins
    wrong = workspace("wrong", sim.config_toml(("aicc",)).replace(CLIENT_SECRET, "wrong"))
    # 2. KooDrive enabled by environment variables alone (no section in the file)
    envonly = workspace("envonly", "")
    # 3. secrets from $CREDENTIALS_DIRECTORY (files may end in a newline, as `echo` writes them)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "aicc_client_secret").write_text(CLIENT_SECRET + "\n")
    (creds / "secmaster_token").write_text(SECMASTER_TOKEN + "\n")
    (creds / "koodrive_token").write_text(KOODRIVE_TOKEN)
    (creds / "database_url").write_text(f"sqlite:///{tmp_path / 'credsdb.db'}\n")
    stripped = "\n".join(
        line
        for line in sim.config_toml().splitlines()
        if not line.startswith(("client_secret", "token"))
    )
    (tmp_path / "creds").mkdir()
    credcfg = tmp_path / "creds" / "tasksync.toml"
    credcfg.write_text(FAST_RETRY + stripped + "\n")  # no [database]: database_url fills it
    credws = Workspace(tmp_path / "creds", f"sqlite:///{tmp_path / 'credsdb.db'}", credcfg)
    # 4. a credential fills a key of a configured system; it does not enable one
    notenabled = workspace("notenabled", sim.config_toml(("aicc",)))
    kd_only = tmp_path / "kd-credentials"
    kd_only.mkdir()
    (kd_only / "koodrive_token").write_text(KOODRIVE_TOKEN)

    env_creds = {"CREDENTIALS_DIRECTORY": str(creds)}
    koodrive_env = {
        "TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL": base,
        "TASKSYNC_SYSTEMS__KOODRIVE__TOKEN": KOODRIVE_TOKEN,
    }
    flows: list[tuple[Workspace, list[list[str]], dict[str, str]]] = [
        (
            wrong,
            [["track", "aicc", AICC_IDS[0]]],
            {"TASKSYNC_SYSTEMS__AICC__CLIENT_SECRET": CLIENT_SECRET},
        ),
        (envonly, [["track", "koodrive", "kd-2"]], koodrive_env),
        (
            credws,
            [
                ["track", "aicc", AICC_IDS[1]],
                ["track", "secmaster", "sm-waiting"],
                ["track", "koodrive", "kd-3"],
            ],
            env_creds,
        ),
        (notenabled, [["track", "koodrive", "kd-1"]], {"CREDENTIALS_DIRECTORY": str(kd_only)}),
    ]

    def flow(ws: Workspace, tracks: list[list[str]], env: dict[str, str]) -> None:
        for argv in tracks:
            ok(ws.run(*argv, env=env))
        ok(ws.run("sync", "--all", "--quiet", env=env))

    parallel([lambda f=f: flow(*f) for f in flows])
    assert wrong.task("aicc", AICC_IDS[0])["status"] == "Pending"
    assert envonly.task("koodrive", "kd-2")["state"] == "done"
    for system, task_id, status in [
        ("aicc", AICC_IDS[1], "Processing"),
        ("secmaster", "sm-waiting", "waiting"),
        ("koodrive", "kd-3", "3"),
    ]:
        row = credws.task(system, task_id)
        assert row["status"] == status and row["last_error"] is None, row
    # the koodrive_token credential did not enable KooDrive
    assert notenabled.task("koodrive", "kd-1")["status"] is None
    assert not [s for s in sim.requests("GET", "/koodrive/") if s.path.endswith("/kd-1")]


DURATIONS = [
    # (poll_interval, terminal_poll_interval, sync_schedule, expected seconds non-terminal, terminal)
    ("90s", "1h", "*/5 * * * *", 90, 3600),
    ("5m", "1h30m", "30s", 300, 5400),
    (45, 600, 90, 45, 600),
]


def test_durations_and_poll_intervals(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)

    def one(i: int, poll: Any, terminal: Any, schedule: Any) -> Workspace:
        d = tmp_path / f"d{i}"
        d.mkdir()
        fmt = lambda v: f'"{v}"' if isinstance(v, str) else str(v)  # noqa: E731
        ws = sim_workspace(
            d,
            sim,
            f"sqlite:///{d / 'x.db'}",
            worker=f"poll_interval = {fmt(poll)}\nterminal_poll_interval = {fmt(terminal)}\n"
            f"sync_schedule = {fmt(schedule)}\n",
        )
        ok(ws.run("track", "koodrive", "kd-1", "kd-2"))
        ok(ws.run("sync", "--quiet"))
        return ws

    spaces = parallel([lambda i=i, c=c: one(i, *c[:3]) for i, c in enumerate(DURATIONS)])
    for ws, (*_, open_s, terminal_s) in zip(spaces, DURATIONS, strict=True):
        for task_id, expected in (("kd-1", open_s), ("kd-2", terminal_s)):
            row = ws.task("koodrive", task_id)
            gap = (ts(row["next_poll_at"]) - ts(row["last_polled_at"])).total_seconds()
            assert abs(gap - expected) < 2, (ws.config.read_text(), task_id, gap)


def test_plain_sync_polls_only_due_tasks_and_all_polls_everything(
    tmp_path: Path, sim: ContractSim
) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path, sim, f"sqlite:///{tmp_path / 's.db'}", worker='poll_interval = "2s"\n'
    )
    ws.ok("track", "koodrive", *sorted(sim.koodrive))
    listed = ws.ok("discover", "aicc")  # only the systems named
    assert {r["system"] for r in ws.q("SELECT system FROM tasks")} == {"aicc", "koodrive"}
    n = len(sim.koodrive) + len(AICC_IDS)

    def details() -> int:
        return len(sim.requests("GET", "/koodrive/")) + len(sim.requests("GET", AICC_PREFIX))

    polled = ws.ok("sync")
    assert details() == n
    for out in (listed.stdout, polled.stdout):  # stdout is not a terminal: no progress bar
        assert out.strip() and "\r" not in out and "\x1b" not in out, repr(out)
    ws.ok("sync", "--quiet")  # nothing is due yet: nothing is fetched
    assert details() == n
    ws.ok("sync", "--all", "--quiet", "koodrive")  # --all: every tracked task of that system
    assert details() == n + len(sim.koodrive)
    ws.ok("sync", "--all", "--quiet")
    t_last = time.monotonic()
    assert details() == 2 * n + len(sim.koodrive)
    # once poll_interval has passed, the non-terminal tasks are due again (terminal ones not)
    time.sleep(max(0.0, 2.3 - (time.monotonic() - t_last)))
    before = details()
    ws.ok("sync", "--quiet")
    nonterminal = 6  # KooDrive 0, 1, 7 and AICC Pending, Processing, Reopened (unknown)
    assert details() - before == nonterminal
    runs = [
        r for r in ws.q("SELECT * FROM sync_runs ORDER BY id") if r.get("kind", "sync") == "sync"
    ]
    assert [r["polled"] for r in runs] == [n, 0, len(sim.koodrive), n, nonterminal]
    assert all(r["failed"] == 0 for r in runs)


# ============================================================================================
# 7. wire formats the documents allow, failures that cost one task only, exit statuses of sync
# ============================================================================================


def test_wire_variants_and_per_task_failures(tmp_path: Path) -> None:
    """`expires_in` as a number, KooDrive `code` as a string, an AICC 401 (refresh once), a
    not-found AICC task (non-"0" resCode with HTTP 200: shape unknown upstream), null lists,
    missing optional fields, an HTML page with 200: each costs at most its own task."""
    sim = ContractSim(expires_in=7200, koodrive_code="0").start()
    try:
        seed_sim(sim)
        with sim.lock:
            bare = aicc_task("ccqG00000000000bare0")
            del bare["taskTrace"], bare["taskInfo"]["status"]
            sim.aicc["ccqG00000000000bare0"] = bare
            nulls = secmaster_task("sm-nulls")
            nulls["comments"] = None
            nulls["attachment_id_list"] = None
            sim.secmaster["sm-nulls"] = nulls
        ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'w.db'}")
        ws.ok("track", "aicc", AICC_IDS[0], "ccqG00000000000bare0", "ccqG0000000000missing")
        ws.ok("track", "secmaster", "sm-waiting", "sm-nulls")
        ws.ok("track", "koodrive", "kd-0", "kd-2", "kd-html")
        sim.push(
            "GET " + AICC_PREFIX + "/" + AICC_IDS[0],
            Canned(401, {"resCode": "401", "resMsg": "token expired"}),
        )
        sim.push(
            "GET /koodrive/ose/v1/task/kd-html",
            Canned(200, "<html><body>maintenance</body></html>", content_type="text/html"),
        )
        r = ws.run("sync", "--quiet")
        assert r.returncode == 0, r.stderr  # the cycle ran: exit 0 even though tasks failed
        rows = {(t["system"], t["task_id"]): t for t in ws.q("SELECT * FROM tasks")}
        good = [
            ("aicc", AICC_IDS[0]),
            ("aicc", "ccqG00000000000bare0"),
            ("secmaster", "sm-waiting"),
            ("secmaster", "sm-nulls"),
            ("koodrive", "kd-0"),
            ("koodrive", "kd-2"),
        ]
        for key in good:
            assert rows[key]["last_error"] is None and rows[key]["consecutive_failures"] == 0, (
                key,
                rows[key]["last_error"],
            )
        assert rows[("aicc", AICC_IDS[0])]["status"] == "Pending"
        assert len(sim.requests("POST", "/oauth2/token")) == 2  # refreshed once after the 401
        assert rows[("aicc", "ccqG00000000000bare0")]["state"] == "unknown"
        assert rows[("koodrive", "kd-2")]["state"] == "done"
        for key in [("aicc", "ccqG0000000000missing"), ("koodrive", "kd-html")]:
            row = rows[key]
            assert row["last_error"] and row["consecutive_failures"] == 1, row
            assert key[1] in row["last_error"] or key[0] in row["last_error"].lower()
            assert ts(row["next_poll_at"]) > now(), "a failing task backs off"
        assert "task not exist" in rows[("aicc", "ccqG0000000000missing")]["last_error"]
        run = [x for x in ws.q("SELECT * FROM sync_runs") if x.get("kind", "sync") == "sync"][-1]
        assert (run["polled"], run["failed"]) == (8, 2)
        failing = json.loads(ws.ok("status", "--json").stdout)
        assert "ccqG0000000000missing" in json.dumps(failing)
        # a success after failures clears the error
        with sim.lock:
            sim.aicc["ccqG0000000000missing"] = aicc_task("ccqG0000000000missing")
        ws.ok("sync", "--all", "--quiet")
        row = ws.task("aicc", "ccqG0000000000missing")
        assert row["last_error"] is None and row["consecutive_failures"] == 0
        assert row["state"] == "open"
    finally:
        sim.stop()


def test_sync_exit_status_when_the_cycle_cannot_run(tmp_path: Path) -> None:
    closed_port = "postgresql://postgres@127.0.0.1:9/nowhere"
    down = tmp_path / "down.toml"  # an upstream that refuses connections: the cycle still runs
    down.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "d.db"}"\n'
        '[systems.koodrive]\nbase_url = "http://127.0.0.1:9"\ntoken = "t"\n'
    )
    down.chmod(0o600)
    ok(tasksync("--config", str(down), "track", "koodrive", "kd-1", cwd=tmp_path))
    runs = parallel(
        [
            lambda: tasksync("sync", cwd=tmp_path, env={"TASKSYNC_DATABASE__URL": closed_port}),
            lambda: tasksync("status", cwd=tmp_path, env={"TASKSYNC_DATABASE__URL": closed_port}),
            lambda: tasksync("sync", cwd=tmp_path, env={"TASKSYNC_WORKER__CONCURRENCY": "many"}),
            lambda: tasksync("--config", str(down), "sync", cwd=tmp_path),
        ]
    )
    no_db, no_db_status, bad_config, upstream_down = runs
    assert no_db.returncode == 1 and len(no_db.stderr.strip().splitlines()) == 1, no_db.stderr
    assert no_db_status.returncode == 1, no_db_status.stderr
    assert bad_config.returncode == 78 and "concurrency" in bad_config.stderr
    assert upstream_down.returncode == 0, upstream_down.stderr
    row = query(f"sqlite:///{tmp_path / 'd.db'}", "SELECT * FROM tasks")[0]
    assert row["last_error"] and row["consecutive_failures"] == 1
    sync = query(f"sqlite:///{tmp_path / 'd.db'}", "SELECT * FROM sync_runs")[-1]
    assert (sync["polled"], sync["failed"]) == (1, 1)


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_several_workers_on_postgres_split_syncs_and_actions(
    database: Database, tmp_path: Path, sim: ContractSim
) -> None:
    """Two `sync` at once fetch each due task once; two `apply` at once apply each action once,
    in queue order per task."""
    with sim.lock:
        for i in range(60):
            sim.koodrive[f"kd-{i:03d}"] = koodrive_task(f"kd-{i:03d}", i % 4)
        for i in range(15):
            sim.secmaster[f"sm-{i:03d}"] = secmaster_task(f"sm-{i:03d}")
    ws = sim_workspace(tmp_path, sim, database.url)
    ws.ok("track", "koodrive", *sorted(sim.koodrive))
    for r in parallel([lambda: ws.run("sync", "--quiet"), lambda: ws.run("sync", "--quiet")]):
        ok(r)
    fetched = [s.path for s in sim.requests("GET", "/koodrive/")]
    assert sorted(fetched) == sorted(set(fetched)) and len(fetched) == 60  # each task once
    runs = ws.q("SELECT polled FROM sync_runs")
    assert sum(r["polled"] for r in runs) == 60 and len(runs) == 2
    assert ws.q("SELECT count(*) AS n FROM task_snapshots")[0]["n"] == 60

    values = ", ".join(
        f"('secmaster', 'sm-{i:03d}', 'comment', '{{\"comment\": \"{n}\"}}')"
        for n in range(3)
        for i in range(15)
    )
    ws.x(f"INSERT INTO actions (system, task_id, kind, params) VALUES {values}")
    for r in parallel([lambda: ws.run("apply"), lambda: ws.run("apply")]):
        ok(r)
    statuses = {r["status"] for r in ws.q("SELECT status FROM actions")}
    assert statuses == {"succeeded"}, statuses
    assert len(sim.requests("PUT")) == 45  # each action once
    with sim.lock:
        for i in range(15):
            got = [c["message"] for c in sim.secmaster[f"sm-{i:03d}"]["comments"]]
            assert got == ["0", "1", "2"], (i, got)


# ============================================================================================
# 8. deviations this suite found (all fixed since: kept as regression tests)
# ============================================================================================


# Regression (found by this suite, fixed in 07e829d): enqueue on an untracked task does not start
#  tracking it again, so the effect of the applied action is never synced
def test_enqueue_starts_tracking_an_untracked_task(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'u.db'}")
    ws.ok("track", "secmaster", "sm-waiting")
    ws.ok("untrack", "secmaster", "sm-waiting")
    ws.ok("enqueue", "secmaster", "sm-waiting", "comment", "--comment", "after untrack")
    assert ws.task("secmaster", "sm-waiting")["tracked"] in (True, 1)
    ws.ok("apply")
    ws.ok("sync", "--quiet")  # "the task is made due so the next cycle stores the effect"
    assert ws.task("secmaster", "sm-waiting")["last_polled_at"] is not None
    assert ws.events("secmaster", "sm-waiting", "comment_added")


# Regression (found by this suite, fixed in 07e829d): a closed stdout (`tasksync actions | head
#  -0`) is reported as 'cannot reach the database: Broken pipe'
def test_closed_stdout_is_not_reported_as_a_database_failure(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    env["TASKSYNC_DATABASE__URL"] = f"sqlite:///{db}"
    ok(tasksync("enqueue", "secmaster", "t1", "comment", "--comment", "x", cwd=tmp_path, env=env))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "actions"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(30)
    assert "database" not in err, err


# Regression (found by this suite, fixed in 07e829d): `sandbox --write-config` to an unwritable
#  path says 'cannot serve on 127.0.0.1:0' (a listening problem) instead of naming the file
def test_sandbox_unwritable_config_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "tasksync.toml"
    r = tasksync("sandbox", "--port", "0", "--write-config", str(target), cwd=tmp_path, timeout=20)
    assert r.returncode != 0
    assert "cannot serve" not in r.stderr, r.stderr


# ============================================================================================
# 9. against the in-process sandbox: every auth mode, others' changes, the sandbox command,
#    the daemon and the demo
# ============================================================================================

AUTH_MODES = [("aksk", "token"), ("iam", "app")]  # fixed tokens: the contract simulator


def test_every_auth_mode_reads_and_writes_against_the_sandbox(tmp_path: Path) -> None:
    with ThreadedSandbox(seed=7, tasks_per_system=4) as tsb:
        sb = tsb.sb
        ids = {s: tsb.call(sb.task_ids, s) for s in ("aicc", "secmaster", "koodrive")}
        waiting = [
            t
            for t in ids["secmaster"]
            if tsb.call(sb.payload, "secmaster", t)["status"] == "waiting"
        ]
        open_aicc = [
            t
            for t in ids["aicc"]
            if tsb.call(sb.payload, "aicc", t)["taskInfo"]["status"] != "Completed"
        ]
        assert waiting and open_aicc

        def flow(i: int, secmaster_auth: str, koodrive_auth: str) -> Workspace:
            d = tmp_path / f"auth{i}"
            d.mkdir()
            toml = tsb.call(
                sb.config_toml, secmaster_auth=secmaster_auth, koodrive_auth=koodrive_auth
            )
            # the secrets come from $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
            creds = d / "credentials"
            creds.mkdir()
            kept = []
            for line in toml.splitlines():
                key, _, value = line.partition(" = ")
                name = {
                    "sk": "secmaster_sk",
                    "password": "secmaster_password",
                    "app_secret": "koodrive_app_secret",
                }.get(key)
                if name:
                    (creds / name).write_text(json.loads(value) + "\n")
                else:
                    kept.append(line)
            assert len(list(creds.iterdir())) == {"aksk": 1, "iam": 1}[secmaster_auth] + (
                koodrive_auth == "app"
            )
            ws = make_workspace(d, f"sqlite:///{d / 'x.db'}", FAST_RETRY + "\n".join(kept))
            ws.env = {"CREDENTIALS_DIRECTORY": str(creds)}
            ws.ok("track", "koodrive", *ids["koodrive"])
            ws.ok("discover", "--quiet")
            ws.x(
                "INSERT INTO actions (system, task_id, kind, params) VALUES ('secmaster', "
                f"'{waiting[0]}', 'comment', '{{\"comment\": \"via {secmaster_auth}\"}}')"
            )
            ws.x(
                "INSERT INTO actions (system, task_id, kind, params) VALUES ('aicc', "
                f"'{open_aicc[0]}', 'process', '{{\"title\": \"auth {i}\", "
                f'"description": "via {secmaster_auth}/{koodrive_auth}"}}\')'
            )
            ws.ok("apply")
            ws.ok("sync", "--quiet")
            return ws

        spaces = parallel([lambda i=i, m=m: flow(i, *m) for i, m in enumerate(AUTH_MODES)], 3)
        for ws, (sm_auth, kd_auth) in zip(spaces, AUTH_MODES, strict=True):
            failing = ws.q(
                "SELECT system, task_id, last_error FROM tasks WHERE last_error IS NOT NULL"
            )
            assert failing == [], (sm_auth, kd_auth, failing)
            polled = ws.q(
                "SELECT system, count(*) AS n FROM tasks WHERE last_polled_at IS NOT NULL "
                "GROUP BY system"
            )
            assert {r["system"] for r in polled} == {"aicc", "secmaster", "koodrive"}
            acts = ws.q("SELECT status, last_error FROM actions")
            assert [a["status"] for a in acts] == ["succeeded", "succeeded"], acts
            comments = [
                js(e["data"]).get("message")
                for e in ws.events("secmaster", waiting[0], "comment_added")
            ]
            assert f"via {sm_auth}" in comments
        # every write reached the sandbox exactly once
        applied = tsb.call(sb.applied)
        assert len(applied) == 2 * len(AUTH_MODES), applied

        # changes made by others show up as history after the next sync --all
        ws = spaces[0]
        task = waiting[-1]
        tsb.call(sb.mutate, "secmaster", task, "comment", comment="by someone else")
        tsb.call(sb.mutate, "secmaster", task, "status", status="finished")
        tsb.call(
            sb.mutate, "koodrive", ids["koodrive"][0], "status", status=3, result_code="18000205"
        )
        ws.ok("sync", "--all", "--quiet")
        kinds = [e["kind"] for e in ws.events("secmaster", task)]
        assert kinds.count("status_changed") == 1 and "comment_added" in kinds
        assert ws.task("secmaster", task)["state"] == "done"
        assert ws.task("koodrive", ids["koodrive"][0])["state"] == "failed"
        snap = ws.q(
            "SELECT payload FROM task_snapshots WHERE system = 'secmaster' "
            f"AND task_id = '{task}' ORDER BY id DESC"
        )[0]
        assert js(snap["payload"]) == tsb.call(sb.payload, "secmaster", task)


def _wait_line(stream: Any, needle: str, timeout: float) -> str:
    """Read lines from a pipe in a thread until one contains needle (bounded)."""
    found: list[str] = []

    def reader() -> None:
        for line in stream:
            found.append(line)
            if needle in line:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    assert any(needle in line for line in found), f"no {needle!r} within {timeout}s: {found}"
    return "".join(found)


def test_sandbox_command_writes_or_prints_a_usable_configuration(tmp_path: Path) -> None:
    import signal
    import tomllib

    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    config = tmp_path / "sandbox.toml"
    writer = subprocess.Popen(
        [sys.executable, "-m", "worker", "sandbox", "--port", "0", "--write-config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    printer = subprocess.Popen(
        [sys.executable, "-m", "worker", "sandbox", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not config.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert config.exists(), "the configuration was not written once listening"
        assert config.stat().st_mode & 0o077 == 0, oct(config.stat().st_mode)  # it holds secrets
        written = tomllib.loads(config.read_text())
        assert set(written["systems"]) == {"aicc", "secmaster", "koodrive"}
        sm = written["systems"]["secmaster"]
        assert "ak" in sm and "sk" in sm  # SecMaster by AK/SK
        port = int(written["systems"]["aicc"]["base_url"].rsplit(":", 1)[1])
        assert port != 0
        # usable as is (plus a database)
        cfg = tmp_path / "use.toml"
        cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "sb.db"}"\n' + config.read_text())
        cfg.chmod(0o600)
        ok(tasksync("--config", str(cfg), "discover", "--quiet", cwd=tmp_path))
        ok(tasksync("--config", str(cfg), "sync", "--quiet", cwd=tmp_path))
        rows = query(f"sqlite:///{tmp_path / 'sb.db'}", "SELECT system, last_error FROM tasks")
        assert rows and all(r["last_error"] is None for r in rows)
        assert {r["system"] for r in rows} == {"aicc", "secmaster"}

        # without --write-config the configuration goes to stdout
        assert printer.stderr is not None and printer.stdout is not None
        _wait_line(printer.stderr, "listening", 20)
        printer.send_signal(signal.SIGTERM)
        out, _ = printer.communicate(timeout=15)
        printed = tomllib.loads(out)
        assert set(printed["systems"]) == {"aicc", "secmaster", "koodrive"}
        assert not printed["systems"]["koodrive"]["base_url"].endswith(":0")
        assert printer.returncode == 0
        writer.send_signal(signal.SIGTERM)
        writer.communicate(timeout=15)
        assert writer.returncode == 0
    finally:
        for p in (writer, printer):
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_run_daemon_syncs_applies_and_stops_on_sigterm(tmp_path: Path, sim: ContractSim) -> None:
    import signal

    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        f"sqlite:///{tmp_path / 'run.db'}",
        worker='sync_schedule = "1s"\naction_poll_interval = "1s"\nshutdown_timeout = "5s"\n',
    )
    ws.ok("track", "secmaster", "sm-waiting")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    log = tmp_path / "run.log"  # a file, not a pipe: a full pipe would block the daemon
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", str(ws.config), "run"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        # queued while the daemon runs (enqueue is not a worker: it is never refused)
        ws.ok("enqueue", "secmaster", "sm-waiting", "comment", "--comment", "from the daemon")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            done = ws.q("SELECT status FROM actions")[0]["status"] == "succeeded"
            if done and ws.events("secmaster", "sm-waiting", "comment_added"):
                break
            time.sleep(0.3)
        state = (
            ws.q("SELECT status, last_error FROM actions"),
            ws.q("SELECT * FROM sync_runs"),
            ws.q("SELECT * FROM tasks"),
        )
        if not (
            state[0][0]["status"] == "succeeded"
            and ws.events("secmaster", "sm-waiting", "comment_added")
        ):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            err = log.read_text()
            pytest.fail(f"daemon did not apply and sync within 20 s: {state}\n{err[-3000:]}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        err = log.read_text()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    r = tasksync("demo", cwd=tmp_path, env={"TMPDIR": str(tmp_path)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_a_write_whose_answer_was_lost_is_read_back_not_resent(
    tmp_path: Path, sim: ContractSim
) -> None:
    """An unknown outcome (a dropped connection or a 500 to a write) leaves the action pending;
    before anything is sent again the task is read back: what landed is not sent twice (not even
    by aiohttp's silent re-send of a PUT), what did not land is sent again."""
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        f"sqlite:///{tmp_path / 'x.db'}",
        extra='[retry]\nbase_delay = "1s"\nmax_delay = "1s"\n',
    )
    # never synced: the baseline is read once before the first attempt
    sim.push(  # applied, then the connection drops
        "PUT " + SECMASTER_PREFIX + "/sm-waiting", Canned(0, {}, after_apply=True)
    )
    sim.push(  # dropped before anything was applied
        "PUT " + SECMASTER_PREFIX + "/sm-finished", Canned(0, {})
    )
    sim.push(  # applied, then a 500
        "POST " + AICC_PREFIX + "/process",
        Canned(500, {"resCode": "500", "resMsg": "internal"}, after_apply=True),
    )
    landed = ws.ok("enqueue", "secmaster", "sm-waiting", "comment", "--comment", "exactly once")
    lost = ws.ok("enqueue", "secmaster", "sm-finished", "comment", "--comment", "lost once")
    process = ws.ok(
        "enqueue", "aicc", AICC_IDS[0], "process", "--title", "once", "--description", "once"
    )
    ws.ok("apply")
    time.sleep(1.2)
    ws.ok("apply")
    for action in (landed, lost, process):
        a = ws.action(action.stdout)
        assert a["status"] == "succeeded", a
        outcomes = [
            r["outcome"]
            for r in ws.q(
                f"SELECT outcome FROM action_attempts WHERE action_id = {int(action.stdout)} "
                "ORDER BY id"
            )
        ]
        assert outcomes[0] == "unknown", outcomes
    assert len(sim.requests("PUT", "/sm-waiting")) == 1
    assert len(sim.requests("PUT", "/sm-finished")) == 2  # read back: not there, so sent again
    assert len(sim.requests("POST", "/task/process")) == 1
    with sim.lock:
        assert [c["message"] for c in sim.secmaster["sm-waiting"]["comments"]] == ["exactly once"]
        assert [c["message"] for c in sim.secmaster["sm-finished"]["comments"]] == ["lost once"]
        traces = [t["title"] for t in sim.aicc[AICC_IDS[0]]["taskTrace"]]
    assert traces.count("once") == 1


# Regression (found by this suite, fixed in 07e829d): SecMaster tasks.last_changed_at is the
#  upstream update_time, not when tasksync saw the change: a change observed now can carry a
#  last_changed_at from months ago (older than first_seen_at)
def test_last_changed_at_moves_when_a_change_is_observed(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'c.db'}")
    ws.ok("track", "secmaster", "sm-waiting")
    ws.ok("sync", "--quiet")
    first = ws.task("secmaster", "sm-waiting")
    with sim.lock:  # another user comments; this simulator leaves update_time as it was
        sim.secmaster["sm-waiting"]["comments"].append(
            {"id": "c-9", "message": "new", "user_id": "u", "user_name": "n", "time": 1755586422424}
        )
    ws.ok("sync", "--all", "--quiet")
    row = ws.task("secmaster", "sm-waiting")
    assert ws.events("secmaster", "sm-waiting", "comment_added")
    assert ts(row["last_changed_at"]) >= ts(first["first_seen_at"]), row["last_changed_at"]


# Regression (found by this suite, fixed in 80262bd): `cancel`/`retry` with an action id beyond 64
#  bits print a traceback on SQLite (OverflowError: Python int too large to convert to SQLite
#  INTEGER); PostgreSQL says 'database error: ... out of int64 range'
def test_out_of_range_action_id_is_a_clean_error(tmp_path: Path) -> None:
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'o.db'}"}
    ok(tasksync("migrate", cwd=tmp_path, env=env))
    huge = "99999999999999999999"
    for r in parallel(
        [lambda c=c: tasksync(c, huge, cwd=tmp_path, env=env) for c in ("cancel", "retry")]
    ):
        # tasksync() itself fails on a traceback; then: bad input (2) or no such action (1)
        assert r.returncode in (1, 2), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# Regression (found by this suite, fixed in 80262bd): a duration too large for a timestamp (e.g.
#  poll_interval or lease = "99999999h") passes configuration checks, then `sync` dies with a
#  traceback (OverflowError: date value out of range) instead of exit 78 naming the key
def test_durations_too_large_for_a_timestamp(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)

    def flow(key: str) -> subprocess.CompletedProcess[str]:
        d = tmp_path / key
        d.mkdir()
        ws = sim_workspace(d, sim, f"sqlite:///{d / 'x.db'}", worker=f'{key} = "99999999h"\n')
        first = ws.run("track", "koodrive", "kd-0")
        return first if first.returncode else ws.run("sync", "--quiet")

    for key, r in zip(
        ("poll_interval", "lease"),
        parallel([lambda k=k: flow(k) for k in ("poll_interval", "lease")]),
        strict=True,
    ):
        # either refused as a bad value (78, naming the key) or harmless (the cycle runs)
        assert r.returncode in (0, 78), (key, r.stderr[-500:])
        if r.returncode == 78:
            assert key in r.stderr


def _raw(*args: str | bytes, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run with raw (possibly non-UTF-8) arguments; stderr decoded leniently."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    full.update(env)
    r = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        cwd=cwd,
        env=full,
        timeout=60,
        check=False,
    )
    return r.returncode, r.stderr.decode("utf-8", "replace")


# Regression (found by this suite, fixed in 80262bd): a task id or option value that is not valid
#  UTF-8 (e.g. from a Latin-1 or GBK terminal) crashes enqueue/track with a traceback
#  (UnicodeEncodeError: surrogates not allowed)
def test_arguments_that_are_not_utf8_are_bad_input(tmp_path: Path) -> None:
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'b.db'}"}
    runs = parallel(
        [
            lambda: _raw("track", "aicc", b"ccqG\xff", cwd=tmp_path, env=env),
            lambda: _raw(
                "enqueue",
                "secmaster",
                "t1",
                "comment",
                "--comment",
                b"\xb2\xe2\xca\xd4",
                cwd=tmp_path,
                env=env,
            ),
        ]
    )
    for code, err in runs:
        assert "Traceback" not in err, err[-400:]
        assert code == 2 and len(err.strip().splitlines()) == 1, (code, err[-400:])


# Regression (found by this suite, fixed in 80262bd): a configuration file that is not UTF-8 (e.g.
#  saved as GBK with Chinese comments) crashes every command with a traceback (UnicodeDecodeError)
#  instead of exit 78
def test_configuration_file_that_is_not_utf8_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "tasksync.toml"
    cfg.write_bytes("[worker]\n# 每五分钟同步一次\nconcurrency = 4\n".encode("gbk"))
    code, err = _raw("--config", str(cfg), "status", cwd=tmp_path, env={})
    assert "Traceback" not in err, err[-400:]
    assert code == 78 and len(err.strip().splitlines()) == 1, (code, err)


# Regression (found by this suite, fixed in 80262bd): on a database migrated by a newer tasksync
#  (unknown revision), `status` says 'run `tasksync migrate`' and `migrate` then dies with a
#  traceback (alembic CommandError: Can't locate revision)
def test_database_from_a_newer_version_is_a_clean_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    env = {"TASKSYNC_DATABASE__URL": url}
    ok(tasksync("migrate", cwd=tmp_path, env=env))
    execute(url, "UPDATE alembic_version SET version_num = 'ffff0000newer'")
    status, migrate = parallel(
        [
            lambda: tasksync("status", cwd=tmp_path, env=env),
            lambda: tasksync("migrate", cwd=tmp_path, env=env),
        ]
    )
    for r in (status, migrate):  # tasksync() fails on a traceback
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-400:]
        assert "run `tasksync migrate`" not in r.stderr  # migrating cannot help here


# Regression (found by this suite, fixed in 80262bd): `sandbox --mutate-every nan` passes the
#  positivity check and dies with a traceback (ValueError: delay must be a non-negative number)
#  instead of exit 2
def test_sandbox_rejects_a_nan_interval(tmp_path: Path) -> None:
    r = tasksync("sandbox", "--port", "0", "--mutate-every", "nan", cwd=tmp_path, timeout=20)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-300:]
