"""`tasksync run` started while its PostgreSQL is unreachable waits for it, then runs.

(The chaos suite restarts daemons while it restarts the database: a daemon that exited 1 when
its first schema check met the restart was an unexpected exit.)"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from tests.support.cli import open_cli
from tests.support.db import Database
from worker.sandbox import Sandbox

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_waits_for_an_unreachable_database_then_starts(
    database: Database, tmp_path: Path
) -> None:
    if database.kind != "postgres":
        pytest.skip("an unreachable server is PostgreSQL's case (SQLite is a local file)")
    real = database.url.rsplit("@", 1)[1].split("/", 1)[0]  # host:port of the real server
    real_host, real_port = real.rsplit(":", 1)
    port = free_port()
    url = database.url.replace(real, f"127.0.0.1:{port}")  # nothing listens there yet

    async def forward(client: SocketStream) -> None:
        async with client, await anyio.connect_tcp(real_host, int(real_port)) as server:

            async def pipe(a: SocketStream, b: SocketStream) -> None:
                async for chunk in a:
                    await b.send(chunk)
                await b.send_eof()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, server)
                tg.start_soon(pipe, server, client)

    log = tmp_path / "daemon.log"
    async with Sandbox(seed=41, tasks_per_system=1) as sb:
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        with log.open("wb") as out:
            process = await open_cli(
                "--config",
                str(config),
                "run",
                env={"TASKSYNC_DATABASE__URL": url},
                stdout=out,
                stderr=out,
            )
            try:
                with anyio.fail_after(30):
                    while log.read_text().count("database unavailable") < 2:
                        await anyio.sleep(0.1)
                    assert process.returncode is None  # still waiting, not exited
                    listener = await anyio.create_tcp_listener(
                        local_host="127.0.0.1", local_port=port
                    )
                    async with listener, anyio.create_task_group() as tg:
                        tg.start_soon(listener.serve, forward)
                        while "sync:" not in log.read_text():
                            await anyio.sleep(0.1)
                        process.send_signal(signal.SIGTERM)
                        code = await process.wait()
                        tg.cancel_scope.cancel()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
