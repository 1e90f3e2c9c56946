"""Contract: the tables, filled against an independent simulator, on both databases.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.support.contract import (
    AICC_IDS,
    js,
    now,
    parallel,
    query,
    seed_sim,
    sim_workspace,
    ts,
)
from tests.support.contract_sim import (
    ContractSim,
)
from tests.support.db import Database

EXPECTED_STATE = {
    ("aicc", "Pending"): "open",
    ("aicc", "Processing"): "in_progress",
    ("aicc", "Completed"): "done",
    ("aicc", "Reopened"): "unknown",
    ("secmaster", "waiting"): "open",
    ("secmaster", "finished"): "done",
    ("secmaster", "canceled"): "canceled",
    ("secmaster", "archived"): "unknown",
    ("koodrive", "0"): "open",
    ("koodrive", "1"): "in_progress",
    ("koodrive", "2"): "done",
    ("koodrive", "3"): "failed",
    ("koodrive", "7"): "unknown",
}


def test_tables_snapshots_and_history(tmp_path: Path, pg_database: Database | None) -> None:
    """The whole history flow on SQLite and PostgreSQL at once (two simulators, two threads)."""
    flows = [("sqlite", f"sqlite:///{tmp_path / 'sqlite' / 'h.db'}")]
    if pg_database is not None:
        flows.append(("postgres", pg_database.url))

    def flow(kind: str, url: str) -> None:
        d = tmp_path / kind
        d.mkdir()
        sim = ContractSim().start()
        try:
            _tables_flow(Database(kind, url), d, sim)
        finally:
            sim.stop()

    parallel([lambda f=f: flow(*f) for f in flows])
    if pg_database is None:
        pytest.skip("the PostgreSQL half needs TASKSYNC_TEST_POSTGRES_URL (the SQLite half passed)")


def _tables_flow(database: Database, tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, database.url)
    ws.ok("migrate")
    if database.kind == "postgres":
        ws.ok("migrate")  # safe to repeat (SQLite: test_sql_queued_actions migrates a used file)
    # discover with no SYSTEM: every configured system with a list endpoint (not KooDrive)
    ws.ok("discover", "--quiet")
    kd_ids = sorted(sim.koodrive)
    ws.ok("track", "koodrive", *kd_ids)
    if database.kind == "sqlite":
        ws.ok("track", "koodrive", *kd_ids)  # idempotent
    tracked = ws.q("SELECT system, task_id, tracked FROM tasks ORDER BY system, task_id")
    assert sorted((r["system"], r["task_id"]) for r in tracked) == sorted(
        [("aicc", i) for i in sim.aicc]
        + [("secmaster", i) for i in sim.secmaster]
        + [("koodrive", i) for i in kd_ids]
    )
    assert all(r["tracked"] in (True, 1) for r in tracked)

    before = now()
    r = ws.ok("sync", "--quiet")
    assert r.stdout.strip() == "", "--quiet prints nothing but errors"
    after = now()

    # -- tasks: status as text, state normalised per docs/upstream.md, title, timestamps UTC
    rows = {(r["system"], r["task_id"]): r for r in ws.q("SELECT * FROM tasks")}
    for (system, _task_id), row in rows.items():
        assert row["last_error"] is None and row["consecutive_failures"] == 0, row
        status = row["status"]
        assert isinstance(status, str), row
        assert EXPECTED_STATE[(system, status)] == row["state"], row
        assert row["content_hash"]
        first_seen, polled = ts(row["first_seen_at"]), ts(row["last_polled_at"])
        assert first_seen is not None and polled is not None
        assert before - dt.timedelta(seconds=60) <= first_seen <= after, row
        assert before - dt.timedelta(seconds=2) <= polled <= after + dt.timedelta(seconds=2), row
        assert ts(row["next_poll_at"]) > after, "a polled task is not due again at once"
    assert rows[("aicc", AICC_IDS[0])]["title"] == "aicc Pending"
    assert rows[("secmaster", "sm-waiting")]["title"] == "sm waiting"
    assert rows[("koodrive", "kd-3")]["title"] == "contract transfer"

    # -- task_snapshots: one each; payload = AICC `result`, SecMaster `data`, KooDrive body
    snaps = ws.q("SELECT * FROM task_snapshots ORDER BY id")
    assert len(snaps) == len(rows)
    for s in snaps:
        key = (s["system"], s["task_id"])
        expected = {"aicc": sim.aicc, "secmaster": sim.secmaster, "koodrive": sim.koodrive}[
            s["system"]
        ][s["task_id"]]
        assert js(s["payload"]) == expected, key
        assert s["status"] == rows[key]["status"] and s["state"] == rows[key]["state"]
        assert s["content_hash"] == rows[key]["content_hash"]
        assert ts(s["fetched_at"]) is not None

    # -- first observation: no status_changed event
    assert ws.q("SELECT * FROM task_events WHERE kind = 'status_changed'") == []

    # -- sync_runs: one row for the cycle with its counts
    runs = ws.q("SELECT * FROM sync_runs ORDER BY id")
    sync_runs = [r for r in runs if r.get("kind", "sync") == "sync"]
    assert len(sync_runs) == 1
    assert sync_runs[0]["polled"] == len(rows) and sync_runs[0]["failed"] == 0
    assert sync_runs[0]["worker"] and ts(sync_runs[0]["finished_at"]) is not None

    # -- upstream changes
    a0 = AICC_IDS[0]
    same = {
        "creatorId": "u2",
        "creatorName": "u2",
        "description": "same words",
        "relatedId": None,
        "title": "same",
        "type": "StatusUpdate",
    }
    with sim.lock:
        sim.aicc[a0]["taskInfo"]["status"] = "Processing"
        sim.aicc[a0]["taskTrace"] += [dict(same), dict(same)]  # no ids: position + content
        sm = sim.secmaster["sm-waiting"]
        sm["comments"].append(
            {
                "id": "c-1",
                "message": "hello",
                "user_id": "u",
                "user_name": "n",
                "time": 1755586422424,
            }
        )
        sm["attachment_id_list"].append("att-1")
        sim.koodrive["kd-1"]["status"] = 3
        sim.koodrive["kd-1"]["resultCode"] = "18000205"
    ws.ok("sync", "--all", "--quiet")

    ev = ws.events("aicc", a0)
    status_changes = [e for e in ev if e["kind"] == "status_changed"]
    assert len(status_changes) == 1
    traces = [js(e["data"]) for e in ev if e["kind"] == "trace"]
    assert sum(1 for t in traces if t.get("title") == "same") == 2, traces
    assert {e["system"] for e in ev} == {"aicc"} and {e["task_id"] for e in ev} == {a0}
    assert all(ts(e["observed_at"]) is not None for e in ev)
    smev = [e["kind"] for e in ws.events("secmaster", "sm-waiting")]
    assert sorted(smev) == ["attachment_added", "comment_added"], smev
    kdev = ws.events("koodrive", "kd-1")
    assert [e["kind"] for e in kdev] == ["status_changed"]
    assert ws.task("aicc", a0)["state"] == "in_progress"
    assert ws.task("koodrive", "kd-1")["state"] == "failed"
    # one snapshot per distinct content
    counts = {
        (r["system"], r["task_id"]): r["n"]
        for r in ws.q(
            "SELECT system, task_id, count(*) AS n FROM task_snapshots GROUP BY system, task_id"
        )
    }
    assert counts[("aicc", a0)] == 2 and counts[("secmaster", "sm-waiting")] == 2
    assert counts[("koodrive", "kd-1")] == 2 and counts[("aicc", AICC_IDS[1])] == 1

    # -- removals and a status change on SecMaster
    with sim.lock:
        sm = sim.secmaster["sm-waiting"]
        sm["comments"] = []
        sm["attachment_id_list"] = []
        sm["status"] = "canceled"
    ws.ok("sync", "--all", "--quiet")
    n_before = ws.q("SELECT count(*) AS n FROM task_events")[0]["n"]
    s_before = ws.q("SELECT count(*) AS n FROM task_snapshots")[0]["n"]
    ws.ok("sync", "--all", "--quiet")  # a repeated cycle adds nothing
    assert ws.q("SELECT count(*) AS n FROM task_events")[0]["n"] == n_before
    assert ws.q("SELECT count(*) AS n FROM task_snapshots")[0]["n"] == s_before
    smev = sorted(e["kind"] for e in ws.events("secmaster", "sm-waiting"))
    assert smev == [
        "attachment_added",
        "attachment_removed",
        "comment_added",
        "comment_removed",
        "status_changed",
    ], smev
    change = js(ws.events("secmaster", "sm-waiting", "status_changed")[0]["data"])
    assert "waiting" in json.dumps(change) and "canceled" in json.dumps(change)
    assert ws.task("secmaster", "sm-waiting")["state"] == "canceled"
    # sync_runs: one per cycle (plus whatever discover records), counts per cycle
    sync_runs = [
        r for r in ws.q("SELECT * FROM sync_runs ORDER BY id") if r.get("kind", "sync") == "sync"
    ]
    assert len(sync_runs) == 4
    assert [r["polled"] for r in sync_runs] == [len(rows)] * 4
    assert [r["changed"] for r in sync_runs][1:] == [3, 1, 0]

    # -- untrack keeps history and stops polling; show still works
    ws.ok("untrack", "secmaster", "sm-waiting")
    if database.kind == "sqlite":
        ws.ok("untrack", "secmaster", "sm-waiting")  # idempotent
    assert ws.task("secmaster", "sm-waiting")["tracked"] in (False, 0)
    n_events = len(ws.events("secmaster", "sm-waiting"))
    seen = len(sim.requests("GET", "/soc/tasks/sm-waiting"))
    ws.ok("sync", "--all", "--quiet")
    assert len(sim.requests("GET", "/soc/tasks/sm-waiting")) == seen
    assert len(ws.events("secmaster", "sm-waiting")) == n_events
    shown = json.loads(ws.ok("show", "secmaster", "sm-waiting", "--json").stdout)
    assert isinstance(shown, dict)
    assert "comment_removed" in json.dumps(shown)


def test_json_columns_and_utc_timestamps_on_postgres(tmp_path: Path, database: Database) -> None:
    """JSON columns are JSONB on PostgreSQL; every table carries system and task_id."""
    if database.kind != "postgres":
        cols = {
            t: {r["name"] for r in query(database.url, f"PRAGMA table_info({t})")}
            for t in (
                "tasks",
                "task_snapshots",
                "task_events",
                "actions",
                "action_attempts",
                "sync_runs",
            )
        }
    else:
        rows = query(
            database.url,
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'",
        )
        cols = {}
        for r in rows:
            cols.setdefault(r["table_name"], set()).add(r["column_name"])
        types = {(r["table_name"], r["column_name"]): r["data_type"] for r in rows}
        for key in [
            ("task_snapshots", "payload"),
            ("task_events", "data"),
            ("actions", "params"),
            ("actions", "result"),
        ]:
            assert types[key] == "jsonb", (key, types[key])
    required = {
        "tasks": "system task_id tracked status state title content_hash first_seen_at "
        "last_polled_at last_changed_at next_poll_at last_error consecutive_failures",
        "task_snapshots": "id system task_id fetched_at content_hash status state payload",
        "task_events": "id system task_id kind occurred_at observed_at data",
        "actions": "id system task_id kind params status attempts max_attempts next_attempt_at "
        "idempotency_key last_error result created_at updated_at finished_at",
        "action_attempts": "id action_id started_at finished_at outcome http_status error worker",
        "sync_runs": "id worker started_at finished_at polled changed failed",
    }
    for table, names in required.items():
        missing = set(names.split()) - cols[table]
        assert not missing, (table, missing)
