"""`tasksync sync`, `discover` and `apply` as commands: output, progress bar, worker lock."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.support.cli import open_cli, run_cli_async
from tests.support.db import Database
from worker.sandbox import Sandbox
from worker.store import SqliteWorkerLock

pytestmark = pytest.mark.anyio


def _env(database: Database) -> dict[str, str]:
    return {"TASKSYNC_DATABASE__URL": database.url}


async def _cli(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return await run_cli_async("--config", str(config), *args, env=env)


async def test_discover_sync_apply_commands(database: Database, tmp_path: Path) -> None:
    async with Sandbox(seed=21, tasks_per_system=5) as sb:
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        env = _env(database)
        found = await _cli(config, env, "discover")
        assert found.returncode == 0, found.stderr
        assert b"new" in found.stdout
        for task in sb.task_ids("koodrive"):
            assert (await _cli(config, env, "track", "koodrive", task)).returncode == 0
        synced = await _cli(config, env, "sync")
        assert synced.returncode == 0, synced.stderr
        assert synced.stdout.startswith(b"polled ")
        quiet = await _cli(config, env, "sync", "--all", "--quiet")
        assert quiet.returncode == 0 and quiet.stdout == b""
        only = await _cli(config, env, "sync", "--all", "koodrive")
        assert only.stdout.startswith(b"polled 5 ")
        task = sb.task_ids("secmaster")[0]
        enq = await _cli(
            config, env, "enqueue", "secmaster", task, "comment", "--comment", "from the cli"
        )
        assert enq.returncode == 0
        applied = await _cli(config, env, "apply")
        assert applied.returncode == 0 and b"1 succeeded" in applied.stdout
        assert [e.params["comment"] for e in sb.applied("secmaster", task)] == ["from the cli"]
        # a system that is not configured
        partial = tmp_path / "aicc-only.toml"
        partial.write_text(sb.config_toml(systems=["aicc"]))
        partial.chmod(0o600)
        refused = await _cli(partial, env, "sync", "secmaster")
        assert refused.returncode == 78 and b"systems.secmaster" in refused.stderr


async def test_progress_bar_only_on_a_terminal(database: Database, tmp_path: Path) -> None:
    async with Sandbox(seed=22, tasks_per_system=30) as sb:
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        env = _env(database) | {"COLUMNS": "100", "TERM": "xterm"}
        for system in ("aicc", "secmaster", "koodrive"):
            await _cli(config, env, "track", system, *sb.task_ids(system))  # type: ignore[arg-type]

        async def on_tty(*args: str) -> bytes:
            main, secondary = pty.openpty()
            process = await open_cli(
                "--config",
                str(config),
                *args,
                env=env,
                stdout=secondary,
                stderr=subprocess.PIPE,
            )
            os.close(secondary)
            chunks = []
            with anyio.fail_after(60):
                while True:
                    try:
                        data = await anyio.to_thread.run_sync(os.read, main, 65536)
                    except OSError:
                        break
                    if not data:
                        break
                    chunks.append(data)
                await process.wait()
            os.close(main)
            await process.aclose()
            return b"".join(chunks)

        shown = await on_tty("sync", "--all")
        assert b"polling" in shown  # the bar's label, drawn on the terminal
        assert b"%" in shown  # with its total (counted for the bar): a percentage is shown
        hidden = await on_tty("sync", "--all", "--quiet")
        assert b"polling" not in hidden
        piped = await _cli(config, env, "sync", "--all")
        assert b"polling" not in piped.stdout


async def test_second_worker_on_sqlite_is_refused(database: Database, tmp_path: Path) -> None:
    if database.kind != "sqlite":
        pytest.skip("PostgreSQL takes any number of workers (test_sync covers two)")
    path = Path(database.url.removeprefix("sqlite:///"))
    lock = SqliteWorkerLock(path)
    lock.acquire()
    try:
        for command in ("sync", "apply"):
            result = await run_cli_async(command, env=_env(database))
            assert result.returncode == 1
            message = result.stderr.decode()
            assert "another tasksync worker" in message and "PostgreSQL" in message
            assert len(message.strip().splitlines()) == 1
    finally:
        lock.release()
