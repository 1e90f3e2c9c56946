"""The sandbox simulators over real sockets: routes, wire shapes, auth checks, faults, effects."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from worker.config import load_config
from worker.sandbox import CREDENTIALS as C
from worker.sandbox import FaultSpec, Sandbox
from worker.sandbox.state import SandboxState
from worker.upstreams.signing import format_date, sign_app, sign_sdk

pytestmark = pytest.mark.anyio

AICC = "/service/AICC__Case/1.0.0/openapi/task"
SM = f"/v1/{C.project_id}/workspaces/{C.workspace_id}/soc/tasks"
APIGW_401 = "APIGW.0301"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with Sandbox(seed=7, tasks_per_system=12) as sandbox:
        yield sandbox


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: a dropped connection must never be retried silently by aiohttp.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def body_of(response: aiohttp.ClientResponse) -> Any:
    return orjson.loads(await response.read())


async def aicc_token(sb: Sandbox, http: aiohttp.ClientSession) -> str:
    form = {"grant_type": "client_credentials", "client_id": C.client_id}
    form["client_secret"] = C.client_secret
    async with http.post(sb.base_url + "/baas/auth/v1.0/oauth2/token", data=form) as r:
        assert r.status == 200
        token: str = (await body_of(r))["access_token"]
        return token


def sm_signed(
    method: str, url: str, body: bytes = b"", *, date: str | None = None, **extra: str
) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Project-Id": C.project_id, **extra}
    return sign_sdk(method, url, headers, body, C.ak, C.sk, date=date)


async def sm_put(
    sb: Sandbox, http: aiohttp.ClientSession, task_id: str, payload: dict[str, str]
) -> tuple[int, Any]:
    url = f"{sb.base_url}{SM}/{task_id}"
    body = orjson.dumps(payload)
    async with http.put(url, data=body, headers=sm_signed("PUT", url, body)) as r:
        return r.status, await body_of(r)


async def sm_get(sb: Sandbox, http: aiohttp.ClientSession, suffix: str) -> tuple[int, Any]:
    url = f"{sb.base_url}{SM}{suffix}"
    async with http.get(url, headers=sm_signed("GET", url)) as r:
        return r.status, await body_of(r)


def kd_url(sb: Sandbox, task_id: str) -> str:
    return f"{sb.base_url}/koodrive/ose/v1/task/{task_id}"


KD_BEARER = {"Authorization": "Bearer " + C.koodrive_token}


# --- pure parts -------------------------------------------------------------------------------


def test_fault_spec_round_trip() -> None:
    text = "500=0.1,429=0.05,429-no-retry-after=0.02,slow=0.05,drop=0.03,malformed=0.02,expire=300,slow-seconds=3"
    spec = FaultSpec.parse(text)
    assert spec.error_500 == 0.1 and spec.throttle_no_retry_after == 0.02
    assert spec.expire == 300 and spec.slow_seconds == 3
    assert FaultSpec.parse(str(spec)) == spec
    assert FaultSpec.parse("") == FaultSpec() and not FaultSpec().active


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("500=0.1,bogus=0.2", "bogus"),
        ("500", "500"),
        ("drop=abc", "drop=abc"),
        ("slow=1.5", "slow"),
        ("500=0.6,429=0.6", "more than 1"),
        ("expire=0", "expire"),
        ("expire=1.5", "expire=1.5"),
    ],
)
def test_fault_spec_rejects_bad_items(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        FaultSpec.parse(text)


def test_seeding_is_deterministic_and_realistic() -> None:
    a = SandboxState(seed_value=3, tasks_per_system=50, credentials=C)
    b = SandboxState(seed_value=3, tasks_per_system=50, credentials=C)
    other = SandboxState(seed_value=4, tasks_per_system=50, credentials=C)
    for system in ("aicc", "secmaster", "koodrive"):
        assert a.task_ids(system) == b.task_ids(system)
        assert a.task_ids(system) != other.task_ids(system)
        assert len(set(a.task_ids(system))) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9]{20}", i) for i in a.task_ids("aicc"))
    assert all(str(uuid.UUID(i)) == i for i in a.task_ids("secmaster"))
    assert all(re.fullmatch(r"[1-9]\d{18}", i) for i in a.task_ids("koodrive"))
    for ta, tb in zip(a.aicc, b.aicc, strict=True):
        assert a.aicc_body(ta) == b.aicc_body(tb)
    aicc_sizes = [len(a.aicc_body(t)) for t in a.aicc]
    sm_sizes = [len(a.secmaster_data(t)) for t in a.secmaster]
    assert min(aicc_sizes) >= 2800 and max(aicc_sizes) <= 4500
    assert min(sm_sizes) >= 1100 and max(sm_sizes) <= 2200
    statuses = Counter(t.status for t in a.aicc)
    assert set(statuses) <= {"Pending", "Processing", "Completed"} and statuses["Pending"] > 0


# --- AICC -----------------------------------------------------------------------------------


async def test_aicc_token_and_detail(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    url = sb.base_url + "/baas/auth/v1.0/oauth2/token"
    form = {"grant_type": "client_credentials", "client_id": C.client_id}
    async with http.post(url, data={**form, "client_secret": "wrong"}) as r:
        assert r.status == 401 and (await body_of(r))["resCode"] != "0"
    async with http.post(url, data={**form, "grant_type": "password"}) as r:
        assert r.status == 400
    async with http.post(url, data={**form, "client_secret": C.client_secret}) as r:
        token_body = await body_of(r)
    assert token_body["expires_in"] == 7200 and token_body["token_type"] == "Bearer"
    task_id = sb.task_ids("aicc")[0]
    headers = {"access-token": token_body["access_token"]}
    async with http.get(f"{sb.base_url}{AICC}/{task_id}", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json%3Bcharset=UTF-8"
        body = await body_of(r)
    assert body["resCode"] == "0" and body["resMsg"] == "成功"
    result = body["result"]
    assert set(result) == {"taskInfo", "taskTrace", "customerInfo", "caseInfos"}
    assert result["taskInfo"]["id"] == task_id
    assert result["taskTrace"][0]["type"] == "CreateTask"
    assert result == sb.payload("aicc", task_id)
    async with http.get(f"{sb.base_url}{AICC}/ccqGmissing000000000", headers=headers) as r:
        assert r.status == 404
        assert await body_of(r) == {"resCode": "404", "resMsg": "task not found"}
    assert sb.requests.detail[("aicc", task_id)] == 1


@pytest.mark.parametrize("token", [None, "forged"])
async def test_aicc_rejects_missing_or_forged_token(
    sb: Sandbox, http: aiohttp.ClientSession, token: str | None
) -> None:
    headers = {} if token is None else {"access-token": token}
    async with http.get(f"{sb.base_url}{AICC}/{sb.task_ids('aicc')[0]}", headers=headers) as r:
        assert r.status == 401
        body = await body_of(r)
    assert body["error_code"] == APIGW_401 and body["request_id"]
    assert body["error_msg"].startswith("Incorrect IAM authentication information")
    assert sb.requests.auth_failures["aicc"] == 1


async def test_aicc_token_expires(http: aiohttp.ClientSession) -> None:
    async with Sandbox(tasks_per_system=2, token_lifetime=0.3) as sb:
        token = await aicc_token(sb, http)
        url = f"{sb.base_url}{AICC}/{sb.task_ids('aicc')[0]}"
        async with http.get(url, headers={"access-token": token}) as r:
            assert r.status == 200
        await anyio.sleep(0.4)
        async with http.get(url, headers={"access-token": token}) as r:
            assert r.status == 401
        token = await aicc_token(sb, http)
        sb.expire_tokens()
        async with http.get(url, headers={"access-token": token}) as r:
            assert r.status == 401


async def test_aicc_process_applies_once(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    task = next(t for t in sb.state.aicc if t.status == "Pending")
    headers = {"access-token": await aicc_token(sb, http)}
    before = sb.payload("aicc", task.id)["taskTrace"]
    info = {"type": "Iternal", "title": "回访", "description": "done", "attachment": "a.pdf"}
    request = {"taskId": task.id, "creatorId": C.creator_id, "processInfo": info}
    async with http.post(f"{sb.base_url}{AICC}/process", json=request, headers=headers) as r:
        assert r.status == 200
        assert await body_of(r) == {"resCode": "0", "resMsg": "Success"}
    after = sb.payload("aicc", task.id)
    assert after["taskInfo"]["status"] == "Processing"
    assert after["taskTrace"][: len(before)] == before
    assert after["taskTrace"][-1] == {
        "creatorId": C.creator_id,
        "creatorName": C.creator_id,
        "description": "done",
        "relatedId": None,
        "title": "回访",
        "type": "StatusUpdate",
    }
    [effect] = sb.applied("aicc")
    assert (effect.task_id, effect.kind, effect.params["title"]) == (task.id, "process", "回访")


@pytest.mark.parametrize(
    "info",
    [
        {"type": "Internal", "title": "t", "description": "d"},
        {"type": "Iternal", "title": "t" * 129, "description": "d"},
        {"type": "Iternal", "title": "t", "description": "d" * 20_001},
        {"type": "Iternal", "title": "t", "description": "d", "attachment": "a" * 256},
        {"type": "Iternal", "description": "d"},
    ],
)
async def test_aicc_process_validates(
    sb: Sandbox, http: aiohttp.ClientSession, info: dict[str, str]
) -> None:
    headers = {"access-token": await aicc_token(sb, http)}
    request = {"taskId": sb.task_ids("aicc")[0], "creatorId": C.creator_id, "processInfo": info}
    async with http.post(f"{sb.base_url}{AICC}/process", json=request, headers=headers) as r:
        assert r.status in (200, 400)
        assert (await body_of(r))["resCode"] != "0"
    assert sb.effects == []


async def test_aicc_list_pages(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    headers = {"access-token": await aicc_token(sb, http)}
    seen: list[str] = []
    for start in range(0, 12, 5):
        query = {"start": start, "limit": 5, "creatorId": C.creator_id}
        async with http.post(f"{sb.base_url}{AICC}/list", json=query, headers=headers) as r:
            result = (await body_of(r))["result"]
        assert result["count"] == 12
        seen += [item["taskId"] for item in result["taskList"]]
    assert seen == sb.task_ids("aicc")
    query = {"start": 0, "limit": 100, "creatorId": C.creator_id, "status": "Pending"}
    async with http.post(f"{sb.base_url}{AICC}/list", json=query, headers=headers) as r:
        result = (await body_of(r))["result"]
    pending = [t.id for t in sb.state.aicc if t.status == "Pending"]
    assert [i["taskId"] for i in result["taskList"]] == pending and result["count"] == len(pending)
    for bad in ({"start": 0, "limit": 0}, {"start": 0, "limit": 101}, {"start": -1, "limit": 5}):
        query = {**bad, "creatorId": C.creator_id}
        async with http.post(f"{sb.base_url}{AICC}/list", json=query, headers=headers) as r:
            assert (await body_of(r))["resCode"] != "0"
    async with http.post(
        f"{sb.base_url}{AICC}/list", json={"start": 0, "limit": 5}, headers=headers
    ) as r:
        assert (await body_of(r))["resCode"] != "0"


# --- SecMaster --------------------------------------------------------------------------------


async def test_secmaster_show_and_list(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    task_id = sb.task_ids("secmaster")[0]
    url = f"{sb.base_url}{SM}/{task_id}"
    async with http.get(url, headers=sm_signed("GET", url)) as r:
        assert r.status == 200
        body = await body_of(r)
        assert r.headers["X-Request-Id"] == body["request_id"]
    assert (body["code"], body["message"], body["success"]) == ("00000000", "", True)
    assert body["data"]["id"] == task_id and body["data"] == sb.payload("secmaster", task_id)
    waiting = [t.id for t in sb.state.secmaster if t.status == "waiting"]
    listed: list[str] = []
    for offset in range(0, len(waiting), 4):
        status, page = await sm_get(sb, http, f"?offset={offset}&limit=4")
        assert status == 200 and page["total"] == len(waiting)
        assert page["size"] == len(page["data"]) <= 4
        listed += [item["id"] for item in page["data"]]
    assert listed == waiting
    status, page = await sm_get(sb, http, "?query_type=all_handled&limit=100")
    assert {i["id"] for i in page["data"]} == set(sb.task_ids("secmaster")) - set(waiting)
    status, page = await sm_get(sb, http, "")
    assert status == 200 and page["size"] == min(10, len(waiting))


@pytest.mark.parametrize("query", ["?limit=0", "?limit=101", "?offset=10000", "?offset=x"])
async def test_secmaster_list_rejects_bad_paging(
    sb: Sandbox, http: aiohttp.ClientSession, query: str
) -> None:
    status, body = await sm_get(sb, http, query)
    assert status == 400 and body["code"] == "SecMaster.20030001"


async def test_secmaster_errors(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    status, body = await sm_get(sb, http, "/3e4c170e-7cc9-11f0-9216-fa163e209978")
    assert status == 404 and body == {"code": "SecMaster.20040004", "message": "task not found"}
    url = f"{sb.base_url}/v1/{C.project_id}/workspaces/nope/soc/tasks/{sb.task_ids('secmaster')[0]}"
    async with http.get(url, headers=sm_signed("GET", url)) as r:
        assert r.status == 400 and (await body_of(r))["code"] == "SecMaster.20010001"
    status, body = await sm_put(sb, http, sb.task_ids("secmaster")[0], {"action": "EXPLODE"})
    assert status == 400 and body["code"] == "SecMaster.20030001"
    status, body = await sm_put(sb, http, sb.task_ids("secmaster")[0], {"action": "ADD_COMMENT"})
    assert status == 400 and body["code"] == "SecMaster.20030001"
    assert sb.effects == []


async def test_secmaster_update_actions(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    task = next(t for t in sb.state.secmaster if t.status == "waiting")
    before = sb.payload("secmaster", task.id)
    status, body = await sm_put(sb, http, task.id, {"action": "ADD_COMMENT", "comment": "looked"})
    assert status == 200 and body["success"] is True
    comment = body["data"]["comments"][-1]
    assert comment["message"] == "looked" and comment["user_id"] == C.user_id
    assert isinstance(comment["time"], int) and uuid.UUID(comment["id"])
    status, body = await sm_put(
        sb, http, task.id, {"action": "DELETE_COMMENT", "comment_id": comment["id"]}
    )
    assert body["data"]["comments"] == before["comments"]
    status, body = await sm_put(
        sb, http, task.id, {"action": "DELETE_COMMENT", "comment_id": comment["id"]}
    )
    assert status == 400 and body["code"] == "SecMaster.20030001"
    status, body = await sm_put(
        sb, http, task.id, {"action": "ADD_ATTACHMENT", "attachment_id": "att-1"}
    )
    assert body["data"]["attachment_id_list"] == [*before["attachment_id_list"], "att-1"]
    status, body = await sm_put(
        sb, http, task.id, {"action": "DELETE_ATTACHMENT", "attachment_id": "att-1"}
    )
    assert body["data"]["attachment_id_list"] == before["attachment_id_list"]
    status, body = await sm_put(sb, http, task.id, {"action": "TERMINATE"})
    assert status == 200 and body["data"]["status"] == "canceled"
    status, body = await sm_put(sb, http, task.id, {"action": "CONTINUE"})
    assert status == 400 and body["code"].startswith("SecMaster.")
    kinds = [(e.kind, e.seq) for e in sb.applied("secmaster", task.id)]
    assert kinds == [
        ("comment", 1),
        ("delete-comment", 2),
        ("add-attachment", 3),
        ("delete-attachment", 4),
        ("terminate", 5),
    ]
    other = next(t for t in sb.state.secmaster if t.status == "waiting")
    status, body = await sm_put(sb, http, other.id, {"action": "CONTINUE"})
    assert body["data"]["status"] == "finished"


def _skewed(minutes: float) -> str:
    return format_date(datetime.now(UTC) + timedelta(minutes=minutes))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered-body", "signature"),
        ("wrong-ak", "access key"),
        ("old-date", "X-Sdk-Date"),
        ("future-date", "X-Sdk-Date"),
        ("project-unsigned", "x-project-id"),
        ("project-mismatch", "X-Project-Id"),
        ("no-auth", "Authorization"),
        ("bad-token", "X-Auth-Token"),
    ],
)
async def test_secmaster_auth_rejections(
    sb: Sandbox, http: aiohttp.ClientSession, case: str, reason: str
) -> None:
    task_id = sb.task_ids("secmaster")[0]
    url = f"{sb.base_url}{SM}/{task_id}"
    body = orjson.dumps({"action": "ADD_COMMENT", "comment": "x"})
    headers = sm_signed("PUT", url, body)
    if case == "tampered-body":
        body = orjson.dumps({"action": "ADD_COMMENT", "comment": "y"})
    elif case == "wrong-ak":
        headers = sign_sdk("PUT", url, {"X-Project-Id": C.project_id}, body, "OTHERAK", C.sk)
    elif case == "old-date":
        headers = sm_signed("PUT", url, body, date=_skewed(-16))
    elif case == "future-date":
        headers = sm_signed("PUT", url, body, date=_skewed(16))
    elif case == "project-unsigned":
        headers = sign_sdk("PUT", url, {}, body, C.ak, C.sk) | {"X-Project-Id": C.project_id}
    elif case == "project-mismatch":
        headers = sm_signed("PUT", url, body, **{"X-Project-Id": "0" * 32})
    elif case == "no-auth":
        headers = {"X-Project-Id": C.project_id}
    else:
        headers = {"X-Auth-Token": "MIIforged"}
    async with http.put(url, data=body, headers=headers) as r:
        assert r.status == 401
        answer = await body_of(r)
    assert answer["error_code"] == APIGW_401 and reason in answer["error_msg"]
    assert sb.effects == []


async def test_secmaster_signed_date_within_window_passes(
    sb: Sandbox, http: aiohttp.ClientSession
) -> None:
    url = f"{sb.base_url}{SM}/{sb.task_ids('secmaster')[0]}"
    async with http.get(url, headers=sm_signed("GET", url, date=_skewed(-14))) as r:
        assert r.status == 200


async def test_iam_token_and_fixed_token(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    def auth(password: str) -> dict[str, Any]:
        user = {"name": C.username, "password": password, "domain": {"name": C.domain}}
        identity = {"methods": ["password"], "password": {"user": user}}
        return {"auth": {"identity": identity, "scope": {"project": {"name": C.region}}}}

    async with http.post(sb.base_url + "/v3/auth/tokens", json=auth("wrong")) as r:
        assert r.status == 401
    async with http.post(sb.base_url + "/v3/auth/tokens", json={"auth": {}}) as r:
        assert r.status == 400
    async with http.post(sb.base_url + "/v3/auth/tokens", json=auth(C.password)) as r:
        assert r.status == 201
        token = r.headers["X-Subject-Token"]
        expires = datetime.strptime(
            (await body_of(r))["token"]["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ"
        )
    assert (
        timedelta(hours=23) < expires.replace(tzinfo=UTC) - datetime.now(UTC) <= timedelta(hours=24)
    )
    url = f"{sb.base_url}{SM}/{sb.task_ids('secmaster')[0]}"
    for value in (token, C.secmaster_token):
        async with http.get(url, headers={"X-Auth-Token": value}) as r:
            assert r.status == 200
    sb.expire_tokens()
    async with http.get(url, headers={"X-Auth-Token": token}) as r:
        assert r.status == 401
    async with http.get(url, headers={"X-Auth-Token": C.secmaster_token}) as r:
        assert r.status == 200  # a configured fixed token does not expire early


# --- KooDrive ---------------------------------------------------------------------------------


async def test_koodrive_detail(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    failed = sb.add_task("koodrive", "1534087020903704704", status=3)
    async with http.get(kd_url(sb, failed), headers=KD_BEARER) as r:
        assert r.status == 200
        body = await body_of(r)
    assert list(body) == [
        "taskId", "taskName", "taskType", "tenantId", "userId", "status", "resultCode", "code", "msg"
    ]  # fmt: skip
    assert (body["status"], body["code"], body["msg"]) == (3, 0, "Success.")
    assert re.fullmatch(r"18\d{6}", body["resultCode"])
    running = sb.add_task("koodrive", status=1)
    async with http.get(kd_url(sb, running), headers=KD_BEARER) as r:
        assert "resultCode" not in await body_of(r)
    async with http.get(kd_url(sb, "1000000000000000000"), headers=KD_BEARER) as r:
        assert r.status == 200
        assert await body_of(r) == {"code": 13000309, "msg": "resource does not exist"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("ok", 200),
        ("bad-bearer", 401),
        ("bad-secret", 401),
        ("future-date", 401),
        ("old-date", 401),
        ("slightly-future", 200),
        ("other-user", 401),
    ],
)
async def test_koodrive_auth(
    sb: Sandbox, http: aiohttp.ClientSession, case: str, expected: int
) -> None:
    url = kd_url(sb, sb.task_ids("koodrive")[0])
    secret, user, date = C.app_secret, C.koodrive_user_id, None
    if case == "bad-secret":
        secret = "nope"
    elif case == "future-date":
        date = _skewed(1)
    elif case == "old-date":
        date = _skewed(-16)
    elif case == "slightly-future":
        date = _skewed(2 / 60)  # within the few seconds of slack for clock jitter
    elif case == "other-user":
        user = "42"
    headers = sign_app("GET", url, {}, b"", C.app_id, secret, user, date=date)
    if case == "bad-bearer":
        headers = {"Authorization": "Bearer nope"}
    async with http.get(url, headers=headers) as r:
        assert r.status == expected
        if expected == 401:
            assert (await body_of(r))["error_code"] == APIGW_401


# --- faults -----------------------------------------------------------------------------------


async def test_faults_fire_at_configured_rates(http: aiohttp.ClientSession) -> None:
    spec = "500=0.2,429=0.1,429-no-retry-after=0.1,malformed=0.1"
    async with Sandbox(seed=5, tasks_per_system=3, faults=spec) as sb:
        url = kd_url(sb, sb.task_ids("koodrive")[0])
        seen: Counter[str] = Counter()
        for _ in range(500):
            async with http.get(url, headers=KD_BEARER) as r:
                raw = await r.read()
                if r.status == 429:
                    seen[
                        "429" if r.headers.get("Retry-After") == "1" else "429-no-retry-after"
                    ] += 1
                    assert orjson.loads(raw)["error_code"] == "APIGW.0308"
                elif r.status == 500:
                    seen["500"] += 1
                else:
                    try:
                        orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        seen["malformed"] += 1
        assert seen == sb.faults.injected and sb.faults.eligible == 500
        for fault, rate in (("500", 0.2), ("429", 0.1), ("429-no-retry-after", 0.1)):
            assert abs(seen[fault] - 500 * rate) < 500 * rate * 0.4, (fault, seen)
        sb.set_faults(None)
        async with http.get(url, headers=KD_BEARER) as r:
            assert r.status == 200
        assert sb.faults.eligible == 500  # no faults: no draws


async def test_same_seed_same_faults(http: aiohttp.ClientSession) -> None:
    runs = []
    for _ in range(2):
        async with Sandbox(seed=9, tasks_per_system=1, faults="500=0.5") as sb:
            statuses = []
            for _ in range(30):
                async with http.get(kd_url(sb, sb.task_ids("koodrive")[0]), headers=KD_BEARER) as r:
                    statuses.append(r.status)
            runs.append(statuses)
    assert runs[0] == runs[1] and set(runs[0]) == {200, 500}


async def raw_exchange(
    sb: Sandbox, method: str, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    """One request on a fresh connection, without any client-side retry; all bytes answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sb.port)
    head = f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "content-length")
    writer.write(head.encode() + b"\r\n" + body)
    try:
        with anyio.fail_after(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_drop_applies_the_write_then_closes(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    task = next(t for t in sb.state.secmaster if t.status == "waiting")
    sb.set_faults("drop=1")
    url = f"{sb.base_url}{SM}/{task.id}"
    body = orjson.dumps({"action": "ADD_COMMENT", "comment": "lost answer"})
    assert (
        await raw_exchange(sb, "PUT", f"{SM}/{task.id}", sm_signed("PUT", url, body), body) == b""
    )
    [effect] = sb.applied("secmaster")
    assert effect.kind == "comment" and effect.params["comment"] == "lost answer"
    assert await raw_exchange(sb, "GET", f"{SM}/{task.id}", sm_signed("GET", url), b"") == b""
    assert len(sb.effects) == 1 and sb.faults.injected["drop"] == 2
    sb.set_faults(None)
    _status, answer = await sm_get(sb, http, f"/{task.id}")
    assert [c["message"] for c in answer["data"]["comments"]].count("lost answer") == 1


async def test_aiohttp_resends_a_dropped_put_even_on_a_fresh_connection(
    sb: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Pins the trap of docs/upstream.md for the client's authors: aiohttp 3.14 re-sends an
    "idempotent" method after ServerDisconnectedError whether or not the connection was
    reused, so `force_close=True` (this `http` session) does NOT prevent a double write."""
    task = next(t for t in sb.state.secmaster if t.status == "waiting")
    sb.set_faults("drop=1")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await sm_put(sb, http, task.id, {"action": "ADD_COMMENT", "comment": "twice"})
    assert [e.params["comment"] for e in sb.applied("secmaster")] == ["twice", "twice"]


async def test_500_applies_nothing_and_malformed_applies(
    sb: Sandbox, http: aiohttp.ClientSession
) -> None:
    task = next(t for t in sb.state.secmaster if t.status == "waiting")
    sb.set_faults("500=1")
    status, _body = await sm_put(sb, http, task.id, {"action": "TERMINATE"})
    assert status == 500 and sb.effects == [] and task.status == "waiting"
    sb.set_faults("malformed=1")
    url = f"{sb.base_url}{SM}/{task.id}"
    payload = orjson.dumps({"action": "TERMINATE"})
    async with http.put(url, data=payload, headers=sm_signed("PUT", url, payload)) as r:
        assert r.status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await r.read())
    assert [e.kind for e in sb.effects] == ["terminate"] and task.status == "canceled"


async def test_slow_write_applies_first(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    task = next(t for t in sb.state.aicc if t.status == "Pending")
    headers = {"access-token": await aicc_token(sb, http)}
    sb.set_faults("slow=1,slow-seconds=0.3")
    info = {"type": "Iternal", "title": "t", "description": "d"}
    request = {"taskId": task.id, "creatorId": C.creator_id, "processInfo": info}
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=0.15)
    with pytest.raises(TimeoutError):
        async with http.post(
            f"{sb.base_url}{AICC}/process", json=request, headers=headers, timeout=timeout
        ) as r:
            await r.read()
    assert len(sb.applied("aicc")) == 1  # applied although the client gave up waiting
    async with http.get(f"{sb.base_url}{AICC}/{task.id}", headers=headers) as r:
        assert r.status == 200
    assert time.monotonic() - started >= 0.3


async def test_expire_kills_tokens_every_n_requests(
    sb: Sandbox, http: aiohttp.ClientSession
) -> None:
    token = await aicc_token(sb, http)
    sb.set_faults("expire=3")
    url = f"{sb.base_url}{AICC}/{sb.task_ids('aicc')[0]}"
    statuses = []
    for _ in range(3):
        async with http.get(url, headers={"access-token": token}) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 401] and sb.faults.injected["expire"] == 1
    token = await aicc_token(sb, http)  # token endpoints are not counted
    async with http.get(url, headers={"access-token": token}) as r:
        assert r.status == 200


# --- state changes by others ----------------------------------------------------------------


async def test_mutations_change_payloads(sb: Sandbox) -> None:
    aicc = next(t for t in sb.state.aicc if t.status == "Pending")
    trace = sb.payload("aicc", aicc.id)["taskTrace"]
    sb.mutate("aicc", aicc.id, "status")
    after = sb.payload("aicc", aicc.id)
    assert after["taskInfo"]["status"] == "Processing" and after["taskTrace"] == trace
    sb.mutate("aicc", aicc.id, "trace", title="note")
    assert sb.payload("aicc", aicc.id)["taskTrace"][-1]["title"] == "note"
    sm = sb.task_ids("secmaster")[0]
    effect = sb.mutate("secmaster", sm, "comment", comment="by someone else")
    comments = sb.payload("secmaster", sm)["comments"]
    assert comments[-1]["message"] == "by someone else"
    assert effect.origin == "mutation" and sb.applied() == []
    sb.mutate("secmaster", sm, "delete-comment", comment_id=effect.params["comment_id"])
    assert sb.payload("secmaster", sm)["comments"] == comments[:-1]
    kd = sb.add_task("koodrive", status=1)
    sb.mutate("koodrive", kd, "status", status=3)
    assert sb.payload("koodrive", kd)["resultCode"].startswith("18")
    with pytest.raises(ValueError, match="already ended"):
        sb.mutate("koodrive", kd, "status")
    effects = sb.mutate_random(20)
    assert len(effects) == 20 and all(e.origin == "mutation" for e in effects)
    assert [e.seq for e in sb.effects] == list(range(1, len(sb.effects) + 1))


async def test_mutation_timer() -> None:
    async with Sandbox(tasks_per_system=5, mutate_every=0.02, mutate_count=2) as sb:
        with anyio.fail_after(5):
            while len(sb.effects) < 6:
                await anyio.sleep(0.02)
    count = len(sb.effects)
    await anyio.sleep(0.1)
    assert len(sb.effects) == count  # the timer stops with the sandbox


async def test_added_task_is_served(sb: Sandbox, http: aiohttp.ClientSession) -> None:
    task_id = sb.add_task("aicc", "ccqG0000014iXvGKONQO", status="Completed")
    headers = {"access-token": await aicc_token(sb, http)}
    async with http.get(f"{sb.base_url}{AICC}/{task_id}", headers=headers) as r:
        info = (await body_of(r))["result"]["taskInfo"]
    assert info["id"] == task_id and info["status"] == "Completed" and info["closedDate"]
    with pytest.raises(ValueError, match="already exists"):
        sb.add_task("aicc", task_id)


# --- configuration and the command-line entry point ------------------------------------------


@pytest.mark.parametrize(
    ("secmaster", "koodrive"), [("aksk", "token"), ("iam", "app"), ("token", "token")]
)
async def test_config_toml_loads(tmp_path: Path, secmaster: Any, koodrive: Any) -> None:
    async with Sandbox(tasks_per_system=1) as sb:
        path = tmp_path / "tasksync.toml"
        path.write_text(sb.config_toml(secmaster_auth=secmaster, koodrive_auth=koodrive))
        path.chmod(0o600)
        settings = load_config(str(path), environ={}).settings
    assert "[database]" not in path.read_text()
    systems = settings.systems
    assert systems.aicc is not None and systems.aicc.base_url == sb.base_url
    assert systems.secmaster is not None and systems.secmaster.auth_mode == secmaster
    assert systems.koodrive is not None and systems.koodrive.auth_mode == koodrive


def _serve_command(*args: str) -> list[str]:
    call = ", ".join(args)
    code = f"from worker.sandbox import serve; raise SystemExit(serve({call}))"
    return [sys.executable, "-c", code]


async def test_serve_writes_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "sandbox.toml"
    command = _serve_command("port=0", f"write_config={str(config)!r}", "seed_tasks=3", "faults=''")
    with subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT
    ) as proc:
        try:
            assert proc.stderr is not None
            with anyio.fail_after(20):
                line = (await anyio.to_thread.run_sync(proc.stderr.readline)).decode()
            match = re.fullmatch(r"sandbox listening on (http://127\.0\.0\.1:(\d+))\n", line)
            assert match, line
            base_url = match.group(1)
            text = config.read_text()
            assert f'base_url = "{base_url}"' in text and (config.stat().st_mode & 0o077) == 0
            async with aiohttp.ClientSession() as http:
                url = f"{base_url}/koodrive/ose/v1/task/1"
                async with http.get(url, headers=KD_BEARER) as r:
                    assert r.status == 200
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await anyio.to_thread.run_sync(proc.wait) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_serve_prints_config_without_a_file() -> None:
    with subprocess.Popen(
        _serve_command("seed_tasks=1"), stderr=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline().decode()
            assert line.startswith("sandbox listening on http://127.0.0.1:")
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=10)
            assert proc.returncode == 0
            assert "[systems.secmaster]" in out.decode() and 'ak = "' in out.decode()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_serve_rejects_a_bad_fault_spec() -> None:
    from worker.sandbox import serve

    with pytest.raises(ValueError, match="bogus"):
        serve(faults="bogus=1")


async def test_aicc_list_filters_by_time_and_priority(
    sb: Sandbox, http: aiohttp.ClientSession
) -> None:
    headers = {"access-token": await aicc_token(sb, http)}
    details = {i: sb.payload("aicc", i)["taskInfo"] for i in sb.task_ids("aicc")}
    middle = sorted(info["createdDate"] for info in details.values())[6]
    priority = details[sb.task_ids("aicc")[0]]["priority"]
    for query, expected in (
        ({"startTime": middle}, {i for i, d in details.items() if d["createdDate"] >= middle}),
        ({"endTime": middle}, {i for i, d in details.items() if d["createdDate"] <= middle}),
        ({"priority": priority}, {i for i, d in details.items() if d["priority"] == priority}),
    ):
        body = {"start": 0, "limit": 100, "creatorId": C.creator_id, **query}
        async with http.post(f"{sb.base_url}{AICC}/list", json=body, headers=headers) as r:
            result = (await body_of(r))["result"]
        assert {item["taskId"] for item in result["taskList"]} == expected
        assert result["count"] == len(expected)
    body = {"start": 0, "limit": 5, "creatorId": C.creator_id, "startTime": "yesterday"}
    async with http.post(f"{sb.base_url}{AICC}/list", json=body, headers=headers) as r:
        assert (await body_of(r))["resCode"] != "0"


async def test_aksk_lockout_after_five_failures(http: aiohttp.ClientSession) -> None:
    async with Sandbox(tasks_per_system=1, aksk_lockout=300) as sb:
        url = f"{sb.base_url}{SM}/{sb.task_ids('secmaster')[0]}"
        bad = sign_sdk("GET", url, {"X-Project-Id": C.project_id}, b"", C.ak, "wrong-sk")
        for _ in range(5):
            async with http.get(url, headers=bad) as r:
                assert r.status == 401
        async with http.get(url, headers=sm_signed("GET", url)) as r:
            assert r.status == 401 and "locked" in (await body_of(r))["error_msg"]
        async with http.get(url, headers={"X-Auth-Token": C.secmaster_token}) as r:
            assert r.status == 200  # the lock is on the AK/SK only
