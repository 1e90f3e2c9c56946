"""Chaos, end to end with real processes: nothing lost, nothing applied twice.

`tasksync run` daemons work against the sandbox with faults on (10 % HTTP 500, 5 % 429, 5 %
answers slower than the 1 s timeout, 3 % connections dropped after a write was applied, 2 %
malformed JSON, every issued token expiring every 120 requests) while tasks change upstream and
60 actions are queued, by `tasksync enqueue` and by SQL INSERT. The daemons are SIGKILLed at
random moments (four times) and restarted; once the database itself goes away (PostgreSQL is
restarted; a SQLite file is held under an exclusive lock). Then, faults off and one final
`tasksync sync --all`: every newest snapshot equals the truth, every change upstream is in the
history exactly once, every action finished (a failure with its reason), and the sandbox saw
each action's effect exactly once and in queue order.

Run alone with `pytest -m chaos -s`; each test prints a summary block (and writes it as JSON
into its tmp dir).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from tests.support.chaos import base_env, decode, ensure_postgres_running, run_chaos
from tests.support.cli import tasksync_argv
from tests.support.db import Database, rows
from tests.support.web import serve
from worker.store import Store

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.timeout(240)]

EXPECTED_FAULTS = ("500", "429", "slow", "drop", "malformed", "expire")


async def _chaos(
    database: Database,
    store: Store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    workers: int,
    seed: int,
) -> None:
    def emit(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)

    try:
        outcome = await run_chaos(
            database=database,
            store=store,
            tmp_path=tmp_path,
            workers=workers,
            seed=seed,
            emit=emit,
        )
    finally:
        if database.kind == "postgres":
            await ensure_postgres_running()
    f = outcome.figures
    assert f["kills"] >= 3
    assert f["outage"]
    missing_faults = [name for name in EXPECTED_FAULTS if not f["faults"].get(name)]
    assert not missing_faults, f"faults never injected: {missing_faults}"
    assert f["actions"] == 60 and f["effects"] > 0
    assert (f["duplicates"], f["lost"], f["misreported"]) == (0, 0, 0), outcome.problems
    assert outcome.problems == []


async def test_chaos_one_worker(
    database: Database, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _chaos(database, store, tmp_path, capsys, workers=1, seed=801)


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_chaos_two_workers_on_postgres(
    database: Database, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _chaos(database, store, tmp_path, capsys, workers=2, seed=802)


# -- a frozen worker -------------------------------------------------------------------------------


class GatedSecMaster:
    """One SecMaster task whose answers can be held back per request (the n-th request waits
    for `gates[n]` when there is one), with the content it had when the request arrived."""

    TOKEN = "gated-secmaster-token-77aa"

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.content: dict[str, Any] = {
            "id": task_id,
            "name": "frozen worker",
            "status": "waiting",
            "comments": [],
            "attachment_id_list": [],
        }
        self.gates: dict[int, anyio.Event] = {}
        self.arrived = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/{p}/workspaces/{w}/soc/tasks/{id}", self._show)
        return app

    async def _show(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Auth-Token") != self.TOKEN:
            return web.json_response({"error_code": "APIGW.0301"}, status=401)
        n, self.arrived = self.arrived, self.arrived + 1
        data = json.loads(json.dumps(self.content))  # as it is now
        gate = self.gates.get(n)
        if gate is not None:
            await gate.wait()
        return web.json_response({"code": "00000000", "success": True, "data": data})

    def comment(self, text: str) -> None:
        self.content["comments"].append(
            {"id": f"c-{text}", "message": text, "user_id": "u", "time": 1755586422424}
        )


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_a_frozen_worker_never_leaves_a_stale_snapshot(
    database: Database, store: Store, tmp_path: Path
) -> None:
    """Worker A fetches a task, then freezes (SIGSTOP: a VM pause, a swap storm) past its
    lease. Worker B takes the task over and fetches a newer content. A thaws and writes first,
    then B. The newest snapshot must be the newest content, and stay so on the next cycles."""
    upstream = GatedSecMaster("3e4c170e-7cc9-11f0-9216-fa163e209978")
    async with serve(upstream.app()) as url:
        config = tmp_path / "tasksync.toml"
        config.write_text(
            "[systems.secmaster]\n"
            f'base_url = "{url}"\nproject_id = "p"\nworkspace_id = "w"\n'
            f'token = "{GatedSecMaster.TOKEN}"\ntimeout = 60\n'
        )
        config.chmod(0o600)
        env = base_env(database.url) | {"TASKSYNC_WORKER__LEASE": "2s"}
        cmd = tasksync_argv("--config", str(config), "sync", "--all", "--quiet")
        await store.track("secmaster", [upstream.task_id])

        async def sync_once() -> None:
            with anyio.fail_after(60):
                result = await anyio.run_process(cmd, env=env, check=False)
            assert result.returncode == 0, result.stderr.decode()[-2000:]

        async def arrived(n: int) -> None:
            with anyio.fail_after(30):
                while upstream.arrived < n:
                    await anyio.sleep(0.05)

        await sync_once()  # snapshot 1: no comment
        upstream.comment("seen by A")
        gate_a, gate_b = anyio.Event(), anyio.Event()
        upstream.gates = {1: gate_a, 2: gate_b}
        async with await anyio.open_process(cmd, env=env) as worker_a:
            try:
                await arrived(2)  # A asked; its answer holds "seen by A"
                worker_a.send_signal(signal.SIGSTOP)
                gate_a.set()  # the answer waits in A's socket
                await anyio.sleep(3)  # A's 2 s lease runs out
                upstream.comment("seen by B")
                async with await anyio.open_process(cmd, env=env) as worker_b:
                    await arrived(3)  # B took the task over and asked
                    worker_a.send_signal(signal.SIGCONT)
                    with anyio.fail_after(30):
                        assert await worker_a.wait() == 0  # A wrote what it saw
                    gate_b.set()
                    with anyio.fail_after(30):
                        assert await worker_b.wait() == 0
            finally:
                if worker_a.returncode is None:
                    worker_a.send_signal(signal.SIGCONT)
                    worker_a.kill()
        await sync_once()
        await sync_once()
    [latest] = await rows(store, "SELECT seq, payload FROM latest_snapshots")
    comments = [c["message"] for c in decode(latest["payload"])["comments"]]
    events = await rows(store, "SELECT kind, data FROM task_events ORDER BY id")
    added = [decode(e["data"])["message"] for e in events if e["kind"] == "comment_added"]
    assert sorted(added) == ["seen by A", "seen by B"], added  # history: each once
    assert comments == ["seen by A", "seen by B"], (
        f"the newest snapshot (#{latest['seq']}) shows {comments}: the content the frozen "
        "worker saw, not the newest one; and it stays so, because the task row holds the "
        "newest content's hash"
    )
