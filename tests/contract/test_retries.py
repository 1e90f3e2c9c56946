"""Contract: retries, permanent failures, cancel and retry.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from tests.support.contract import (
    AICC_IDS,
    now,
    ok,
    parallel,
    seed_sim,
    sim_workspace,
    ts,
)
from tests.support.contract_sim import (
    AICC_PREFIX,
    SECMASTER_PREFIX,
    Canned,
    ContractSim,
)

GATEWAY_BUSY = {"error_code": "APIGW.0308", "error_msg": "throttled", "request_id": "r"}


def test_retryable_and_permanent_outcomes(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        f"sqlite:///{tmp_path / 'r.db'}",
        extra='[retry]\nmax_attempts = 5\nbase_delay = "10m"\nmax_delay = "1h"\n',
    )
    a0 = AICC_IDS[0]
    ws.ok("migrate")
    sim.push("POST " + AICC_PREFIX + "/process", Canned(503, {"resCode": "503", "resMsg": "busy"}))
    sim.push("PUT " + SECMASTER_PREFIX + "/sm-waiting", Canned(429, GATEWAY_BUSY))
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-finished",
        Canned(400, {"code": "SecMaster.20030001", "message": "bad parameter"}),
    )
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-archived",
        Canned(429, GATEWAY_BUSY, headers={"Retry-After": "300"}),
    )
    jobs = [  # queued by SQL (the CLI path is covered above); never synced: apply reads them once
        ("aicc", a0, "process", '{"title": "t", "description": "d"}'),
        ("secmaster", "sm-waiting", "comment", '{"comment": "throttled"}'),
        ("secmaster", "sm-finished", "comment", '{"comment": "refused"}'),
        ("secmaster", "sm-archived", "comment", '{"comment": "retry-after"}'),
        ("secmaster", "sm-archived", "comment", '{"comment": "queued behind"}'),
    ]
    for job in jobs:
        ws.x(
            "INSERT INTO actions (system, task_id, kind, params) VALUES ({})".format(
                ", ".join(f"'{v}'" for v in job)
            )
        )
    ids = [r["id"] for r in ws.q("SELECT id FROM actions ORDER BY id")]
    t0 = now()
    ws.ok("apply")
    busy, throttled, refused, later, behind = (ws.action(i) for i in ids)
    for a in (busy, throttled, later):
        assert a["status"] == "pending", a
        assert a["attempts"] == 1, a
        assert ts(a["next_attempt_at"]) > t0 + dt.timedelta(seconds=5), a
        assert a["last_error"], a
    assert refused["status"] == "failed" and refused["attempts"] == 1 and refused["last_error"]
    # Retry-After is honoured (300 s, below max_delay)
    wait = (ts(later["next_attempt_at"]) - t0).total_seconds()
    assert 280 <= wait <= 3700, wait
    # the action queued behind a pending one on the same task waits its turn
    assert behind["status"] == "pending" and behind["attempts"] == 0
    assert [s.body["comment"] for s in sim.requests("PUT", "/sm-archived")] == ["retry-after"]
    attempts = {a["action_id"]: a for a in ws.q("SELECT * FROM action_attempts")}
    assert attempts[ids[0]]["http_status"] == 503 and attempts[ids[0]]["outcome"] in (
        "retry",
        "unknown",
    )
    assert attempts[ids[1]]["http_status"] == 429 and attempts[ids[1]]["outcome"] == "retry"
    assert attempts[ids[2]]["http_status"] == 400 and attempts[ids[2]]["outcome"] == "failed"
    assert all(ts(a["started_at"]) and ts(a["finished_at"]) for a in attempts.values())

    # apply again: nothing is due, nothing is sent
    sent = len(sim.seen)
    ws.ok("apply")
    assert len([s for s in sim.seen[sent:] if s.method != "GET"]) == 0

    # cancel: only pending; retry: only failed, back in the queue
    ok(ws.run("cancel", str(ids[4])))
    assert ws.action(ids[4])["status"] == "canceled"
    for r in parallel(
        [
            lambda: ws.run("cancel", str(ids[4])),
            lambda: ws.run("cancel", str(ids[2])),
            lambda: ws.run("retry", str(ids[1])),
            lambda: ws.run("cancel", "999999"),
        ]
    ):
        assert r.returncode == 1, (r.args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    ok(ws.run("retry", str(ids[2])))
    requeued = ws.action(ids[2])
    assert requeued["status"] == "pending"
    ws.ok("apply")  # the simulator now accepts it
    assert ws.action(ids[2])["status"] == "succeeded"
    failed = json.loads(ws.ok("actions", "--status", "failed", "--json").stdout)
    assert failed == []


# a Retry-After longer than retry.max_delay is honoured: the server's wait wins over our cap
def test_retry_after_longer_than_max_delay_is_honoured(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path,
        sim,
        f"sqlite:///{tmp_path / 'ra.db'}",
        extra='[retry]\nbase_delay = "1s"\nmax_delay = "30s"\n',
    )
    sim.push(
        "PUT " + SECMASTER_PREFIX + "/sm-waiting",
        Canned(429, GATEWAY_BUSY, headers={"Retry-After": "600"}),
    )
    action = ws.ok("enqueue", "secmaster", "sm-waiting", "comment", "--comment", "x").stdout
    t0 = now()
    ws.ok("apply")
    a = ws.action(action)
    assert a["status"] == "pending"
    assert (ts(a["next_attempt_at"]) - t0).total_seconds() >= 590, a["next_attempt_at"]
