"""The three clients against small aiohttp.web fakes speaking the documented wire format:
every auth mode (with token expiry and renewal), the operations, discovery, and the pure parts
(observe, hashing, the token cache). Faults and malformed answers: test_upstreams_faults.py.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config import AiccSettings, KooDriveSettings, SecMasterSettings, Settings
from worker.hashing import canonical_json, content_hash
from worker.model import State
from worker.upstreams import build_upstreams
from worker.upstreams.aicc import AiccClient, observe_aicc, token_lifetime
from worker.upstreams.base import ErrorKind, UpstreamError
from worker.upstreams.koodrive import KooDriveClient, observe_koodrive
from worker.upstreams.secmaster import SecMasterClient, observe_secmaster, parse_time
from worker.upstreams.signing import (
    app_signature,
    parse_authorization,
    parse_date,
    query_pairs,
    sdk_signature,
)
from worker.upstreams.tokens import TokenCache

AICC_SECRET = "aicc-secret-0f9e8d"
SM_AK = "QTWAOYTTINDUT2QVKYUC"
SM_SK = "secmaster-sk-7c6b5a"
SM_PASSWORD = "iam-password-4e3d2c"
SM_TOKEN = "secmaster-token-1b0a99"
KD_TOKEN = "koodrive-token-8f7e6d"
KD_APP_SECRET = "koodrive-app-secret-5c4b3a"
SECRETS = (AICC_SECRET, SM_SK, SM_PASSWORD, SM_TOKEN, KD_TOKEN, KD_APP_SECRET)
TASK = "ccqG0000014iXvGKONQO"
SM_TASK = "3e4c170e-7cc9-11f0-9216-fa163e209978"


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def json_response(obj: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj),
        status=status,
        headers={"Content-Type": "application/json", **headers},
    )


def no_secrets(error: BaseException) -> str:
    text = str(error)
    assert not any(secret in text for secret in SECRETS), text
    return text


# -- AICC -----------------------------------------------------------------------------------------


def aicc_result(task_id: str, status: str = "Pending") -> dict[str, Any]:
    return {
        "taskInfo": {"id": task_id, "title": "test002", "status": status, "ownerId": "o1"},
        "taskTrace": [
            {"creatorId": "c1", "creatorName": "c1", "type": "CreateTask", "title": None},
            {"creatorId": "c1", "type": "StatusUpdate", "title": "t", "description": "d"},
        ],
        "customerInfo": {"customerInfo": {"id": "x"}},
        "caseInfos": [],
    }


class FakeAicc:
    """OAuth2 client-credentials token + task detail/process/list, as seeds 000/001 describe."""

    def __init__(
        self, *, expires_in: object = 7200, signal: str = "http401", token_delay: float = 0.0
    ) -> None:
        self.expires_in = expires_in
        self.signal = signal  # how an unknown token is refused: "http401" or "rescode"
        self.token_delay = token_delay
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.accept = True
        self.refusals = 0
        self.task_requests = 0
        self.processed: list[dict[str, Any]] = []
        self.lists: list[dict[str, Any]] = []
        self.tasks = [f"task{i:04d}" for i in range(250)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/baas/auth/v1.0/oauth2/token", self.token)
        app.router.add_post("/service/AICC__Case/1.0.0/openapi/task/process", self.process)
        app.router.add_post("/service/AICC__Case/1.0.0/openapi/task/list", self.list)
        app.router.add_get("/service/AICC__Case/1.0.0/openapi/task/{id}", self.detail)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials" or form.get("client_id") != "cid":
            return json_response({"error": "invalid_request"}, 400)
        if form.get("client_secret") != AICC_SECRET:
            # A careless server echoing the credential: the client must redact it.
            text = f"client_secret {form.get('client_secret')} is wrong"
            return json_response({"error": "invalid_client", "error_description": text}, 401)
        await asyncio.sleep(self.token_delay)
        token = f"tok-{len(self.issued)}"
        self.issued.append(token)
        if self.accept:
            self.valid.add(token)
        return json_response({"access_token": token, "expires_in": self.expires_in})

    def refused(self, request: web.Request) -> web.Response | None:
        if request.headers.get("access-token") in self.valid:
            return None
        self.refusals += 1
        if self.signal == "http401":
            return json_response({"resCode": "401", "resMsg": "Unauthorized"}, 401)
        return json_response({"resCode": "100.0001", "resMsg": "Access token expired"})

    async def detail(self, request: web.Request) -> web.Response:
        self.task_requests += 1
        refused = self.refused(request)
        if refused is not None:
            return refused
        body = {"resCode": "0", "resMsg": "成功", "result": aicc_result(request.match_info["id"])}
        return json_response(body)

    async def process(self, request: web.Request) -> web.Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        self.processed.append(await request.json())
        return web.Response(
            body=b'{"resCode": "0","resMsg": "Success"}',
            headers={"Content-Type": "application/json%3Bcharset=UTF-8"},
        )

    async def list(self, request: web.Request) -> web.Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        query = await request.json()
        self.lists.append(query)
        start, limit = query["start"], query["limit"]
        page = [{"taskId": t, "title": "x"} for t in self.tasks[start : start + limit]]
        return json_response(
            {"resCode": "0", "result": {"taskList": page, "count": len(self.tasks)}}
        )


def aicc_client(url: str, **overrides: Any) -> AiccClient:
    fields: dict[str, Any] = {
        "base_url": url,
        "client_id": "cid",
        "client_secret": AICC_SECRET,
        "creator_id": "handler-1",
        "timeout": 5,
    }
    return AiccClient(AiccSettings(**{**fields, **overrides}))


@pytest.mark.anyio
async def test_aicc_fetch_process_and_discover() -> None:
    fake = FakeAicc()
    async with serve(fake.app()) as url:
        client = aicc_client(url)
        try:
            with anyio.fail_after(5):
                fetched = await client.fetch(TASK)
                answer = await client.apply(
                    TASK,
                    "process",
                    {"title": "done", "description": "fixed", "attachment": "a.pdf"},
                )
                await client.apply(
                    TASK, "process", {"title": "t", "description": "d", "creator_id": "other"}
                )
                found = [task async for task in client.discover()]
        finally:
            await client.aclose()
    result = aicc_result(TASK)
    assert fetched.system == "aicc" and fetched.task_id == TASK
    assert fetched.payload == result
    assert fetched.content_hash == content_hash(result)
    assert fetched.observation.state is State.OPEN
    assert fetched.observation.status == "Pending"
    assert fetched.observation.title == "test002"
    assert [t.position for t in fetched.observation.trace] == [0, 1]
    assert fetched.observation.trace[1].digest == content_hash(result["taskTrace"][1])
    assert answer == {"resCode": "0", "resMsg": "Success"}
    assert fake.processed == [
        {
            "taskId": TASK,
            "creatorId": "handler-1",
            "processInfo": {
                "type": "Iternal",
                "title": "done",
                "description": "fixed",
                "attachment": "a.pdf",
            },
        },
        {
            "taskId": TASK,
            "creatorId": "other",
            "processInfo": {"type": "Iternal", "title": "t", "description": "d"},
        },
    ]
    assert found == fake.tasks
    assert fake.lists == [
        {"start": s, "limit": 100, "creatorId": "handler-1"} for s in (0, 100, 200)
    ]
    assert fake.issued == ["tok-0"]  # one token for everything


@pytest.mark.anyio
@pytest.mark.parametrize("signal", ["http401", "rescode"])
async def test_aicc_expired_token_is_renewed_once_for_concurrent_requests(signal: str) -> None:
    fake = FakeAicc(signal=signal, token_delay=0.05)
    async with serve(fake.app()) as url:
        client = aicc_client(url)
        try:
            with anyio.fail_after(5):
                await client.fetch(TASK)
                fake.valid.clear()  # the server expires the token mid-run
                results = []

                async def fetch_one(i: int) -> None:
                    results.append(await client.fetch(f"t{i}"))

                async with anyio.create_task_group() as group:
                    for i in range(20):
                        group.start_soon(fetch_one, i)
                # A refused write is safe to repeat: nothing was applied.
                fake.valid.clear()
                await client.apply(TASK, "process", {"title": "t", "description": "d"})
        finally:
            await client.aclose()
    assert len(results) == 20
    assert fake.issued == ["tok-0", "tok-1", "tok-2"]  # one renewal per expiry, shared
    assert len(fake.processed) == 1


@pytest.mark.anyio
async def test_aicc_token_is_renewed_before_it_expires() -> None:
    fake = FakeAicc(expires_in="0.2")  # documented as a string: accepted
    async with serve(fake.app()) as url:
        client = aicc_client(url)
        try:
            with anyio.fail_after(5):
                await client.fetch(TASK)
                await client.fetch(TASK)
                await anyio.sleep(0.2)  # past 80 % of the lifetime
                await client.fetch(TASK)
        finally:
            await client.aclose()
    assert fake.issued == ["tok-0", "tok-1"]
    assert fake.refusals == 0


@pytest.mark.anyio
async def test_aicc_refused_twice_is_auth_after_one_renewal() -> None:
    fake = FakeAicc()
    fake.accept = False  # tokens are issued but never accepted
    async with serve(fake.app()) as url:
        client = aicc_client(url)
        try:
            with anyio.fail_after(5), pytest.raises(UpstreamError) as info:
                await client.fetch(TASK)
        finally:
            await client.aclose()
    assert info.value.kind is ErrorKind.AUTH
    assert info.value.http_status == 401
    assert fake.task_requests == 2  # the first try and one retry after one renewal
    assert fake.issued == ["tok-0", "tok-1"]
    no_secrets(info.value)


@pytest.mark.anyio
async def test_aicc_wrong_client_secret_is_auth_and_redacted() -> None:
    fake = FakeAicc()
    async with serve(fake.app()) as url:
        client = aicc_client(url, client_secret="wrong-" + AICC_SECRET[::-1])
        try:
            with anyio.fail_after(5), pytest.raises(UpstreamError) as info:
                await client.fetch(TASK)
        finally:
            await client.aclose()
    text = str(info.value)
    assert info.value.kind is ErrorKind.AUTH
    assert text.startswith(f"aicc task {TASK}: token request: HTTP 401 invalid_client")
    assert "wrong-" not in text and "***" in text


@pytest.mark.anyio
async def test_aicc_creator_id_is_required_for_process_and_discovery() -> None:
    fake = FakeAicc()
    async with serve(fake.app()) as url:
        client = aicc_client(url, creator_id=None)
        try:
            with anyio.fail_after(5):
                with pytest.raises(UpstreamError) as process:
                    await client.apply(TASK, "process", {"title": "t", "description": "d"})
                with pytest.raises(UpstreamError) as listing:
                    _ = [task async for task in client.discover()]
                with pytest.raises(UpstreamError) as unknown:
                    await client.apply(TASK, "comment", {"comment": "x"})
                with pytest.raises(UpstreamError) as missing:
                    await client.apply(TASK, "process", {"title": "t", "creator_id": "c"})
        finally:
            await client.aclose()
    assert process.value.kind is ErrorKind.PERMANENT and "creator_id" in str(process.value)
    assert listing.value.kind is ErrorKind.PERMANENT and "creator_id" in str(listing.value)
    assert unknown.value.kind is ErrorKind.PERMANENT and "'comment'" in str(unknown.value)
    assert missing.value.kind is ErrorKind.PERMANENT and "description" in str(missing.value)
    assert fake.issued == [] and fake.processed == []  # nothing was sent


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7200, 7200.0), ("1800", 1800.0), (0, 1800.0), ("soon", 1800.0), (None, 1800.0),
     (True, 1800.0), (float("nan"), 1800.0), (-5, 1800.0), ([1], 1800.0)],
)  # fmt: skip
def test_token_lifetime(value: object, expected: float) -> None:
    assert token_lifetime(value) == expected


# -- SecMaster ------------------------------------------------------------------------------------


class FakeSecMaster:
    """ShowTask / UpdateTask / ListTasks plus IAM tokens; verifies AK/SK signatures."""

    def __init__(self, *, total: int | None = None) -> None:
        self.tasks: dict[str, dict[str, Any]] = {
            SM_TASK: {
                "id": SM_TASK,
                "name": "test task",
                "status": "waiting",
                "update_time": "2025-08-19T16:50:23.743Z+0800",
                "attachment_id_list": [],
                "comments": [],
            }
        }
        self.total = total
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.iam_requests = 0
        self.iam_tokens: set[str] = set()
        self.ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        base = "/v1/proj/workspaces/ws/soc/tasks"
        app.router.add_get(base, self.list)
        app.router.add_get(base + "/{id}", self.show)
        app.router.add_put(base + "/{id}", self.update)
        app.router.add_post("/v3/auth/tokens", self.iam)
        return app

    async def iam(self, request: web.Request) -> web.Response:
        self.iam_requests += 1
        body = await request.json()
        identity = body["auth"]["identity"]
        user = identity["password"]["user"]
        ok = (
            identity["methods"] == ["password"]
            and user["name"] == "alice"
            and user["password"] == SM_PASSWORD
            and user["domain"]["name"] == "acme"
            and body["auth"]["scope"]["project"]["name"] == "cn-north-4"
        )
        if not ok:
            error = {"code": 401, "message": "The username or password is wrong.", "title": "x"}
            return json_response({"error": error}, 401)
        token = f"iam-token-{next(self.ids)}"
        self.iam_tokens.add(token)
        expires = (datetime.now(UTC) + timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return json_response({"token": {"expires_at": expires}}, 201, **{"X-Subject-Token": token})

    async def authorized(self, request: web.Request, body: bytes) -> bool:
        self.requests.append((request.method, request.path))
        token = request.headers.get("X-Auth-Token")
        if token is not None:
            return token == SM_TOKEN or token in self.iam_tokens
        algorithm, fields = parse_authorization(request.headers.get("Authorization", ""))
        signed = fields.get("SignedHeaders", "").split(";")
        if algorithm != "SDK-HMAC-SHA256" or fields.get("Access") != SM_AK:
            return False
        if not {"host", "x-sdk-date", "x-project-id"} <= set(signed):
            return False
        if request.headers.get("X-Project-Id") != "proj":
            return False
        age = datetime.now(UTC) - parse_date(request.headers["X-Sdk-Date"])
        if abs(age) > timedelta(minutes=15):
            return False
        path, _, query = request.raw_path.partition("?")
        headers = dict(request.headers)
        expected = sdk_signature(
            request.method, path, query_pairs(query), headers, signed, body, SM_SK
        )
        return hmac.compare_digest(expected, fields.get("Signature", ""))

    def refusal(self) -> web.Response:
        return json_response({"error_code": "APIGW.0301", "error_msg": "Incorrect IAM auth"}, 401)

    async def show(self, request: web.Request) -> web.Response:
        if not await self.authorized(request, await request.read()):
            return self.refusal()
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            return json_response({"code": "SecMaster.20040404", "message": "no task"}, 404)
        return json_response({"code": "00000000", "message": "", "success": True, "data": task})

    async def update(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not await self.authorized(request, raw):
            return self.refusal()
        body = orjson.loads(raw)
        self.bodies.append(body)
        task = self.tasks[request.match_info["id"]]
        action = body["action"]
        if action == "ADD_COMMENT":
            task["comments"].append(
                {"id": f"c{next(self.ids)}", "message": body["comment"], "time": 1755593622424}
            )
        elif action == "DELETE_COMMENT":
            task["comments"] = [c for c in task["comments"] if c["id"] != body["comment_id"]]
        elif action == "ADD_ATTACHMENT":
            task["attachment_id_list"].append(body["attachment_id"])
        elif action == "DELETE_ATTACHMENT":
            task["attachment_id_list"].remove(body["attachment_id"])
        elif action == "TERMINATE":
            task["status"] = "canceled"
        elif action == "CONTINUE":
            task["status"] = "finished"
        return json_response({"code": "00000000", "success": True, "data": task})

    async def list(self, request: web.Request) -> web.Response:
        if not await self.authorized(request, await request.read()):
            return self.refusal()
        offset, limit = int(request.query["offset"]), int(request.query["limit"])
        if offset > 9999 or not 1 <= limit <= 100:
            return json_response({"code": "SecMaster.20030001", "message": "bad offset"}, 400)
        total = self.total if self.total is not None else 250
        page = [{"id": f"sm-{i:05d}"} for i in range(offset, min(offset + limit, total))]
        return json_response({"code": "00000000", "total": total, "size": len(page), "data": page})


def secmaster_client(url: str, mode: str, **overrides: Any) -> SecMasterClient:
    auth: dict[str, Any] = {
        "aksk": {"ak": SM_AK, "sk": SM_SK},
        "iam": {
            "iam_url": url,
            "username": "alice",
            "password": SM_PASSWORD,
            "domain": "acme",
            "region": "cn-north-4",
        },
        "token": {"token": SM_TOKEN},
    }[mode]
    fields = {"base_url": url, "project_id": "proj", "workspace_id": "ws", "timeout": 5, **auth}
    return SecMasterClient(SecMasterSettings(**{**fields, **overrides}))


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["aksk", "iam", "token"])
async def test_secmaster_every_action_and_discovery(mode: str) -> None:
    fake = FakeSecMaster()
    async with serve(fake.app()) as url:
        client = secmaster_client(url, mode)
        try:
            with anyio.fail_after(5):
                before = await client.fetch(SM_TASK)
                added = await client.apply(SM_TASK, "comment", {"comment": "checked ünïcode"})
                comment_id = added["data"]["comments"][0]["id"]  # type: ignore[index]
                await client.apply(SM_TASK, "add-attachment", {"attachment_id": "att-1"})
                middle = await client.fetch(SM_TASK)
                await client.apply(SM_TASK, "delete-comment", {"comment_id": comment_id})
                await client.apply(SM_TASK, "delete-attachment", {"attachment_id": "att-1"})
                await client.apply(SM_TASK, "continue", {})
                await client.apply(SM_TASK, "terminate", {})
                after = await client.fetch(SM_TASK)
                found = [task async for task in client.discover()]
        finally:
            await client.aclose()
    assert before.observation.state is State.OPEN
    assert before.observation.title == "test task"
    assert before.observation.changed_at == datetime(2025, 8, 19, 8, 50, 23, 743000, UTC)
    assert set(middle.observation.comments) == {comment_id}
    comment = middle.observation.comments[comment_id]
    assert comment.message == "checked ünïcode"
    assert comment.time == datetime(2025, 8, 19, 8, 53, 42, 424000, UTC)
    assert middle.observation.attachments == frozenset({"att-1"})
    assert after.observation.status == "canceled" and after.observation.state is State.CANCELED
    assert after.observation.comments == {} and after.observation.attachments == frozenset()
    assert before.content_hash != middle.content_hash
    assert [b["action"] for b in fake.bodies] == [
        "ADD_COMMENT",
        "ADD_ATTACHMENT",
        "DELETE_COMMENT",
        "DELETE_ATTACHMENT",
        "CONTINUE",
        "TERMINATE",
    ]
    assert fake.bodies[2] == {"action": "DELETE_COMMENT", "comment_id": comment_id}
    assert found == [f"sm-{i:05d}" for i in range(250)]
    assert fake.iam_requests == (1 if mode == "iam" else 0)


@pytest.mark.anyio
async def test_secmaster_discovery_stops_at_the_offset_cap_when_dates_do_not_narrow() -> None:
    # This fake ignores from_date/to_date: both halves of the first split hold everything.
    fake = FakeSecMaster(total=20_000)
    async with serve(fake.app()) as url:
        client = secmaster_client(url, "token")
        try:
            with anyio.fail_after(10):
                found = [task async for task in client.discover()]
        finally:
            await client.aclose()
    assert len(found) == 10_000 and found[-1] == "sm-09999"
    assert sum(1 for method, path in fake.requests if path.endswith("/tasks")) == 102


@pytest.mark.anyio
async def test_secmaster_refused_signature_is_auth_at_once() -> None:
    fake = FakeSecMaster()
    async with serve(fake.app()) as url:
        client = secmaster_client(url, "aksk", sk="not-the-" + SM_SK)
        try:
            with anyio.fail_after(5), pytest.raises(UpstreamError) as info:
                await client.apply(SM_TASK, "terminate", {})
        finally:
            await client.aclose()
    assert info.value.kind is ErrorKind.AUTH
    assert len(fake.requests) == 1  # never retried: five failures lock the AK/SK
    assert "APIGW.0301" in str(info.value) and "not retried" in str(info.value)
    assert "not-the-" not in str(info.value)


@pytest.mark.anyio
async def test_secmaster_iam_token_is_renewed_once_after_a_401() -> None:
    fake = FakeSecMaster()
    async with serve(fake.app()) as url:
        client = secmaster_client(url, "iam")
        try:
            with anyio.fail_after(5):
                await client.fetch(SM_TASK)
                fake.iam_tokens.clear()  # the token dies early (e.g. a password change)
                async with anyio.create_task_group() as group:
                    for _ in range(10):
                        group.start_soon(client.fetch, SM_TASK)
                fake.iam_tokens.clear()
                await client.apply(SM_TASK, "comment", {"comment": "once"})
        finally:
            await client.aclose()
    assert fake.iam_requests == 3  # the first, one shared renewal, one before the write
    assert len(fake.tasks[SM_TASK]["comments"]) == 1


@pytest.mark.anyio
async def test_secmaster_iam_wrong_password_and_fixed_token_refused() -> None:
    fake = FakeSecMaster()
    async with serve(fake.app()) as url:
        iam = secmaster_client(url, "iam", password="bad-" + SM_PASSWORD)
        fixed = secmaster_client(url, "token", token="bad-" + SM_TOKEN)
        try:
            with anyio.fail_after(5):
                with pytest.raises(UpstreamError) as wrong_password:
                    await iam.fetch(SM_TASK)
                with pytest.raises(UpstreamError) as wrong_token:
                    await fixed.fetch(SM_TASK)
        finally:
            await iam.aclose()
            await fixed.aclose()
    assert wrong_password.value.kind is ErrorKind.AUTH
    assert "IAM token request: HTTP 401 The username or password is wrong." in str(
        wrong_password.value
    )
    assert wrong_token.value.kind is ErrorKind.AUTH
    assert fake.iam_requests == 1  # a refused password is not retried either
    for error in (wrong_password.value, wrong_token.value):
        assert "bad-" not in no_secrets(error)


@pytest.mark.anyio
async def test_secmaster_unknown_task_and_bad_actions() -> None:
    fake = FakeSecMaster()
    async with serve(fake.app()) as url:
        client = secmaster_client(url, "aksk")
        try:
            with anyio.fail_after(5):
                with pytest.raises(UpstreamError) as missing:
                    await client.fetch("no-such-task")
                with pytest.raises(UpstreamError) as unknown:
                    await client.apply(SM_TASK, "process", {})
                with pytest.raises(UpstreamError) as incomplete:
                    await client.apply(SM_TASK, "comment", {})
        finally:
            await client.aclose()
    assert missing.value.kind is ErrorKind.NOT_FOUND
    assert str(missing.value).startswith("secmaster task no-such-task: HTTP 404")
    assert unknown.value.kind is ErrorKind.PERMANENT
    assert incomplete.value.kind is ErrorKind.PERMANENT and "comment" in str(incomplete.value)
    assert len(fake.requests) == 1


# -- KooDrive -------------------------------------------------------------------------------------


class FakeKooDrive:
    def __init__(self) -> None:
        self.token = KD_TOKEN
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/koodrive/ose/v1/task/{id}", self.detail)
        return app

    def authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header == f"Bearer {self.token}"
        algorithm, fields = parse_authorization(header)
        if algorithm != "HMAC-SHA256" or fields.get("AppId") != "app-1":
            return False
        if fields.get("SignedHeaders") != "host;x-date;x-user-id":
            return False
        sent = parse_date(request.headers["X-Date"])
        now = datetime.now(UTC)
        if sent > now or now - sent > timedelta(minutes=15):  # never in the future
            return False
        path, _, query = request.raw_path.partition("?")
        expected = app_signature(
            request.method, path, query_pairs(query), dict(request.headers), b"", KD_APP_SECRET
        )
        return hmac.compare_digest(expected, fields.get("Signature", ""))

    async def detail(self, request: web.Request) -> web.Response:
        self.requests += 1
        if not self.authorized(request):
            return json_response({"code": 13000401, "msg": "token invalid"}, 401)
        task_id = request.match_info["id"]
        return json_response(
            {
                "taskId": task_id,
                "taskName": "lym0412normal",
                "taskType": 0,
                "tenantId": "d5ac",
                "userId": "1395",
                "status": 3,
                "resultCode": "18000205",
                "code": 0,
                "msg": "Success.",
            }
        )


@pytest.mark.anyio
async def test_koodrive_bearer_token_and_reload_on_401(tmp_path: Path) -> None:
    fake = FakeKooDrive()
    token_file = tmp_path / "koodrive_token"
    async with serve(fake.app()) as url:
        settings = KooDriveSettings(base_url=url, token=KD_TOKEN)  # type: ignore[arg-type]
        client = KooDriveClient(settings, token_file=token_file)
        try:
            with anyio.fail_after(5):
                fetched = await client.fetch("1534087020903704704")
                fake.token = "rotated-" + KD_TOKEN  # rotated upstream...
                with pytest.raises(UpstreamError) as stale:
                    await client.fetch("1534087020903704704")
                token_file.write_text(fake.token + "\n")  # ...and in the credential file
                again = await client.fetch("1534087020903704704")
                with pytest.raises(UpstreamError) as read_only:
                    await client.apply("1534087020903704704", "comment", {"comment": "x"})
                listed = [task async for task in client.discover()]
        finally:
            await client.aclose()
    assert fetched.payload["taskName"] == "lym0412normal"
    assert fetched.observation.status == "3" and fetched.observation.state is State.FAILED
    assert fetched.observation.extra_status == {"resultCode": "18000205"}
    assert stale.value.kind is ErrorKind.AUTH and "rotated-" not in str(stale.value)
    assert again.content_hash == fetched.content_hash
    assert read_only.value.kind is ErrorKind.PERMANENT and "read-only" in str(read_only.value)
    assert listed == []


@pytest.mark.anyio
async def test_koodrive_app_auth() -> None:
    fake = FakeKooDrive()
    async with serve(fake.app()) as url:
        good = KooDriveClient(
            KooDriveSettings(base_url=url, app_id="app-1", app_secret=KD_APP_SECRET, user_id="u1")  # type: ignore[arg-type]
        )
        bad = KooDriveClient(
            KooDriveSettings(base_url=url, app_id="app-1", app_secret="x" + KD_APP_SECRET, user_id="u1")  # type: ignore[arg-type]
        )  # fmt: skip
        try:
            with anyio.fail_after(5):
                fetched = await good.fetch("42")
                with pytest.raises(UpstreamError) as refused:
                    await bad.fetch("42")
        finally:
            await good.aclose()
            await bad.aclose()
    assert fetched.payload["taskId"] == "42"
    assert refused.value.kind is ErrorKind.AUTH
    assert fake.requests == 2  # app auth has nothing to renew: refused at once
    no_secrets(refused.value)


# -- the factory ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_build_upstreams_for_configured_systems() -> None:
    settings = Settings.model_validate(
        {
            "systems": {
                "aicc": {"base_url": "http://127.0.0.1:1", "client_id": "c", "client_secret": "s"},
                "koodrive": {"base_url": "http://127.0.0.1:1", "token": "t"},
            }
        }
    )
    clients = build_upstreams(settings)
    assert sorted(clients) == ["aicc", "koodrive"]
    assert all(client.system == name for name, client in clients.items())
    for client in clients.values():
        await client.aclose()  # closing a never-used client is fine
    assert build_upstreams(Settings()) == {}


# -- pure parts: observe, time parsing, hashing, the token cache ---------------------------------


@pytest.mark.parametrize(
    ("status", "state"),
    [("Pending", State.OPEN), ("Processing", State.IN_PROGRESS), ("Completed", State.DONE),
     ("pending", State.UNKNOWN), (None, State.UNKNOWN), (3, State.UNKNOWN)],
)  # fmt: skip
def test_aicc_states(status: object, state: State) -> None:
    assert observe_aicc({"taskInfo": {"status": status}}).state is state


@pytest.mark.parametrize(
    ("status", "state"),
    [("waiting", State.OPEN), ("finished", State.DONE), ("canceled", State.CANCELED),
     ("cancelled", State.UNKNOWN), ("", State.UNKNOWN), (None, State.UNKNOWN)],
)  # fmt: skip
def test_secmaster_states(status: object, state: State) -> None:
    assert observe_secmaster({"status": status}).state is state


@pytest.mark.parametrize(
    ("status", "text", "state"),
    [(0, "0", State.OPEN), (1, "1", State.IN_PROGRESS), (2, "2", State.DONE),
     (3, "3", State.FAILED), ("2", "2", State.DONE), (7, "7", State.UNKNOWN),
     (True, None, State.UNKNOWN), (None, None, State.UNKNOWN)],
)  # fmt: skip
def test_koodrive_states(status: object, text: str | None, state: State) -> None:
    observation = observe_koodrive({"status": status})
    assert (observation.status, observation.state) == (text, state)
    assert observation.extra_status == {"resultCode": None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-08-19T14:53:42.424Z+0800", datetime(2025, 8, 19, 6, 53, 42, 424000, UTC)),
        ("2025-08-19T14:53:42Z", datetime(2025, 8, 19, 14, 53, 42, tzinfo=UTC)),
        ("2025-08-19T14:53:42.1+05:30", datetime(2025, 8, 19, 9, 23, 42, 100000, UTC)),
        ("2025-08-19 14:53:42", datetime(2025, 8, 19, 14, 53, 42, tzinfo=UTC)),
        ("2025-08-19T14:53:42.123456789-0100", datetime(2025, 8, 19, 15, 53, 42, 123456, UTC)),
        ("2025-02-30T14:53:42Z", None),
        ("yesterday", None),
        ("", None),
        (1755593622424, None),
    ],
)
def test_secmaster_time(text: object, expected: datetime | None) -> None:
    assert parse_time(text) == expected


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(
    ["taskInfo", "taskTrace", "status", "title", "name", "comments", "attachment_id_list",
     "update_time", "taskName", "resultCode", "id", "message", "time"]
)  # fmt: skip
_junk = st.recursive(
    _json,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(payload=st.dictionaries(_keys, _junk, max_size=6))
def test_observe_never_raises_on_junk(payload: dict[str, Any]) -> None:
    for observe in (observe_aicc, observe_secmaster, observe_koodrive):
        observation = observe(payload)
        assert isinstance(observation.state, State)
        assert observation.status is None or isinstance(observation.status, str)


def test_observe_skips_junk_entries_but_keeps_positions() -> None:
    observation = observe_aicc({"taskInfo": [], "taskTrace": ["x", {"type": "CreateTask"}, 3]})
    assert [t.position for t in observation.trace] == [1]
    sec = observe_secmaster(
        {
            "comments": [{"id": 7, "message": None, "time": "1755593622424"}, {"message": "x"}, 1],
            "attachment_id_list": ["a", None, 5, ""],
            "update_time": {"x": 1},
        }
    )
    assert list(sec.comments) == ["7"] and sec.comments["7"].message == ""
    assert sec.comments["7"].time == datetime(2025, 8, 19, 8, 53, 42, 424000, UTC)
    assert sec.attachments == frozenset({"a", "5"})
    assert sec.changed_at is None


def test_canonical_json_and_content_hash() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == (
        '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()
    )
    assert canonical_json({1: "x", "2": "y"}) == b'{"1":"x","2":"y"}'
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 1.5})
    assert len(content_hash([])) == 64


@pytest.mark.anyio
async def test_token_cache_shares_renewals_and_failures() -> None:
    now = [0.0]
    calls: list[str | None] = []
    fail = [False]

    async def issue(task_id: str | None) -> tuple[str, float]:
        calls.append(task_id)
        await anyio.sleep(0.01)
        if fail[0]:
            raise UpstreamError(ErrorKind.RETRY, "HTTP 503", system="aicc", task_id=task_id)
        return f"t{len(calls)}", 100.0

    cache = TokenCache(issue, clock=lambda: now[0])
    with anyio.fail_after(5):
        first = await cache.get("a")
        assert (first.value, first.refresh_at, first.expires_at) == ("t1", 80.0, 100.0)
        now[0] = 85.0  # renewal due, token still alive
        fail[0] = True
        assert await cache.get("b") is first  # a failed proactive renewal keeps the live token
        now[0] = 101.0  # now it is dead: concurrent callers share one failing attempt
        errors: list[UpstreamError] = []

        async def get(task_id: str) -> None:
            try:
                await cache.get(task_id)
            except UpstreamError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as group:
            for name in "cdef":
                group.start_soon(get, name)
        assert len(calls) == 3 and len(errors) == 4
        assert sorted(e.task_id or "" for e in errors) == ["c", "d", "e", "f"]
        fail[0] = False
        renewed = await cache.renew(first, "g")
        assert renewed.value == "t4"
        assert await cache.renew(first, "h") is renewed  # a stale token renews at most once
        assert len(calls) == 4
