"""`tasksync healthcheck [--json]`: exit 0 when healthy, 1 when not, one line per check; each
check failing on its own, judged from the database alone (no daemon runs here)."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from tests.support.cli import run_cli
from tests.support.db import Database
from worker.config import Schedule
from worker.health import schedule_interval
from worker.sandbox import Sandbox
from worker.store import Store, utcnow
from worker.store.migrate import HEAD_REVISION
from worker.store.schema import tasks

pytestmark = pytest.mark.anyio

PER_SYSTEM = 4
OK = ["database: ok", "sync: ok", "systems: ok", "poll lag: ok"]


async def cli(
    tmp_path: Path, database: Database, sb: Sandbox, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "tasksync.toml"
    if not config.exists():
        config.write_text(sb.config_toml())
        config.chmod(0o600)
    full = {"TASKSYNC_DATABASE__URL": database.url, **env}
    # in a thread: the sandbox serves from this event loop meanwhile
    return await anyio.to_thread.run_sync(lambda: run_cli("--config", str(config), *args, env=full))


async def execute(store: Store, sql: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(sql))


async def test_each_check_fails_on_its_own(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=8, tasks_per_system=PER_SYSTEM) as sb:
        for system in ("aicc", "secmaster", "koodrive"):
            await store.track(system, sb.task_ids(system))

        # tracked, never synced: only the cycle check fails
        done = await cli(tmp_path, database, sb, "healthcheck")
        assert done.returncode == 1, done.stderr
        assert done.stdout.splitlines() == [
            "database: ok",
            "sync: no sync cycle has finished yet",
            "systems: ok",
            "poll lag: ok",
        ]

        synced = await cli(tmp_path, database, sb, "sync", "--quiet")
        assert synced.returncode == 0, synced.stderr
        healthy = await cli(tmp_path, database, sb, "healthcheck")
        assert (healthy.returncode, healthy.stdout.splitlines()) == (0, OK), healthy.stderr
        # the newest cycle is older than 3 x a 1 s schedule
        await anyio.sleep(3.2)
        late = await cli(tmp_path, database, sb, "healthcheck", TASKSYNC_WORKER__SYNC_SCHEDULE="1s")
        assert late.returncode == 1
        assert late.stdout.splitlines()[1].startswith("sync: the newest sync cycle finished ")
        assert late.stdout.splitlines()[1].endswith(" ago, over 3 x the schedule's 1s")
        assert [
            line for line in late.stdout.splitlines() if line != late.stdout.splitlines()[1]
        ] == [
            "database: ok",
            "systems: ok",
            "poll lag: ok",
        ]

        # one task overdue by an hour: past 3 x poll_interval (5m)
        async with store.engine.begin() as conn:
            await conn.execute(
                tasks.update()
                .where(tasks.c.system == "koodrive")
                .values(next_poll_at=utcnow() - timedelta(hours=1))
            )
        lag = await cli(tmp_path, database, sb, "healthcheck")
        assert lag.returncode == 1
        assert lag.stdout.splitlines()[3] == (
            "poll lag: tasks overdue: koodrive 60m (limit 3 x poll_interval = 15m)"
        )
        assert lag.stdout.splitlines()[:3] == OK[:3]

        # every SecMaster poll of its newest cycle failed (a wrong SK): that system fails
        failed = await cli(
            tmp_path,
            database,
            sb,
            "sync",
            "--all",
            "--quiet",
            "secmaster",
            TASKSYNC_SYSTEMS__SECMASTER__SK="wrong-secret-key",
        )
        assert failed.returncode == 0, failed.stderr
        broken = await cli(tmp_path, database, sb, "healthcheck")
        assert broken.returncode == 1
        line = broken.stdout.splitlines()[2]
        assert line.startswith(
            f"systems: secmaster: all {PER_SYSTEM} polls of its newest cycle failed ("
        )
        assert "wrong-secret-key" not in broken.stdout
        # a good cycle after it: healthy again (the lag is gone too once koodrive is polled)
        again = await cli(tmp_path, database, sb, "sync", "--all", "--quiet")
        assert again.returncode == 0, again.stderr
        healthy = await cli(tmp_path, database, sb, "healthcheck")
        assert (healthy.returncode, healthy.stdout.splitlines()) == (0, OK), healthy.stdout

        # a schema not at head: the database check fails, and the rest cannot be judged
        await execute(store, "UPDATE alembic_version SET version_num = '0000'")
        old = await cli(tmp_path, database, sb, "healthcheck")
        assert old.returncode == 1
        assert old.stdout.splitlines() == [
            f"database: schema at revision 0000, not {HEAD_REVISION}: run `tasksync migrate`",
            "sync: not checked: the database is unavailable",
            "systems: not checked: the database is unavailable",
            "poll lag: not checked: the database is unavailable",
        ]
        await execute(store, f"UPDATE alembic_version SET version_num = '{HEAD_REVISION}'")
        assert "Traceback" not in old.stderr + broken.stderr + lag.stderr + late.stderr


def test_unreachable_or_unmigrated_database(tmp_path: Path) -> None:
    down = run_cli(
        "healthcheck", env={"TASKSYNC_DATABASE__URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert down.returncode == 1
    first = down.stdout.splitlines()[0]
    assert first.startswith("database: unreachable: "), down.stdout
    assert len(down.stdout.splitlines()) == 4 and "Traceback" not in down.stderr
    as_json = run_cli(
        "healthcheck",
        "--json",
        env={"TASKSYNC_DATABASE__URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["healthy"] is False

    missing = run_cli("healthcheck", env={"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path}/no.db"})
    assert missing.returncode == 1
    assert missing.stdout.splitlines()[0] == (
        f"database: no database file {tmp_path}/no.db: run `tasksync migrate`"
    )
    assert not (tmp_path / "no.db").exists()  # a probe creates nothing
    (tmp_path / "empty.db").write_bytes(b"")
    empty = run_cli("healthcheck", env={"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path}/empty.db"})
    assert empty.returncode == 1
    assert empty.stdout.splitlines()[0] == "database: not migrated: run `tasksync migrate`"


def test_schedule_interval() -> None:
    assert schedule_interval(Schedule(interval=30.0)) == 30.0
    assert schedule_interval(Schedule(cron="*/5 * * * *")) == 300.0
    assert schedule_interval(Schedule(cron="0 * * * *")) == 3600.0
