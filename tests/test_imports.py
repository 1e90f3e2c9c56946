"""What the commands import, and the schema check that decides whether Alembic is one of them.

Issue 17: `sync` and `apply` import nothing they do not use: no Alembic unless migrating, no
sandbox, no rich when stdout is not a terminal, no PostgreSQL dialect or driver for a SQLite URL
and no SQLite one for a PostgreSQL URL. Read from the real command's `-X importtime` report
(PYTHONPROFILEIMPORTTIME), never from timings: the figures live in the issue and bench/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.support.cli import clean_env, run_cli, run_cli_async
from tests.support.db import Database
from worker import startup
from worker.sandbox import Sandbox
from worker.store import Store
from worker.store.migrate import HEAD_REVISION, current_revision

pytestmark = pytest.mark.anyio

# never needed by a worker command that does not migrate, whatever the database (Prometheus:
# only `run` with a metrics listener; aiohttp: the sandbox and that listener, never the calls
# to the upstreams, which have their own transport)
NEVER = ("alembic", "mako", "worker.sandbox", "rich", "prometheus_client", "aiohttp")
# a dialect and its driver only for its own database
OTHER_DATABASE = {
    "sqlite": ("sqlalchemy.dialects.postgresql", "asyncpg"),
    "postgres": ("sqlalchemy.dialects.sqlite", "aiosqlite"),
}


def imported(stderr: bytes | str) -> set[str]:
    """The modules named in a `-X importtime` report ("import time: self | cumulative | name")."""
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return {
        line.rsplit("|", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def loaded(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


async def _traced(config: Path, url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {"TASKSYNC_DATABASE__URL": url, "PYTHONPROFILEIMPORTTIME": "1"}
    return await run_cli_async("--config", str(config), *args, env=env)


async def test_sync_and_apply_import_only_what_they_use(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=31, tasks_per_system=4) as sb:
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        for system in ("aicc", "secmaster", "koodrive"):
            await store.track(system, sb.task_ids(system))  # type: ignore[arg-type]
        task = sb.task_ids("secmaster")[0]
        await store.enqueue("secmaster", task, "comment", {"comment": "traced"})

        synced = await _traced(config, database.url, "sync", "--all")
        applied = await _traced(config, database.url, "apply")

        # the commands did their work: the imports below are those of the real paths
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert synced.stdout.startswith(b"polled 12 task(s)"), synced.stdout
        assert applied.returncode == 0, applied.stderr[-2000:]
        assert b"1 succeeded" in applied.stdout, applied.stdout
        assert [e.params["comment"] for e in sb.applied("secmaster", task)] == ["traced"]
    for result in (synced, applied):
        modules = imported(result.stderr)
        # the report is complete: the store and the upstream transport are in it
        assert "worker.store" in modules and "worker.upstreams.transport" in modules
        for package in (*NEVER, *OTHER_DATABASE[database.kind]):
            assert not loaded(modules, package), (result.args, package, loaded(modules, package))


async def test_a_first_use_does_import_alembic(tmp_path: Path) -> None:
    """The control of the test above: migrating is the one reason to load Alembic."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    async with Sandbox(seed=32, tasks_per_system=1) as sb:
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        synced = await _traced(config, url, "sync")
    assert synced.returncode == 0, synced.stderr[-2000:]
    assert loaded(imported(synced.stderr), "alembic")
    assert await anyio.to_thread.run_sync(current_revision, url) == HEAD_REVISION


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"TASKSYNC_DATABASE__URL": url, "PYTHONPROFILEIMPORTTIME": "1"})


@pytest.mark.parametrize(
    "command", [("status",), ("actions",), ("show", "aicc", "t-1")], ids=" ".join
)
def test_read_commands_do_not_load_alembic_on_a_current_database(
    database: Database, command: tuple[str, ...]
) -> None:
    result = _cli(database.url, *command)
    assert result.returncode in (0, 1), result.stderr[-2000:]  # show: the task is not known
    modules = imported(result.stderr)
    for package in ("alembic", "rich", "worker.sandbox", *OTHER_DATABASE[database.kind]):
        assert not loaded(modules, package), (command, package)


def test_status_migrates_a_database_never_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    result = run_cli("status", "--json", env={"TASKSYNC_DATABASE__URL": url})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert current_revision(url) == HEAD_REVISION


async def test_commands_ask_for_migrate_on_an_older_schema(
    database: Database, store: Store
) -> None:
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0003'")
    for command in (
        ("status",),
        ("track", "aicc", "t-1"),
        ("enqueue", "secmaster", "t-1", "terminate"),
        ("sync", "--all"),
        ("apply",),
        ("discover",),
    ):
        result = await run_cli_async(*command, env={"TASKSYNC_DATABASE__URL": database.url})
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.decode() == (
            "tasksync: the database schema is at revision 0003; run `tasksync migrate`\n"
        ), command
        assert result.stdout == b""
    async with store.engine.connect() as conn:  # nothing was written, nothing migrated
        assert (await conn.exec_driver_sql("SELECT count(*) FROM tasks")).scalar() == 0
        version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar()
    assert version == "0003"


async def test_status_refuses_a_schema_from_a_newer_version(
    database: Database, store: Store
) -> None:
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff0000newer'")
    result = await run_cli_async("status", env={"TASKSYNC_DATABASE__URL": database.url})
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "tasksync: the database schema is at revision ffff0000newer, which this tasksync does "
        f"not know (its newest is {HEAD_REVISION}): was it migrated by a newer version? "
        "upgrade tasksync\n"
    )


# Start-up defers cyclic garbage collection until the command's modules are loaded
# (worker/startup.py): every command that then works in an event loop (all the long-running
# ones do) must find collection on again when the loop starts.
PROBE = """
import gc, os, sys
import anyio

def probe(*args, **kwargs):
    sys.stderr.write(f"collecting at the event loop: {gc.isenabled()} {gc.get_threshold()[:2]}\\n")
    sys.stderr.flush()
    os._exit(0)

anyio.run = probe
from worker.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _script(
    script: str, command: tuple[str, ...], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`script` (which patches anyio.run, then calls the command line) run with `command`, on a
    SQLite file of its own."""
    return subprocess.run(
        [sys.executable, "-c", script, *command],
        capture_output=True,
        text=True,
        env=clean_env({"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'probe.db'}"}),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("status",),
        ("sync", "--all"),
        ("apply",),
        ("discover",),
        ("run",),
        ("events", "--follow"),
        ("sandbox", "--port", "0"),
        ("demo",),
    ],
    ids=" ".join,
)
def test_long_running_commands_collect_garbage(tmp_path: Path, command: tuple[str, ...]) -> None:
    result = _script(PROBE, command, tmp_path)
    expected = (startup.YOUNG_THRESHOLD, startup.MIDDLE_THRESHOLD)
    assert result.stderr == f"collecting at the event loop: True {expected}\n", result.stderr[
        -2000:
    ]


# Every event loop a command runs, by the module of its class, then the command goes on.
LOOPS = """
import asyncio, sys
import anyio

real = anyio.run

def run(fn, *args, **kwargs):
    async def traced(*a):
        sys.stderr.write(f"loop: {type(asyncio.get_running_loop()).__module__}\\n")
        return await fn(*a)
    return real(traced, *args, **kwargs)

anyio.run = run
from worker.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [("sync", "--all"), ("apply",), ("discover",)], ids=" ".join)
def test_worker_commands_run_on_uvloop(tmp_path: Path, command: tuple[str, ...]) -> None:
    """The commands that poll and apply work on uvloop's event loop (worker/startup.py)."""
    result = _script(LOOPS, command, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    loops = [line for line in result.stderr.splitlines() if line.startswith("loop: ")]
    assert loops and loops[-1] == "loop: uvloop", result.stderr[-2000:]


def test_collection_is_deferred_only_by_main() -> None:
    import gc

    assert gc.isenabled()
    frozen, threshold = gc.get_freeze_count(), gc.get_threshold()
    startup.resume_collection()  # a library's call: nothing deferred, frozen or retuned
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    assert gc.get_threshold() == threshold
