"""The `[metrics]` listener of `tasksync run`: a real daemon in a subprocess against the sandbox,
scraped over HTTP; /livez with a wedged loop, /readyz with the database gone; promtool on a
real scrape; a real Prometheus server scraping the daemon. Plus the configuration key."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import run_cli
from tests.support.db import IN_CI, PG_URL, Database
from tests.test_service import (
    SQLITE_ONLY,
    DaemonProcess,
    daemon,
    daemon_env,
    finished_cycles,
    insert_comment,
    notify_socket,
    scalar,
    wait_status,
)
from worker.config import ConfigError, load_config
from worker.sandbox import Sandbox
from worker.store import Store
from worker.store.migrate import HEAD_REVISION

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio

TASKS_PER_SYSTEM = 12  # 36 tasks in all
LISTENING = re.compile(r"serving /metrics, /livez, /readyz on (http://\S+)")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_env(db: Database, **extra: str) -> dict[str, str]:
    return daemon_env(db, None, TASKSYNC_METRICS__LISTEN="127.0.0.1:0", **extra)


async def base_url(proc: DaemonProcess, timeout: float = 30) -> str:
    """The listener's address, from the daemon's log line (port 0 picks a free one)."""
    with anyio.fail_after(timeout):
        while not (found := LISTENING.search(proc.output)):
            assert proc.proc.poll() is None, proc.output
            await anyio.sleep(0.05)
    return found.group(1)


async def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is missing (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


async def track_all(store: Store, sb: Sandbox) -> None:
    for system in ("aicc", "secmaster", "koodrive"):
        await store.track(system, sb.task_ids(system))


async def wait_for(url: str, status: int, timeout: float) -> str:
    with anyio.fail_after(timeout):
        while True:
            got, _, body = await get(url)
            if got == status:
                return body
            await anyio.sleep(0.2)


async def wait_for_gauge(url: str, name: str, value: float, timeout: float) -> Samples:
    """Scrape until the gauge shows `value` (a wait for a condition, not for the cache's 5 s)."""
    with anyio.fail_after(timeout):
        while True:
            samples = parse((await get(url + "/metrics"))[2])
            if total(samples, name) == value:
                return samples
            await anyio.sleep(0.2)


# --- a real daemon, scraped ----------------------------------------------------------------------


async def test_scrape_matches_what_the_sandbox_served(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=4, tasks_per_system=TASKS_PER_SYSTEM) as sb:
        await track_all(store, sb)
        env = metrics_env(database, TASKSYNC_WORKER__SYNC_SCHEDULE="1h")
        async with daemon(tmp_path, sb, env) as proc:
            url = await base_url(proc)
            with anyio.fail_after(30):
                while await finished_cycles(store) < 1:
                    await anyio.sleep(0.1)
            task_id = sb.task_ids("secmaster")[0]
            action_id = await insert_comment(store, task_id, "counted")
            await wait_status(store, action_id, "succeeded", 20)
            await anyio.sleep(0.3)  # the finish is counted right after its write
            status, content_type, text = await get(url + "/metrics")
            requests_served = sb.requests.total
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            samples = parse(text)

            # one cycle over 36 tasks: 36 polls, all first observations, as many snapshots
            assert total(samples, "tasksync_polls_total") == 3 * TASKS_PER_SYSTEM
            for system in ("aicc", "secmaster", "koodrive"):
                assert total(samples, "tasksync_polls_total", system=system) == TASKS_PER_SYSTEM
                assert (
                    total(samples, "tasksync_polls_total", system=system, outcome="changed")
                    == TASKS_PER_SYSTEM
                )
            assert total(samples, "tasksync_snapshots_stored_total") == await scalar(
                store, "SELECT count(*) FROM task_snapshots"
            )
            assert total(samples, "tasksync_events_stored_total") == await scalar(
                store, "SELECT count(*) FROM task_events"
            )
            # every request the sandbox saw was counted, with its status, and timed
            assert total(samples, "tasksync_upstream_requests_total") == requests_served
            assert total(samples, "tasksync_upstream_requests_total", code="200") == requests_served
            assert (
                total(samples, "tasksync_upstream_request_duration_seconds_count")
                == requests_served
            )
            assert total(samples, "tasksync_upstream_throttled_total") == 0
            assert (
                total(
                    samples,
                    "tasksync_action_attempts_total",
                    system="secmaster",
                    kind="comment",
                    outcome="succeeded",
                )
                == 1
            )
            assert total(samples, "tasksync_cycle_duration_seconds_count", kind="sync") == 1
            assert total(samples, "tasksync_last_cycle_end_timestamp_seconds", kind="sync") > 0
            assert total(samples, "tasksync_build_info", version="0.1.0") == 1
            assert total(samples, "tasksync_database_up") == 1

            # the database-derived gauges agree with `status --json`
            report = run_cli("status", "--json", env={"TASKSYNC_DATABASE__URL": database.url})
            assert report.returncode == 0, report.stderr
            tasks = json.loads(report.stdout)["tasks"]
            exported = {
                (dict(ls)["system"], dict(ls)["state"]): v
                for (n, ls), v in samples.items()
                if n == "tasksync_tasks" and v
            }
            assert exported == {
                (system, state): n
                for system, states in tasks.items()
                for state, n in states.items()
            }
            actions = json.loads(report.stdout)["actions"]
            assert total(samples, "tasksync_actions", status="succeeded") == actions["succeeded"]
            assert total(samples, "tasksync_action_queue_age_seconds") == 0
            # nothing overdue, except the task the action made due again (re-polled next cycle)
            assert total(samples, "tasksync_poll_lag_seconds", system="aicc") == 0
            assert total(samples, "tasksync_poll_lag_seconds", system="koodrive") == 0
            assert 0 < total(samples, "tasksync_poll_lag_seconds", system="secmaster") < 30
            assert total(samples, "tasksync_tasks_failing") == 0
            # never a task id or an action id in a label
            labels = {v for (_, ls) in samples for _, v in ls}
            assert not labels & {*sb.task_ids("secmaster"), str(action_id)}

            # OpenMetrics when the scraper asks for it
            status, content_type, om = await get(
                url + "/metrics", accept="application/openmetrics-text; version=1.0.0"
            )
            assert status == 200 and content_type.startswith("application/openmetrics-text")
            assert om.rstrip().endswith("# EOF")
            # promtool accepts a real scrape
            checked = subprocess.run(
                [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr

            assert (await get(url + "/livez"))[0] == 200
            status, _, body = await get(url + "/readyz?verbose")
            assert status == 200
            assert "[+] database: ok" in body and "[+] shutdown: ok" in body
            proc.signal(signal.SIGTERM)
            assert await proc.wait(30) == 0, proc.output
        assert "Traceback" not in proc.output


@SQLITE_ONLY  # the watchdog's judgement does not depend on the database
async def test_livez_turns_503_while_a_loop_is_wedged_and_recovers(
    database: Database, tmp_path: Path
) -> None:
    async with Sandbox(seed=3, tasks_per_system=2) as sb:
        with notify_socket() as notify:
            # WATCHDOG_USEC: a loop silent for over 1 s counts as wedged (as for the pings)
            env = daemon_env(
                database,
                notify,
                TASKSYNC_METRICS__LISTEN="127.0.0.1:0",
                TASKSYNC_TEST_WEDGE="sync:3:4",
            )
            async with daemon(tmp_path, sb, env) as proc:
                url = await base_url(proc)
                await notify.wait_for("READY", 30, "1")
                assert (await get(url + "/livez"))[0] == 200
                body = await wait_for(url + "/livez", 503, 15)
                assert body.strip().startswith("no progress for over 1s from sync")
                assert len(body.strip().splitlines()) == 1
                assert (await get(url + "/readyz"))[0] == 200  # alive or not, the DB is fine
                await wait_for(url + "/livez", 200, 15)  # the wedge ends: live again
                proc.signal(signal.SIGTERM)
                assert await proc.wait(30) == 0, proc.output


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # refuses its connections
async def test_readyz_turns_503_while_the_database_is_gone_and_recovers(
    database: Database, store: Store, tmp_path: Path
) -> None:
    db_name = database.url.rpartition("/")[2]
    assert PG_URL is not None
    admin_url = PG_URL.rpartition("/")[0] + "/postgres"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async with Sandbox(seed=3, tasks_per_system=2) as sb:
        await track_all(store, sb)
        async with daemon(tmp_path, sb, metrics_env(database)) as proc:
            url = await base_url(proc)
            await wait_for(url + "/readyz", 200, 30)
            with anyio.fail_after(30):
                while await finished_cycles(store) < 1:
                    await anyio.sleep(0.1)
            await store.engine.dispose()
            try:
                await admin(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS false")
                await admin(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{db_name}' AND pid <> pg_backend_pid()"
                )
                body = await wait_for(url + "/readyz", 503, 20)
                assert body.startswith("database: unreachable:"), body
                status, _, verbose = await get(url + "/readyz?verbose")
                assert status == 503 and "[-] database: unreachable" in verbose
                # unready, never dead: the loops wait the outage out
                assert (await get(url + "/livez"))[0] == 200
                # the gauge is read at scrape time through a 5 s cache: the first scrape after
                # the cache expired shows the outage
                samples = await wait_for_gauge(url, "tasksync_database_up", 0, 20)
                assert total(samples, "tasksync_polls_total") >= 6  # the counters stay
            finally:
                await admin(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS true")
            await wait_for(url + "/readyz", 200, 30)
            await wait_for_gauge(url, "tasksync_database_up", 1, 20)
            proc.signal(signal.SIGTERM)
            assert await proc.wait(30) == 0, proc.output
        assert "Traceback" not in proc.output


@SQLITE_ONLY
async def test_readyz_turns_503_on_a_schema_not_at_head(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with (
        Sandbox(seed=3, tasks_per_system=2) as sb,
        daemon(tmp_path, sb, metrics_env(database)) as proc,
    ):
        url = await base_url(proc)
        await wait_for(url + "/readyz", 200, 30)
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
        body = await wait_for(url + "/readyz", 503, 10)
        assert body.strip() == (
            f"database: schema at revision 0000, not {HEAD_REVISION}: run `tasksync migrate`"
        )
        async with store.engine.begin() as conn:
            await conn.execute(
                sa.text(f"UPDATE alembic_version SET version_num = '{HEAD_REVISION}'")
            )
        await wait_for(url + "/readyz", 200, 10)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output


# --- a real Prometheus server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if IN_CI:
            pytest.fail("the prometheus server is missing (.ci/run installs Debian's prometheus)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n"
        f"  - {ROOT / 'contrib' / 'prometheus' / 'tasksync-rules.yml'}\n"
        "scrape_configs:\n"
        "  - job_name: tasksync\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def query(server: str, promql: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(server + "/api/v1/query", params={"query": promql}) as response,
    ):
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@SQLITE_ONLY
async def test_a_real_prometheus_scrapes_the_daemon(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=6, tasks_per_system=TASKS_PER_SYSTEM) as sb:
        await track_all(store, sb)
        env = metrics_env(database, TASKSYNC_WORKER__SYNC_SCHEDULE="1h")
        async with daemon(tmp_path, sb, env) as proc:
            url = await base_url(proc)
            target = url.removeprefix("http://")
            async with prometheus(tmp_path / "prom", target) as server:
                result: list[dict[str, Any]] = []
                with anyio.fail_after(60):
                    while True:
                        try:
                            result = await query(server, "sum(tasksync_polls_total)")
                        except (aiohttp.ClientError, OSError):
                            result = []  # not listening yet
                        if result and float(result[0]["value"][1]) == 3 * TASKS_PER_SYSTEM:
                            break
                        await anyio.sleep(0.5)
                up = await query(server, 'up{job="tasksync"}')
                assert [float(r["value"][1]) for r in up] == [1.0]
                by_system = await query(server, "sum by (system) (tasksync_tasks)")
                assert {r["metric"]["system"]: float(r["value"][1]) for r in by_system} == {
                    s: TASKS_PER_SYSTEM for s in ("aicc", "secmaster", "koodrive")
                }
            proc.signal(signal.SIGTERM)
            assert await proc.wait(30) == 0, proc.output


# --- configuration and start-up ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["9464", "localhost", "127.0.0.1:", ":9464", "127.0.0.1:http", "127.0.0.1:70000", "::1:9464"],
)
def test_a_malformed_listen_is_a_configuration_error(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.listen \(from TASKSYNC_METRICS__LISTEN\): "):
        load_config(None, {"TASKSYNC_METRICS__LISTEN": value})


@pytest.mark.parametrize("value", ["127.0.0.1:9464", "[::1]:9464", "localhost:0", "0.0.0.0:80"])
def test_a_listen_address(value: str) -> None:
    assert load_config(None, {"TASKSYNC_METRICS__LISTEN": value}).settings.metrics.listen == value


def test_listen_errors_exit_78_and_1(tmp_path: Path) -> None:
    config = tmp_path / "tasksync.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1"\n')
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'x.db'}"}
    bad = run_cli("--config", str(config), "run", env=env)
    assert bad.returncode == 78
    assert bad.stderr.startswith("tasksync: configuration error: metrics.listen (from ")
    assert len(bad.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        busy = run_cli("--config", str(config), "run", env=env)
    assert busy.returncode == 1
    assert busy.stderr.strip() == (
        f"tasksync: metrics.listen: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_one_shot_commands_record_nothing() -> None:
    """Without a listener nothing is recorded, and prometheus-client is not even imported."""
    code = (
        "import sys, worker.metrics as m, worker.sync, worker.upstreams.http\n"
        "m.observe_request('aicc', 200, 0.1); m.observe_cycle('sync', 0.0)\n"
        "assert m.recorder() is None and 'prometheus_client' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "contrib" / "grafana" / "tasksync-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 8
    names = set(re.findall(r"\btasksync_[a-z_]+", " ".join(exprs)))
    exported = {
        "tasksync_build_info",
        "tasksync_polls_total",
        "tasksync_upstream_requests_total",
        "tasksync_upstream_request_duration_seconds_bucket",
        "tasksync_upstream_throttled_total",
        "tasksync_snapshots_stored_total",
        "tasksync_events_stored_total",
        "tasksync_action_attempts_total",
        "tasksync_cycle_duration_seconds_bucket",
        "tasksync_cycle_duration_seconds_sum",
        "tasksync_cycle_duration_seconds_count",
        "tasksync_last_cycle_end_timestamp_seconds",
        "tasksync_tasks",
        "tasksync_tasks_failing",
        "tasksync_poll_lag_seconds",
        "tasksync_actions",
        "tasksync_action_queue_age_seconds",
        "tasksync_database_up",
    }
    assert names <= exported, names - exported


# --- the recorder in-process -----------------------------------------------------------------------


def test_recorder_counts_and_exposes_both_formats() -> None:
    from datetime import UTC, datetime

    from worker.metrics import Recorder
    from worker.model import Event, EventKind
    from worker.store import ClaimedTask, PollResult

    recorder = Recorder()
    for code, seconds in ((200, 0.004), (200, 0.2), (429, 0.01), ("error", 31.0)):
        recorder.request("koodrive", code, seconds)
    now = datetime.now(UTC)
    task = ClaimedTask(1, "aicc", "t", None, 0, 0, now)
    event = Event(EventKind.TRACE, "k", None, {})
    results = [
        PollResult(task, now, now),  # unchanged
        PollResult(task, now, now, content_hash="h", events=[event, event]),  # changed
        PollResult(task, now, now, error="HTTP 500"),
        PollResult(task, now, now, error="HTTP 404", not_found=True),
        PollResult(task, now, now, deferred=True),  # nothing sent: not a poll
    ]
    recorder.polls_written(results)
    recorder.action_finished("secmaster", "comment", "unknown")
    recorder.cycle_ended("sync", 1.5)
    body, content_type = recorder.exposition(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = parse(body.decode())
    assert total(samples, "tasksync_upstream_requests_total", system="koodrive") == 4
    assert total(samples, "tasksync_upstream_requests_total", code="error") == 1
    assert total(samples, "tasksync_upstream_throttled_total", system="koodrive") == 1
    buckets = {
        dict(ls)["le"]: v
        for (n, ls), v in samples.items()
        if n == "tasksync_upstream_request_duration_seconds_bucket"
        and dict(ls)["system"] == "koodrive"
    }
    assert (buckets["0.005"], buckets["0.01"], buckets["0.25"], buckets["30.0"]) == (1, 2, 3, 3)
    assert buckets["+Inf"] == 4
    for outcome in ("unchanged", "changed", "failed", "not_found"):
        assert total(samples, "tasksync_polls_total", system="aicc", outcome=outcome) == 1
    assert total(samples, "tasksync_snapshots_stored_total", system="aicc") == 1
    assert total(samples, "tasksync_events_stored_total", system="aicc", kind="trace") == 2
    assert total(samples, "tasksync_action_attempts_total", outcome="unknown") == 1
    assert total(samples, "tasksync_cycle_duration_seconds_sum", kind="sync") == 1.5
    # series that must exist before their first event (rate() and the alerts need them)
    assert (
        "tasksync_polls_total",
        frozenset({("system", "secmaster"), ("outcome", "failed")}),
    ) in samples
    om, om_type = recorder.exposition("application/openmetrics-text; version=1.0.0")
    assert om_type.startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")
    checked = subprocess.run(
        [promtool(), "check", "metrics"], input=body.decode(), capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@SQLITE_ONLY
async def test_readyz_turns_503_while_the_daemon_drains(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=5, tasks_per_system=2, faults="slow=1.0,slow-seconds=60") as sb:
        await track_all(store, sb)
        env = metrics_env(database, TASKSYNC_WORKER__SHUTDOWN_TIMEOUT="4s")
        async with daemon(tmp_path, sb, env) as proc:
            url = await base_url(proc)
            with anyio.fail_after(30):
                while sb.requests.total < 3:  # the cycle is stuck in slow requests
                    await anyio.sleep(0.1)
            assert (await get(url + "/readyz"))[0] == 200
            proc.signal(signal.SIGTERM)
            body = await wait_for(url + "/readyz", 503, 3)
            assert body.strip() == "shutdown: stopping: finishing in-flight work"
            assert (await get(url + "/livez"))[0] == 200  # draining is not dead
            assert await proc.wait(30) == 0, proc.output


@SQLITE_ONLY
async def test_throttling_is_counted_as_the_gateway_answered_it(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=7, tasks_per_system=TASKS_PER_SYSTEM, throttle="koodrive=4/1s") as sb:
        await store.track("koodrive", sb.task_ids("koodrive"))
        env = metrics_env(database, TASKSYNC_WORKER__SYNC_SCHEDULE="1h")
        async with daemon(tmp_path, sb, env) as proc:
            url = await base_url(proc)
            with anyio.fail_after(60):
                while await finished_cycles(store) < 1:
                    await anyio.sleep(0.1)
            samples = parse((await get(url + "/metrics"))[2])
            refused = sb.gateway.refused["koodrive"]
            assert refused > 0  # 12 tasks at 4 per second: the gateway said no at least once
            assert total(samples, "tasksync_upstream_throttled_total", system="koodrive") == refused
            assert (
                total(samples, "tasksync_upstream_requests_total", system="koodrive", code="429")
                == refused
            )
            assert total(samples, "tasksync_upstream_requests_total") == sb.requests.total
            polls = total(samples, "tasksync_polls_total", system="koodrive")
            assert polls == await scalar(
                store, "SELECT count(*) FROM tasks WHERE last_polled_at IS NOT NULL"
            )
            proc.signal(signal.SIGTERM)
            assert await proc.wait(30) == 0, proc.output
