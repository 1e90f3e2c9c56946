"""The change stream: `tasksync events` (once, --since, --follow) and NOTIFY tasksync_events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from tests.support.cli import run_cli
from tests.support.db import Database, count
from tests.support.sandbox import clients, settings_for, track_all
from worker.actions import ActionRunner
from worker.model import Event, EventKind
from worker.sandbox import Sandbox
from worker.store import PollResult, Store, utcnow
from worker.store.listen import listen_dsn
from worker.store.schema import task_events
from worker.sync import SyncCycle

pytestmark = pytest.mark.anyio

FIELDS = ["id", "system", "task_id", "kind", "occurred_at", "observed_at", "data", "title"]


def _env(database: Database) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    env["TASKSYNC_DATABASE__URL"] = database.url
    return env


async def _event_ids(store: Store, after: int = 0) -> list[int]:
    async with store.engine.connect() as conn:
        found = await conn.scalars(
            sa.select(task_events.c.id).where(task_events.c.id > after).order_by(task_events.c.id)
        )
        return [int(i) for i in found]


class Follower:
    """`tasksync events --follow --json` in a subprocess, its lines collected as they come."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.arrived: list[float] = []
        self.stderr = b""

    async def read_stdout(self) -> None:
        buffer = b""
        async for chunk in self.proc.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                self.lines.append(json.loads(line))
                self.arrived.append(time.monotonic())

    async def read_stderr(self) -> None:
        async for chunk in self.proc.stderr:
            self.stderr += chunk

    async def wait_for(self, n: int, limit: float = 20) -> None:
        with anyio.fail_after(limit):
            while len(self.lines) < n:
                await anyio.sleep(0.02)

    async def wait_ready(self) -> None:
        with anyio.fail_after(30):
            while b"following events after id" not in self.stderr:
                await anyio.sleep(0.02)


async def test_follow_prints_each_new_event_once_and_since_resumes_without_gaps(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=51, tasks_per_system=6) as sb:
        settings = settings_for(sb, database.url, batch_size=4)  # several storing transactions
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        await track_all(store, sb)
        args = [sys.executable, "-m", "worker", "--config", str(config), "--log-level", "info"]
        async with await anyio.open_process(
            [*args, "events", "--follow", "--json"], env=_env(database)
        ) as proc:
            follower = Follower(proc)
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower.read_stdout)
                tg.start_soon(follower.read_stderr)
                await follower.wait_ready()
                async with clients(settings) as upstreams:
                    # cycle 1: the first observation stores each task's history
                    await SyncCycle(store, upstreams, settings, "w1").run()
                    first = await _event_ids(store)
                    assert len(first) > 10  # more than the newest 10: they all come through
                    await follower.wait_for(len(first))
                    # cycle 2: upstream changes, and an action of ours, each stored once
                    task = sb.task_ids("secmaster")[0]
                    await store.enqueue("secmaster", task, "comment", {"comment": "streamed"})
                    await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
                    sb.mutate_random(4)
                    stats = await SyncCycle(store, upstreams, settings, "w1").run(all_tasks=True)
                    stored_at = time.monotonic()
                    assert stats.changed > 0
                    every = await _event_ids(store)
                    assert len(every) > len(first)
                    await follower.wait_for(len(every))
                    # within 2 s of the cycle that stored them
                    assert follower.arrived[-1] - stored_at < 2.0
                    await anyio.sleep(1.5)  # nothing more, nothing twice
                proc.send_signal(signal.SIGINT)
                with anyio.fail_after(15):
                    code = await proc.wait()
                tg.cancel_scope.cancel()
    assert code == 0, follower.stderr.decode()
    printed = [line["id"] for line in follower.lines]
    assert printed == every  # each event exactly once, in id order
    [line] = [
        li
        for li in follower.lines
        if li["task_id"] == task and li["kind"] == "comment_added" and "streamed" in str(li["data"])
    ]
    assert list(line) == FIELDS and line["title"] is not None
    assert line["system"] == "secmaster"

    # resuming from any id gives exactly the rest
    middle = every[len(every) // 2]
    resumed = await anyio.run_process(
        [*args, "events", "--since", str(middle), "--json"], env=_env(database), check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    ids = [json.loads(li)["id"] for li in resumed.stdout.splitlines()]
    assert ids == [i for i in every if i > middle]


async def test_without_since_the_newest_ten_and_filters(database: Database, store: Store) -> None:
    await _insert_events(store, 15)
    env = _env(database)
    newest = await anyio.to_thread.run_sync(lambda: run_cli("events", "--json", env=env))
    assert newest.returncode == 0, newest.stderr
    rows = [json.loads(li) for li in newest.stdout.splitlines()]
    every = await _event_ids(store)
    assert [r["id"] for r in rows] == every[-10:]
    assert rows[0]["title"] == "Task 5" and list(rows[0]) == FIELDS
    only = await anyio.to_thread.run_sync(
        lambda: run_cli(
            "events",
            "--since",
            "0",
            "--system",
            "aicc",
            "--kind",
            "trace",
            "status_changed",
            "--json",
            env=env,
        )
    )
    got = [json.loads(li) for li in only.stdout.splitlines()]
    assert got and all(
        r["system"] == "aicc" and r["kind"] in ("trace", "status_changed") for r in got
    )
    assert len(got) == 5  # aicc tasks 0, 3, 6, 9, 12 carry a trace event
    text = await anyio.to_thread.run_sync(lambda: run_cli("events", "--since", "14", env=env))
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 1
    assert text.stdout.startswith(f"{every[-1]}  ")
    bad = await anyio.to_thread.run_sync(lambda: run_cli("events", "--system", "jira", env=env))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


async def _insert_events(store: Store, n: int) -> None:
    """n tasks with one event each, rotating systems (aicc gets `trace`)."""
    systems = ("aicc", "secmaster", "koodrive")
    kinds = {"aicc": "trace", "secmaster": "comment_added", "koodrive": "status_changed"}
    now = utcnow()
    async with store.engine.begin() as conn:
        for i in range(n):
            system = systems[i % 3]
            await conn.execute(
                sa.text(
                    "INSERT INTO tasks (system, task_id, title, first_seen_at, next_poll_at) "
                    "VALUES (:s, :t, :title, :now, :now)"
                ),
                {"s": system, "t": f"t{i}", "title": f"Task {i}", "now": now},
            )
            await conn.execute(
                task_events.insert().values(
                    system=system,
                    task_id=f"t{i}",
                    kind=kinds[system],
                    dedup_key=f"k{i}",
                    observed_at=now,
                    data={"i": i},
                )
            )


def test_closed_pipe_ends_follow_quietly(database: Database, tmp_path: Path) -> None:
    env = _env(database)
    assert run_cli("track", "aicc", "x", env=env).returncode == 0  # creates the schema
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "events", "--follow"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away (`| head -1` exiting)
    code = proc.wait(timeout=10)
    errors = proc.stderr.read()
    proc.stderr.close()
    assert code == 0
    assert errors == b""


async def test_sigterm_ends_follow_with_status_0(database: Database) -> None:
    env = _env(database)
    await anyio.to_thread.run_sync(lambda: run_cli("track", "aicc", "x", env=env))
    async with await anyio.open_process(
        [sys.executable, "-m", "worker", "--log-level", "info", "events", "--follow"], env=env
    ) as proc:
        follower = Follower(proc)
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.read_stderr)
            await follower.wait_ready()
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await proc.wait() == 0
            tg.cancel_scope.cancel()


# -- NOTIFY ------------------------------------------------------------------------------------


async def test_one_notify_per_storing_transaction_with_its_highest_id(
    database: Database, store: Store
) -> None:
    if database.kind != "postgres":
        pytest.skip("NOTIFY is PostgreSQL's")
    import asyncpg

    received: list[str] = []
    conn = await asyncpg.connect(listen_dsn(database.url))
    try:
        await conn.add_listener("tasksync_events", lambda *a: received.append(a[3]))
        await store.track("secmaster", ["a", "b", "c"])

        async def write(events_per_task: dict[str, list[str]], changed: bool = True) -> None:
            claimed = await store.claim_tasks(
                "w", after_id=0, limit=10, lease=60, due_before=None, system="secmaster"
            )
            now = utcnow()
            results = []
            for t in claimed:
                keys = events_per_task.get(t.task_id, [])
                results.append(
                    PollResult(
                        task=t,
                        polled_at=now,
                        next_poll_at=now + timedelta(minutes=5),
                        payload={"keys": keys, "seq": t.snapshot_seq} if changed else None,
                        content_hash=f"{t.task_id}-{t.snapshot_seq}" if changed else None,
                        status="open",
                        state="open",
                        title=t.task_id,
                        events=[
                            Event(EventKind.COMMENT_ADDED, k, None, {"comment": k}) for k in keys
                        ],
                    )
                )
            await store.write_results("w", results)

        async def settle(n: int) -> None:
            with anyio.fail_after(5):
                while len(received) < n:
                    await anyio.sleep(0.02)
            await anyio.sleep(0.3)  # and no more than that

        await write({"a": ["x1", "x2"], "b": ["x3"]})  # one transaction, three events
        await settle(1)
        assert received == [str(max(await _event_ids(store)))]
        await write({}, changed=False)  # a transaction without events: no NOTIFY
        await write({"a": ["x1"], "b": ["x3"]})  # only duplicates: nothing new, no NOTIFY
        await anyio.sleep(0.5)
        assert len(received) == 1
        await write({"c": ["y1"]})
        await settle(2)
        assert received[1] == str(max(await _event_ids(store)))
        assert len(received) == 2
    finally:
        await conn.close()


async def test_a_sync_cycle_notifies_per_batch_in_increasing_order(
    database: Database, store: Store
) -> None:
    if database.kind != "postgres":
        pytest.skip("NOTIFY is PostgreSQL's")
    import asyncpg

    received: list[int] = []
    conn = await asyncpg.connect(listen_dsn(database.url))
    try:
        await conn.add_listener("tasksync_events", lambda *a: received.append(int(a[3])))
        async with Sandbox(seed=52, tasks_per_system=4) as sb:
            settings = settings_for(sb, database.url, batch_size=3)
            await track_all(store, sb)
            async with clients(settings) as upstreams:
                await SyncCycle(store, upstreams, settings, "w1").run()
        with anyio.fail_after(5):
            while not received or received[-1] != max(await _event_ids(store)):
                await anyio.sleep(0.05)
        assert received == sorted(set(received))  # once per transaction, ids in commit order
        assert 1 < len(received) <= 4  # 12 tasks in batches of 3
        assert await count(store, "task_events") >= len(received)
    finally:
        await conn.close()


async def test_event_ids_are_committed_in_order_across_workers(
    database: Database, store: Store
) -> None:
    """A consumer reading "after the last id" must never miss a row that commits late with a
    lower id: storing transactions take their ids in turn (store/events.py)."""
    if database.kind != "postgres":
        pytest.skip("SQLite runs one write transaction at a time")
    from worker.store.events import lock_event_order

    await store.track("secmaster", ["late"])
    [claimed] = await store.claim_tasks(
        "w", after_id=0, limit=1, lease=60, due_before=None, system="secmaster"
    )
    now = utcnow()
    result = PollResult(
        task=claimed,
        polled_at=now,
        next_poll_at=now + timedelta(minutes=5),
        payload={"x": 1},
        content_hash="h",
        status="open",
        state="open",
        title="late",
        events=[Event(EventKind.COMMENT_ADDED, "second", None, {"comment": "second"})],
    )
    other = Store.open(database.url)
    try:
        async with other.engine.connect() as first:
            await first.begin()
            await lock_event_order(first)  # a worker storing events, not committed yet
            await first.execute(
                task_events.insert().values(
                    system="secmaster", task_id="late", kind="trace", dedup_key="first", data={}
                )
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.write_results, "w", [result])
                await anyio.sleep(0.5)
                assert await _event_ids(store) == []  # the second waits for the first
                await first.commit()
        async with store.engine.connect() as conn:
            order = (
                await conn.scalars(sa.select(task_events.c.dedup_key).order_by(task_events.c.id))
            ).all()
        assert list(order) == ["first", "second"]
    finally:
        await other.aclose()
