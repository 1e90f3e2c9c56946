"""Least privilege through the database: `tasksync grants` on real PostgreSQL roles, and
`actions.requested_by` (who queued each action) on both databases.

Roles are cluster-wide, so every test creates its own (unique names) and drops them afterwards,
together with a database owned by the test's "daemon" role, which migrates it as in production.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.support.cli import run_cli
from tests.support.db import IN_CI, PG_URL, Database, psql_admin
from worker.sandbox import Sandbox
from worker.store import Store
from worker.store.grants import GrantsError, build_grants, check_role_name
from worker.store.schema import VIEW_NAMES, metadata

pytestmark = pytest.mark.anyio

# the tables the README documents; every table of the schema is checked for writes (a revision
# that adds one adds it to the grants without an edit, and to these tests)
TABLES = ("tasks", "task_snapshots", "task_events", "actions", "action_attempts", "sync_runs")
DOCUMENTED = (*TABLES, *VIEW_NAMES)
WRITABLE = (*metadata.tables, "action_queue")  # latest_snapshots is a join: nobody writes it


def writes(relation: str) -> list[str]:
    """An UPDATE and a DELETE of every row; PostgreSQL checks privileges before any row."""
    first = next(iter(metadata.tables[relation].c)).name if relation in metadata.tables else "id"
    return [f"UPDATE {relation} SET {first} = {first}", f"DELETE FROM {relation}"]


REQUEST = "INSERT INTO actions (system, task_id, kind, params) VALUES ('secmaster', $1, 'comment', '{\"comment\": \"from the bridge\"}') RETURNING id, requested_by"


@dataclass(frozen=True)
class Cluster:
    db: str
    owner: str  # the daemon's role: owns the database, runs the migrations
    reader: str
    submitter: str

    def url(self, role: str) -> str:
        assert PG_URL is not None
        return make_url(PG_URL).set(username=role, database=self.db).render_as_string(False)

    async def connect(self, role: str) -> asyncpg.Connection:
        return await asyncpg.connect(self.url(role))

    def cli(self, role: str, *args: str, config: Path | None = None) -> Any:
        extra = ("--config", str(config)) if config else ()
        return run_cli(*extra, *args, env={"TASKSYNC_DATABASE__URL": self.url(role)})

    async def acli(self, role: str, *args: str, config: Path | None = None) -> Any:
        return await anyio.to_thread.run_sync(lambda: self.cli(role, *args, config=config))

    def grant_sql(self, *args: str) -> str:
        result = self.cli(self.owner, "grants", *args)
        assert result.returncode == 0, result.stderr
        return str(result.stdout)

    async def run_as(self, role: str, sql: str) -> None:
        conn = await self.connect(role)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


def migrate(cluster: Cluster, revision: str = "head") -> None:
    from alembic import command

    from worker.store.migrate import _alembic_config

    command.upgrade(_alembic_config(cluster.url(cluster.owner)), revision)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A fresh database owned by a new daemon role, and a reader and a submitter role."""
    if not PG_URL:
        if IN_CI:
            pytest.fail(
                "CI=true but TASKSYNC_TEST_POSTGRES_URL is not set: PostgreSQL tests must run"
            )
        pytest.skip("postgres: TASKSYNC_TEST_POSTGRES_URL is not set")
    tag = uuid.uuid4().hex[:10]
    c = Cluster(f"ts_grants_{tag}", f"ts_daemon_{tag}", f"ts_reader_{tag}", f"ts_submit_{tag}")
    psql_admin(
        f"CREATE ROLE {c.owner} LOGIN; CREATE ROLE {c.reader} LOGIN; CREATE ROLE {c.submitter} LOGIN"
    )
    try:
        psql_admin(f"CREATE DATABASE {c.db} OWNER {c.owner}")
        yield c
    finally:
        psql_admin(f"DROP DATABASE IF EXISTS {c.db} WITH (FORCE)")
        psql_admin(f"DROP ROLE IF EXISTS {c.owner}, {c.reader}, {c.submitter}")


@pytest.fixture
async def granted(cluster: Cluster) -> Cluster:
    """The cluster at head, with the grants applied by the daemon's role."""
    await anyio.to_thread.run_sync(migrate, cluster)
    sql = await anyio.to_thread.run_sync(
        lambda: cluster.grant_sql("--reader", cluster.reader, "--submitter", cluster.submitter)
    )
    await cluster.run_as(cluster.owner, sql)
    return cluster


async def refused(conn: asyncpg.Connection, sql: str) -> bool:
    try:
        await conn.execute(sql)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


async def test_a_submitter_queues_by_sql_and_the_daemon_applies_it(
    granted: Cluster, tmp_path: Path
) -> None:
    c = granted
    async with Sandbox(seed=61, tasks_per_system=2) as sb:
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        task = sb.task_ids("secmaster")[0]
        bridge = await c.connect(c.submitter)
        try:
            row = await bridge.fetchrow(REQUEST, task)
        finally:
            await bridge.close()
        assert row is not None and row["requested_by"] == c.submitter
        applied = await c.acli(c.owner, "apply", config=config)
        assert applied.returncode == 0 and "1 succeeded" in applied.stdout, applied.stderr
        assert [e.params["comment"] for e in sb.applied("secmaster", task)] == ["from the bridge"]
    # the dashboard's role reads the outcome with the read commands, and who asked
    listed = await c.acli(c.reader, "actions", "--json")
    assert listed.returncode == 0, listed.stderr
    [action] = json.loads(listed.stdout)
    assert action["id"] == row["id"] and action["status"] == "succeeded"
    assert action["requested_by"] == c.submitter
    shown = await c.acli(c.reader, "show", "secmaster", task, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [a["requested_by"] for a in json.loads(shown.stdout)["actions"]] == [c.submitter]
    human = await c.acli(c.reader, "actions")
    assert "REQUESTED BY" in human.stdout and c.submitter in human.stdout


async def test_a_submitter_can_do_nothing_else(granted: Cluster) -> None:
    c = granted
    owner = await c.connect(c.owner)
    try:  # a row in every table, so an UPDATE or DELETE would have something to change
        await owner.execute("INSERT INTO tasks (system, task_id) VALUES ('secmaster', 't')")
        await owner.execute("INSERT INTO sync_runs (worker) VALUES ('w')")
    finally:
        await owner.close()
    conn = await c.connect(c.submitter)
    try:
        queued = await conn.fetchrow(REQUEST, "t")
        assert queued is not None
        await conn.execute(  # every column a request may carry
            "INSERT INTO actions (system, task_id, kind, params, idempotency_key, max_attempts) "
            "VALUES ('secmaster', 't', 'terminate', '{}', 'k-1', 3)"
        )
        forbidden = [
            "UPDATE actions SET status = 'canceled'",
            "UPDATE actions SET params = '{}'",
            "DELETE FROM actions",
            "TRUNCATE actions",
            *(
                f"INSERT INTO actions (system, task_id, kind, {column}) VALUES ('secmaster', 't', 'terminate', {value})"
                for column, value in [
                    ("status", "'succeeded'"),
                    ("attempts", "7"),
                    ("result", "'{}'"),
                    ("last_error", "'x'"),
                    ("lease_owner", "'me'"),
                    ("lease_until", "now()"),
                    ("next_attempt_at", "now()"),
                    ("requested_by", "'someone else'"),
                    ("id", "424242"),
                ]
            ),
            "SELECT setval(pg_get_serial_sequence('actions', 'id'), 1)",
            "UPDATE alembic_version SET version_num = '0001'",
            "CREATE TABLE mine (x int)",
        ]
        for relation in WRITABLE:
            if relation != "actions":
                forbidden += [f"INSERT INTO {relation} DEFAULT VALUES"]
            forbidden += writes(relation)
        allowed = [sql for sql in forbidden if not await refused(conn, sql)]
        assert allowed == []
        rows = await conn.fetch("SELECT status, attempts, requested_by FROM actions ORDER BY id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("pending", 0, c.submitter)] * 2


async def test_a_reader_reads_every_table_and_view_and_writes_nothing(granted: Cluster) -> None:
    c = granted
    conn = await c.connect(c.reader)
    try:
        for relation in dict.fromkeys((*DOCUMENTED, *metadata.tables, "alembic_version")):
            assert await conn.fetch(f"SELECT * FROM {relation}") is not None
        forbidden = [
            "INSERT INTO actions (system, task_id, kind) VALUES ('secmaster', 't', 'terminate')",
            "CREATE TABLE mine (x int)",
        ]
        for relation in WRITABLE:
            forbidden += [
                f"INSERT INTO {relation} DEFAULT VALUES",
                *writes(relation),
            ]
        allowed = [sql for sql in forbidden if not await refused(conn, sql)]
        assert allowed == []
    finally:
        await conn.close()


async def test_a_submitter_cancels_only_its_own_pending_actions(granted: Cluster) -> None:
    c = granted
    owner = await c.connect(c.owner)
    bridge = await c.connect(c.submitter)
    dashboard = await c.connect(c.reader)
    try:
        mine, running, theirs = [(await bridge.fetchrow(REQUEST, t))["id"] for t in "abc"]
        await owner.execute("UPDATE actions SET status = 'running' WHERE id = $1", running)
        await owner.execute("UPDATE actions SET requested_by = 'someone' WHERE id = $1", theirs)
        cancel = "SELECT tasksync_cancel($1)"
        assert [await bridge.fetchval(cancel, i) for i in (mine, mine, running, theirs)] == [
            True,
            False,  # already canceled
            False,  # claimed by a worker: too late
            False,  # not its own
        ]
        assert await refused(dashboard, f"SELECT tasksync_cancel({theirs})")
        statuses = await owner.fetch("SELECT status FROM actions ORDER BY id")
    finally:
        for conn in (owner, bridge, dashboard):
            await conn.close()
    assert [r["status"] for r in statuses] == ["canceled", "running", "pending"]


async def test_grants_are_idempotent_and_exact(granted: Cluster) -> None:
    c = granted
    again = await anyio.to_thread.run_sync(
        lambda: c.grant_sql("--reader", c.reader, "--submitter", c.submitter)
    )
    await c.run_as(c.owner, again)  # a second run is fine
    conn = await c.connect(c.submitter)
    try:
        assert await conn.fetchrow(REQUEST, "t") is not None
    finally:
        await conn.close()
    # exact: naming the submitter as a reader now takes its INSERT away
    demoted = await anyio.to_thread.run_sync(lambda: c.grant_sql("--reader", c.submitter))
    await c.run_as(c.owner, demoted)
    conn = await c.connect(c.submitter)
    try:
        assert await refused(conn, REQUEST.replace("$1", "'t'"))
        assert await conn.fetch("SELECT * FROM actions") is not None
    finally:
        await conn.close()


async def test_grants_survive_migrate(cluster: Cluster) -> None:
    """Granted at the first revision, then `tasksync migrate`: the new column is readable and
    filled, and relations a later revision creates (as the owner) are readable at once."""
    c = cluster
    await anyio.to_thread.run_sync(migrate, c, "0001")
    sql = await anyio.to_thread.run_sync(
        lambda: c.grant_sql("--reader", c.reader, "--submitter", c.submitter)
    )
    await c.run_as(c.owner, sql)
    conn = await c.connect(c.submitter)
    try:
        old = await conn.fetchval(REQUEST.replace(", requested_by", ""), "t")
    finally:
        await conn.close()
    migrated = await c.acli(c.owner, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    conn = await c.connect(c.submitter)
    try:
        row = await conn.fetchrow(REQUEST, "t")
        assert row is not None and row["requested_by"] == c.submitter
        # nobody knows who queued the older row: it is not put on the migrating role
        assert await conn.fetchval("SELECT requested_by FROM actions WHERE id = $1", old) is None
        # a new capability (0002's cancel function) waits for grants to be run again
        assert await refused(conn, f"SELECT tasksync_cancel({row['id']})")
        sql = await anyio.to_thread.run_sync(
            lambda: c.grant_sql("--reader", c.reader, "--submitter", c.submitter)
        )
        await c.run_as(c.owner, sql)
        assert await conn.fetchval("SELECT tasksync_cancel($1)", row["id"]) is True
        assert await conn.fetchrow(REQUEST, "t") is not None
    finally:
        await conn.close()
    # what a future revision may do: a new table, a view dropped and created again
    await c.run_as(
        c.owner,
        "CREATE TABLE later_table (id bigserial PRIMARY KEY, note text); "
        "DROP VIEW action_queue; "
        "CREATE VIEW action_queue AS SELECT id, system, task_id, kind, status FROM actions "
        "WHERE status IN ('pending', 'running')",
    )
    for role in (c.reader, c.submitter):
        conn = await c.connect(role)
        try:
            assert await conn.fetch("SELECT * FROM later_table") == []
            assert len(await conn.fetch("SELECT * FROM action_queue")) == 2  # pending ones
            assert await refused(conn, "INSERT INTO later_table (note) VALUES ('x')")
        finally:
            await conn.close()


async def test_grants_refuses_bad_roles(cluster: Cluster) -> None:
    c = cluster
    empty = await c.acli(c.owner, "grants", "--reader", c.reader)
    assert empty.returncode == 1 and "tasksync migrate" in empty.stderr
    await anyio.to_thread.run_sync(migrate, c)
    cases = [  # the command's exit status and one line, for a missing role and a bad name
        (["--reader", f"{c.reader}_missing"], 1, "does not exist"),
        (["--reader", "public"], 2, "reserved"),
    ]
    for args, code, message in cases:
        result = await c.acli(c.owner, "grants", *args)
        assert (result.returncode, result.stdout) == (code, ""), (args, result.stderr)
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
    for role, message in [(c.owner, "owns the tasksync tables"), ("postgres", "superuser")]:
        with pytest.raises(GrantsError, match=message):
            await anyio.to_thread.run_sync(build_grants, c.url(c.owner), [role], [])
    for name in ("", "x" * 64, "pg_monitor", "CURRENT_USER"):
        with pytest.raises(ValueError, match="role name"):
            check_role_name(name)


def test_grants_on_sqlite_exit_2(tmp_path: Path) -> None:
    result = run_cli(
        "grants", "--reader", "dash", env={"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path}/t.db"}
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "SQLite has no database roles" in result.stderr
    assert len(result.stderr.splitlines()) == 1


async def test_enqueue_records_who_asked_and_retry_keeps_it(
    database: Database, store: Store
) -> None:
    def cli(*args: str) -> Any:
        return run_cli(*args, env={"TASKSYNC_DATABASE__URL": database.url})

    def enqueue(*extra: str) -> int:
        result = cli("enqueue", "secmaster", "t-1", "terminate", *extra)
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    by_role = await anyio.to_thread.run_sync(enqueue)
    by_person = await anyio.to_thread.run_sync(enqueue, "--requested-by", "alice@soc")
    expected_role = make_url(database.url).username if database.kind == "postgres" else None
    listed = json.loads((await anyio.to_thread.run_sync(cli, "actions", "--json")).stdout)
    assert {a["id"]: a["requested_by"] for a in listed} == {
        by_role: expected_role,
        by_person: "alice@soc",
    }
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE actions SET status = 'failed', attempts = 8"))
    assert (await anyio.to_thread.run_sync(cli, "retry", str(by_person))).returncode == 0
    shown = json.loads(
        (await anyio.to_thread.run_sync(cli, "show", "secmaster", "t-1", "--json")).stdout
    )
    assert [(a["status"], a["requested_by"]) for a in shown["actions"]] == [
        ("failed", expected_role),
        ("pending", "alice@soc"),
    ]
    for bad in (" ", "x" * 256):
        result = await anyio.to_thread.run_sync(
            cli, "enqueue", "secmaster", "t-1", "terminate", "--requested-by", bad
        )
        assert result.returncode == 2 and "--requested-by" in result.stderr
