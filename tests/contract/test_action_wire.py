"""Contract: what actions put on the wire; idempotency keys, order, effects, rows queued by SQL.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.contract import (
    AICC_IDS,
    js,
    now,
    parallel,
    seed_sim,
    sim_workspace,
    ts,
)
from tests.support.contract_sim import (
    CREATOR_ID,
    SECMASTER_PREFIX,
    Canned,
    ContractSim,
)
from tests.support.db import Database


def test_every_action_reaches_the_wire_as_documented(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'a.db'}")
    a0, a1 = AICC_IDS[0], AICC_IDS[1]
    with sim.lock:
        sim.secmaster["sm-waiting"]["comments"].append(
            {"id": "old-comment", "message": "old", "user_id": "u", "user_name": "n", "time": 1}
        )
        sim.secmaster["sm-waiting"]["attachment_id_list"].append("old-att")
    groups = [
        # per task, queued in order (the order of queueing is the order of applying)
        [
            ["secmaster", "sm-waiting", "comment", "--comment", "first"],
            ["secmaster", "sm-waiting", "delete-comment", "--comment-id", "old-comment"],
            ["secmaster", "sm-waiting", "add-attachment", "--attachment-id", "new-att"],
            ["secmaster", "sm-waiting", "delete-attachment", "--attachment-id", "old-att"],
            ["secmaster", "sm-waiting", "comment", "--comment", "last"],
            ["secmaster", "sm-waiting", "terminate"],
        ],
        [
            ["aicc", a0, "process", "--title", "T1", "--description", "D1"],
            [
                "aicc",
                a0,
                "process",
                "--title",
                "T2",
                "--description",
                "D2",
                "--type",
                "Other",
                "--attachment",
                "report.pdf",
                "--creator-id",
                "10gg0000000000000001",
            ],
            ["secmaster", "sm-finished", "continue"],
        ],
        [  # idempotency key: the second enqueue prints the first id and creates nothing
            ["aicc", a1, "process", "--title", "K", "--description", "K", "--key", "ticket-42"],
            ["aicc", a1, "process", "--title", "other", "--description", "x", "--key", "ticket-42"],
        ],
    ]

    def queue(group: list[list[str]]) -> list[str]:
        return [ws.ok("enqueue", *argv).stdout for argv in group]

    outs = parallel([lambda g=g: queue(g) for g in groups])
    for out in [o for group in outs for o in group]:
        assert out.strip().isdigit() and out.endswith("\n") and out.count("\n") == 1, out
    ids = [int(o) for o in outs[0] + outs[1]]
    assert ids[:6] == sorted(ids[:6]) and ids[6:] == sorted(ids[6:])
    assert len(set(ids)) == len(ids)
    keyed, again = outs[2]
    assert keyed == again
    assert (
        ws.q("SELECT count(*) AS n FROM actions WHERE idempotency_key = 'ticket-42'")[0]["n"] == 1
    )
    # enqueue started tracking every task it named: they are polled at the next cycle
    tracked = {(r["system"], r["task_id"]) for r in ws.q("SELECT * FROM tasks WHERE tracked")}
    assert tracked == {
        ("aicc", a0),
        ("aicc", a1),
        ("secmaster", "sm-waiting"),
        ("secmaster", "sm-finished"),
    }
    ws.ok("sync", "--quiet")  # stores the pre-existing comment and attachment
    assert ws.action(keyed)["status"] == "pending"

    sim.seen.clear()
    r = ws.ok("apply")
    statuses = {r["id"]: r["status"] for r in ws.q("SELECT id, status FROM actions")}
    assert set(statuses.values()) == {"succeeded"}, (statuses, r.stderr)

    process = [s.body for s in sim.requests("POST", "/openapi/task/process")]
    by_title = {b["processInfo"]["title"]: b for b in process}
    assert by_title["T1"] == {
        "taskId": a0,
        "creatorId": CREATOR_ID,
        "processInfo": {"type": "Iternal", "title": "T1", "description": "D1"},
    }
    assert by_title["T2"] == {
        "taskId": a0,
        "creatorId": "10gg0000000000000001",
        "processInfo": {
            "type": "Other",
            "title": "T2",
            "description": "D2",
            "attachment": "report.pdf",
        },
    }
    assert [b["processInfo"]["title"] for b in process if b["taskId"] == a0] == ["T1", "T2"]
    puts = [s.body for s in sim.requests("PUT", "/soc/tasks/sm-waiting")]
    assert puts == [
        {"action": "ADD_COMMENT", "comment": "first"},
        {"action": "DELETE_COMMENT", "comment_id": "old-comment"},
        {"action": "ADD_ATTACHMENT", "attachment_id": "new-att"},
        {"action": "DELETE_ATTACHMENT", "attachment_id": "old-att"},
        {"action": "ADD_COMMENT", "comment": "last"},
        {"action": "TERMINATE"},
    ]
    assert [s.body for s in sim.requests("PUT", "/soc/tasks/sm-finished")] == [
        {"action": "CONTINUE"}
    ]
    # every attempt recorded
    attempts = ws.q("SELECT * FROM action_attempts ORDER BY id")
    assert len(attempts) == len(ids) + 1
    assert {a["outcome"] for a in attempts} == {"succeeded"}
    assert all(a["http_status"] == 200 and a["worker"] for a in attempts)
    done = ws.action(ids[0])
    assert done["attempts"] == 1 and ts(done["finished_at"]) is not None

    # the effect appears after the next (plain) sync: applied tasks are due again
    ws.ok("sync", "--quiet")
    kinds = [e["kind"] for e in ws.events("secmaster", "sm-waiting")]
    for kind in (
        "comment_added",
        "comment_removed",
        "attachment_added",
        "attachment_removed",
        "status_changed",
    ):
        assert kind in kinds, kinds
    assert ws.task("secmaster", "sm-waiting")["state"] == "canceled"
    assert ws.task("secmaster", "sm-finished")["status"] == "finished"
    titles = [js(e["data"]).get("title") for e in ws.events("aicc", a0, "trace")]
    assert titles[-2:] == ["T1", "T2"]

    # actions / show in JSON
    listed = json.loads(ws.ok("actions", "--json").stdout)
    assert {a["id"] for a in listed} == set(ids) | {int(keyed)}
    # the human forms, the global --log-level option, and an unknown task (exit 1)
    status, show, actions, unknown = parallel(
        [
            lambda: ws.run("--log-level", "warning", "status"),
            lambda: ws.run("show", "aicc", a0),
            lambda: ws.run("actions", "--status", "succeeded"),
            lambda: ws.run("show", "aicc", "ccqG00000000nosuch00"),
        ]
    )
    for r in (status, show, actions):
        assert r.returncode == 0 and r.stdout.strip(), (r.args, r.stderr)
    assert "T2" in show.stdout and "sm-waiting" in actions.stdout
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1


def test_sql_queued_actions_get_defaults_and_invalid_rows_fail(
    database: Database, tmp_path: Path, sim: ContractSim
) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        database.url,
        extra='[retry]\nmax_attempts = 1\nbase_delay = "1h"\nmax_delay = "2h"\n',
    )
    ws.ok("migrate")
    t0 = now()
    rows = [
        ("secmaster", "sm-waiting", "comment", '{"comment": "checked"}'),
        ("aicc", AICC_IDS[0], "process", '{"title": "sql", "description": "queued by SQL"}'),
        ("secmaster", "sm-waiting", "explode", "{}"),
        ("secmaster", "sm-finished", "comment", "{}"),
        ("koodrive", "kd-0", "comment", '{"comment": "x"}'),
        ("nosuch", "x", "comment", '{"comment": "x"}'),
        ("aicc", AICC_IDS[1], "process", '{"title": "' + "t" * 129 + '", "description": "d"}'),
        ("secmaster", "sm-canceled", "comment", '{"comment": 5}'),
    ]
    for system, task_id, kind, params in rows:
        ws.x(
            "INSERT INTO actions (system, task_id, kind, params) "
            f"VALUES ('{system}', '{task_id}', '{kind}', '{params}')"
        )
    fresh = ws.q("SELECT * FROM actions ORDER BY id")
    for a in fresh:
        assert a["status"] == "pending" and a["attempts"] == 0 and a["max_attempts"] is None, a
        assert abs((ts(a["next_attempt_at"]) - t0).total_seconds()) < 120, a
        assert ts(a["created_at"]) is not None and ts(a["updated_at"]) is not None
        assert a["idempotency_key"] is None and a["finished_at"] is None
    # a SQL row with max_attempts NULL uses retry.max_attempts (= 1 here)
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-waiting",
        Canned(503, {"error_code": "APIGW.0308", "error_msg": "busy", "request_id": "r"}),
    )
    r = ws.ok("apply")
    got = {(a["system"], a["task_id"], a["kind"]): a for a in ws.q("SELECT * FROM actions")}
    ok_row = got[("aicc", AICC_IDS[0], "process")]
    assert ok_row["status"] == "succeeded", ok_row
    retried = got[("secmaster", "sm-waiting", "comment")]
    assert retried["status"] == "failed" and retried["attempts"] == 1, retried
    assert retried["last_error"]
    for key in [
        ("secmaster", "sm-waiting", "explode"),
        ("secmaster", "sm-finished", "comment"),
        ("koodrive", "kd-0", "comment"),
        ("nosuch", "x", "comment"),
        ("aicc", AICC_IDS[1], "process"),
        ("secmaster", "sm-canceled", "comment"),
    ]:
        a = got[key]
        assert a["status"] == "failed", (key, a)
        assert a["last_error"], (key, a)
    assert "explode" in got[("secmaster", "sm-waiting", "explode")]["last_error"]
    assert "koodrive" in got[("koodrive", "kd-0", "comment")]["last_error"].lower()
    # nothing invalid reached the upstream
    assert [s.body for s in sim.requests("PUT")] == [
        {"action": "ADD_COMMENT", "comment": "checked"}
    ]
    assert "Traceback" not in r.stderr
