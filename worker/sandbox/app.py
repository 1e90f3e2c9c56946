"""The aiohttp.web application: the three APIs' routes, wire formats, auth and fault injection.

Every API request runs the same pipeline (`_guarded`): draw a fault, throttle (the gateway
answers 429 before it looks at credentials), authenticate, fail with 500 *before* applying
anything, handle (which may apply an effect), and then slow down, drop or garble the answer
*after* the effect, as a real lost or mangled response would. Token endpoints skip faults.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import anyio
from aiohttp import web

from worker.model import System
from worker.sandbox import payloads, seed
from worker.sandbox.auth import Authenticator
from worker.sandbox.faults import FaultInjector
from worker.sandbox.gateway import Gateway
from worker.sandbox.iam import iam_token_response
from worker.sandbox.state import BusinessError, SandboxState
from worker.sandbox.tasks import AiccTask
from worker.sandbox.wire import (
    AICC_TYPE,
    INTERNAL_ERRORS,
    JSON_TYPE,
    BadRequest,
    aicc_error,
    aicc_time_param,
    envelope,
    gateway_error,
    int_param,
    json_object,
    json_response,
    koodrive_error,
    new_request_id,
    query_int,
    secmaster_error,
    text_param,
)

AICC_PREFIX: Final = "/service/AICC__Case/1.0.0/openapi/task"
SECMASTER_TASKS: Final = "/v1/{project_id}/workspaces/{workspace_id}/soc/tasks"
KOODRIVE_TASK: Final = "/koodrive/ose/v1/task/{task_id}"

SECMASTER_MAX_OFFSET: Final = 9999
SECMASTER_VALUE_FIELD: Final = {
    "ADD_COMMENT": "comment",
    "DELETE_COMMENT": "comment_id",
    "ADD_ATTACHMENT": "attachment_id",
    "DELETE_ATTACHMENT": "attachment_id",
}
MAX_COMMENT: Final = 20_000  # unknown upstream; bounded so a runaway client cannot eat memory

Handle = Callable[[web.Request, bytes], web.Response]


@dataclass
class RequestLog:
    """What arrived: detail reads per task, requests per route, refused credentials per system."""

    detail: Counter[tuple[str, str]] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    auth_failures: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.routes.values())


class Simulator:
    """The request handlers of all three APIs over one SandboxState."""

    def __init__(
        self,
        state: SandboxState,
        faults: FaultInjector,
        auth: Authenticator,
        requests: RequestLog,
        gateway: Gateway | None = None,
    ) -> None:
        self.gateway = gateway or Gateway()
        self.state = state
        self.faults = faults
        self.auth = auth
        self.requests = requests
        self.credentials = state.credentials

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/baas/auth/v1.0/oauth2/token", self.aicc_token)
        app.router.add_post(AICC_PREFIX + "/process", self.aicc_process)
        app.router.add_post(AICC_PREFIX + "/list", self.aicc_list)
        app.router.add_get(AICC_PREFIX + "/{id}", self.aicc_detail, allow_head=False)
        app.router.add_post("/v3/auth/tokens", self.iam_token)
        app.router.add_get(SECMASTER_TASKS, self.secmaster_list, allow_head=False)
        app.router.add_get(SECMASTER_TASKS + "/{task_id}", self.secmaster_show, allow_head=False)
        app.router.add_put(SECMASTER_TASKS + "/{task_id}", self.secmaster_update)
        app.router.add_get(KOODRIVE_TASK, self.koodrive_detail, allow_head=False)
        return app

    # --- the common pipeline ---------------------------------------------------------------

    async def _guarded(
        self, request: web.Request, system: System, route: str, write: bool, handle: Handle
    ) -> web.StreamResponse:
        self.requests.routes[route] += 1
        down = self.faults.spec.down_mode(system) if self.faults.spec.down else None
        if down == "503":
            return gateway_error(503, "APIGW.0202", "The backend service is unavailable")
        if down == "drop":
            return _drop(request)
        broken = self.gateway.admit(system)
        if broken is not None:
            return gateway_error(429, "APIGW.0308", broken.message(), retry_after=False)
        fault, expire = self.faults.draw()
        if expire:
            self.auth.aicc_tokens.revoke_all()
            self.auth.iam_tokens.revoke_all()
        if fault is not None and fault.startswith("429"):
            return gateway_error(
                429,
                "APIGW.0308",
                # the gateway's default policy: a fault, not a limit the client could keep
                "The throttling threshold has been reached: policy user over ratelimit,"
                "limit:200,time:1 second",
                retry_after=fault == "429",
            )
        body = await request.read()
        denial = self._authenticate(system, request, body)
        if denial is not None:
            self.requests.auth_failures[system] += 1
            return gateway_error(
                401, "APIGW.0301", f"Incorrect IAM authentication information: {denial}"
            )
        if fault == "500":
            return INTERNAL_ERRORS[system]()
        if fault == "drop" and not write:
            return _drop(request)
        try:
            response = handle(request, body)
        except BadRequest as exc:
            response = self._bad_request(system, str(exc))
        if fault == "slow":
            await anyio.sleep(self.faults.spec.slow_seconds)
        elif fault == "drop":
            return _drop(request)
        elif fault == "malformed":
            assert isinstance(response.body, bytes)
            return web.Response(
                status=200,
                body=response.body[: len(response.body) // 2],
                headers={"Content-Type": response.headers["Content-Type"]},
            )
        return response

    def _authenticate(self, system: System, request: web.Request, body: bytes) -> str | None:
        if system == "aicc":
            return self.auth.check_aicc(request.headers)
        if system == "secmaster":
            project = request.match_info.get("project_id", "")
            return self.auth.check_secmaster(
                request.method, request.raw_path, request.headers, body, project
            )
        return self.auth.check_koodrive(request.method, request.raw_path, request.headers, body)

    @staticmethod
    def _bad_request(system: System, message: str) -> web.Response:
        if system == "aicc":
            # Validation errors come as HTTP 200 with a non-"0" resCode, as AICC documents
            # that errors may; the code itself is invented.
            return aicc_error(200, "100001", message)
        if system == "secmaster":
            return secmaster_error(400, "SecMaster.20030001", message)
        return koodrive_error(400, 13000102, message)

    # --- AICC -----------------------------------------------------------------------------

    async def aicc_token(self, request: web.Request) -> web.StreamResponse:
        self.requests.routes["aicc.token"] += 1
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return aicc_error(400, "400", "grant_type must be client_credentials")
        creds = self.credentials
        if (
            form.get("client_id") != creds.client_id
            or form.get("client_secret") != creds.client_secret
        ):
            return aicc_error(401, "401", "invalid client_id or client_secret")
        lifetime = self.auth.aicc_tokens.lifetime
        return json_response(
            200,
            {
                "access_token": self.auth.aicc_tokens.issue(),
                "expires_in": int(lifetime) if lifetime == int(lifetime) else lifetime,
                "token_type": "Bearer",
            },
            AICC_TYPE,
        )

    async def aicc_detail(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["id"]
        self.requests.detail[("aicc", task_id)] += 1
        return await self._guarded(request, "aicc", "aicc.detail", False, self._aicc_detail)

    def _aicc_detail(self, request: web.Request, body: bytes) -> web.Response:
        task = self.state.aicc.get(request.match_info["id"])
        if task is None:
            return aicc_error(404, "404", "task not found")
        return web.Response(body=self.state.aicc_body(task), headers={"Content-Type": AICC_TYPE})

    async def aicc_process(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, "aicc", "aicc.process", True, self._aicc_process)

    def _aicc_process(self, request: web.Request, body: bytes) -> web.Response:
        data = json_object(body)
        if data is None:
            return aicc_error(400, "400", "the request body must be a JSON object")
        task_id = text_param(data, "taskId", 255)
        creator_id = text_param(data, "creatorId", 64)
        info = data.get("processInfo")
        if not isinstance(info, dict):
            raise BadRequest("processInfo must be an object")
        process_type = text_param(info, "type", 64)
        if process_type != "Iternal":  # sic: the only documented value
            raise BadRequest(f"processInfo.type {process_type!r} is not supported (Iternal)")
        # Lengths are counted in characters; the document says "bytes" without an encoding.
        title = text_param(info, "title", 128, label="processInfo.title")
        description = text_param(info, "description", 20_000, label="processInfo.description")
        attachment = info.get("attachment")
        if attachment is not None and (not isinstance(attachment, str) or len(attachment) > 255):
            raise BadRequest("processInfo.attachment must be a string of at most 255 characters")
        task = self.state.aicc.get(task_id)
        if task is None:
            return aicc_error(404, "404", "task not found")
        self.state.aicc_process(
            task,
            creator_id=creator_id,
            process_type=process_type,
            title=title,
            description=description,
            attachment=attachment,
        )
        return json_response(200, {"resCode": "0", "resMsg": "Success"}, AICC_TYPE)

    async def aicc_list(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, "aicc", "aicc.list", False, self._aicc_list)

    def _aicc_list(self, request: web.Request, body: bytes) -> web.Response:
        data = json_object(body)
        if data is None:
            return aicc_error(400, "400", "the request body must be a JSON object")
        start = int_param(data, "start", 0, None)
        limit = int_param(data, "limit", 1, 100)
        text_param(data, "creatorId", 64)
        exact = {k: data[k] for k in ("status", "ownerId", "priority") if data.get(k) is not None}
        since = aicc_time_param(data, "startTime")
        until = aicc_time_param(data, "endTime")
        matches: list[AiccTask] = self.state.aicc.order  # unfiltered: discovery's case, no scan
        if exact or since is not None or until is not None:
            matches = [t for t in matches if _aicc_matches(t, exact, since, until)]
        page = [payloads.aicc_summary(t.id, t.n, t.status) for t in matches[start : start + limit]]
        result = {"taskList": page, "count": len(matches)}
        return json_response(200, {"resCode": "0", "resMsg": "成功", "result": result}, AICC_TYPE)

    # --- SecMaster ------------------------------------------------------------------------

    async def iam_token(self, request: web.Request) -> web.StreamResponse:
        self.requests.routes["iam.token"] += 1
        return iam_token_response(self.credentials, self.auth.iam_tokens, await request.read())

    async def secmaster_show(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        self.requests.detail[("secmaster", task_id)] += 1
        return await self._guarded(request, "secmaster", "secmaster.show", False, self._sm_show)

    def _workspace_error(self, request: web.Request) -> web.Response | None:
        info = request.match_info
        creds = self.credentials
        if info["project_id"] != creds.project_id or info["workspace_id"] != creds.workspace_id:
            return secmaster_error(400, "SecMaster.20010001", "workspace does not exist")
        return None

    def _sm_show(self, request: web.Request, body: bytes) -> web.Response:
        error = self._workspace_error(request)
        if error is not None:
            return error
        task = self.state.secmaster.get(request.match_info["task_id"])
        if task is None:
            return secmaster_error(404, "SecMaster.20040004", "task not found")
        return envelope(self.state.secmaster_data(task))

    async def secmaster_list(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, "secmaster", "secmaster.list", False, self._sm_list)

    def _sm_list(self, request: web.Request, body: bytes) -> web.Response:
        error = self._workspace_error(request)
        if error is not None:
            return error
        query = request.query
        offset = query_int(query.get("offset"), "offset", 0, 0, SECMASTER_MAX_OFFSET)
        limit = query_int(query.get("limit"), "limit", 10, 1, 100)
        query_type = query.get("query_type", "my_todo")
        if query_type not in ("my_todo", "all_handled"):
            raise BadRequest(f"query_type {query_type!r} is not my_todo or all_handled")
        sort_key = query.get("sort_key")
        if sort_key not in (None, "create_time", "update_time"):
            raise BadRequest(f"sort_key {sort_key!r} is not create_time or update_time")
        sort_dir = query.get("sort_dir", "DESC")
        if sort_dir not in ("ASC", "DESC"):
            raise BadRequest(f"sort_dir {sort_dir!r} is not ASC or DESC")
        business_type = query.get("business_type")
        # my_todo: the to-dos still waiting for someone; all_handled: the ones dealt with.
        # from_date/to_date (inclusive) filter on create_time, in SecMaster's time format; the
        # real service's choice of field is not documented (docs/upstream.md).
        waiting = query_type == "my_todo"
        since = _list_time(query.get("from_date"), "from_date")
        until = _list_time(query.get("to_date"), "to_date")
        creds = self.credentials
        matches = [
            t
            for t in self.state.secmaster
            if (t.status == "waiting") == waiting
            and (
                business_type is None
                or payloads.secmaster_business_type(t.n, creds.project_id, creds.workspace_id)
                == business_type
            )
            and (since is None or payloads.secmaster_created_ms(t.n) >= since)
            and (until is None or payloads.secmaster_created_ms(t.n) <= until)
        ]
        if sort_key is not None:  # without one: creation order in the sandbox
            if sort_key == "create_time":
                matches.sort(
                    key=lambda t: payloads.secmaster_created_ms(t.n), reverse=sort_dir == "DESC"
                )
            else:
                matches.sort(key=lambda t: t.update_ms(), reverse=sort_dir == "DESC")
        page = matches[offset : offset + limit]
        data = b"[" + b",".join(self.state.secmaster_data(t) for t in page) + b"]"
        request_id = new_request_id()
        head = b'{"code":"00000000","message":"","request_id":"%s","success":true,' % (
            request_id.encode()
        )
        body_out = head + b'"total":%d,"size":%d,"data":%s}' % (len(matches), len(page), data)
        return web.Response(
            body=body_out, headers={"Content-Type": JSON_TYPE, "X-Request-Id": request_id}
        )

    async def secmaster_update(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, "secmaster", "secmaster.update", True, self._sm_update)

    def _sm_update(self, request: web.Request, body: bytes) -> web.Response:
        error = self._workspace_error(request)
        if error is not None:
            return error
        data = json_object(body)
        if data is None:
            raise BadRequest("the request body must be a JSON object")
        action = data.get("action")
        if not isinstance(action, str):
            raise BadRequest("action is required")
        name = SECMASTER_VALUE_FIELD.get(action)
        value = data.get(name) if name else None
        if value is not None and (not isinstance(value, str) or len(value) > MAX_COMMENT):
            raise BadRequest(f"{name} must be a string of at most {MAX_COMMENT} characters")
        task = self.state.secmaster.get(request.match_info["task_id"])
        if task is None:
            return secmaster_error(404, "SecMaster.20040004", "task not found")
        creds = self.credentials
        try:
            self.state.secmaster_update(task, action, value, (creds.user_id, creds.username))
        except BusinessError as exc:
            return secmaster_error(400, exc.code, exc.message)
        return envelope(self.state.secmaster_data(task))

    # --- KooDrive -------------------------------------------------------------------------

    async def koodrive_detail(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        self.requests.detail[("koodrive", task_id)] += 1
        return await self._guarded(request, "koodrive", "koodrive.detail", False, self._kd_detail)

    def _kd_detail(self, request: web.Request, body: bytes) -> web.Response:
        task = self.state.koodrive.get(request.match_info["task_id"])
        if task is None:
            return koodrive_error(200, 13000309, "resource does not exist")
        return web.Response(
            body=self.state.koodrive_body(task), headers={"Content-Type": JSON_TYPE}
        )


def _aicc_matches(
    task: AiccTask, exact: dict[str, Any], since: float | None, until: float | None
) -> bool:
    if "status" in exact and task.status != exact["status"]:  # cheap test first
        return False
    summary = payloads.aicc_summary(task.id, task.n, task.status)
    if any(summary[k] != v for k, v in exact.items()):
        return False
    created = seed.created_epoch(task.n)
    return (since is None or created >= since) and (until is None or created <= until)


def _list_time(value: str | None, name: str) -> int | None:
    """A from_date/to_date parameter as epoch milliseconds; BadRequest when unreadable."""
    if value is None:
        return None
    # Parsed here, not with the client's parser: the simulator is a check on the client.
    try:
        moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ%z")
    except ValueError:
        raise BadRequest(
            f"{name} {value!r} is not a time like 2025-08-19T14:53:42.424Z+0800"
        ) from None
    return int(moment.timestamp() * 1000)


def _drop(request: web.Request) -> web.Response:
    """Close the connection without an answer. aiohttp then fails to write the response we
    return (the transport is closing), treats it as a client disconnect and sends nothing."""
    request.protocol.force_close()
    return web.Response(status=204)
