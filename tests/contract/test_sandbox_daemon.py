"""Contract: every auth mode against the sandbox, the sandbox command, the daemon, the demo.
the daemon and the demo.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import spawn_cli
from tests.support.contract import (
    AICC_IDS,
    FAST_RETRY,
    ThreadedSandbox,
    Workspace,
    js,
    make_workspace,
    ok,
    parallel,
    query,
    seed_sim,
    sim_workspace,
    tasksync,
)
from tests.support.contract_sim import (
    AICC_PREFIX,
    SECMASTER_PREFIX,
    Canned,
    ContractSim,
)

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

    config = tmp_path / "sandbox.toml"
    writer = spawn_cli(
        "sandbox",
        "--port",
        "0",
        "--write-config",
        str(config),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    printer = spawn_cli(
        "sandbox",
        "--port",
        "0",
        cwd=tmp_path,
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
    log = tmp_path / "run.log"  # a file, not a pipe: a full pipe would block the daemon
    with log.open("w") as sink:
        proc = spawn_cli(
            "--config",
            str(ws.config),
            "run",
            cwd=tmp_path,
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
