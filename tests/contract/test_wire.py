"""Contract: wire variants the documents allow, failures that cost one task only, sync's exit.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.contract import (
    AICC_IDS,
    now,
    ok,
    parallel,
    query,
    seed_sim,
    sim_workspace,
    tasksync,
    ts,
)
from tests.support.contract_sim import (
    AICC_PREFIX,
    Canned,
    ContractSim,
    aicc_task,
    koodrive_task,
    secmaster_task,
)
from tests.support.db import Database


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
