"""A minimal, independent simulator of the three upstream APIs, for the contract suite.

Written from docs/upstream.md and the vendor documents (docs/sources.md) only: it shares no
code with `worker.sandbox` (nor with the clients), so a wrong assumption baked into both our sandbox and
our clients shows up here. It implements just the documented wire format:

- AICC: OAuth2 token (form body, `expires_in` as a string or a number), detail, process, list;
  answers carry the documented `Content-Type: application/json%3Bcharset=UTF-8`.
- SecMaster: ShowTask, ListTasks, UpdateTask with a fixed `X-Auth-Token`; `X-Request-Id` header.
- KooDrive: detail with `Authorization: Bearer <token>`; `code` as a number or a string.

It runs on its own event loop in a background thread, so synchronous tests can drive the real
`tasksync` command with `subprocess.run` while it serves. State is plain dicts guarded by one
lock; tests change it between commands.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

AICC_CT = "application/json%3Bcharset=UTF-8"  # as AICC's document shows it (escaped ';')

CLIENT_ID = "contract-client"
CLIENT_SECRET = "contract-secret-9f1e"
CREATOR_ID = "10gg00000148QvgpaLAm"
PROJECT_ID = "15645222e8744afa985c93dab6341da6"
WORKSPACE_ID = "75645d0a-93b8-4a7f-a77c-e97009389445"
SECMASTER_TOKEN = "MIIcontract-secmaster-token"
KOODRIVE_TOKEN = "contract-koodrive-token"

AICC_PREFIX = "/service/AICC__Case/1.0.0/openapi/task"
SECMASTER_PREFIX = f"/v1/{PROJECT_ID}/workspaces/{WORKSPACE_ID}/soc/tasks"
KOODRIVE_PREFIX = "/koodrive/ose/v1/task"
PARSED = web.RequestKey("parsed", object)  # the request body, read once by the middleware


@dataclass
class Canned:
    """One forced answer, consumed by the next matching request."""

    status: int  # 0: close the connection instead of answering
    body: Any  # dict/list -> JSON; str -> raw text
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    after_apply: bool = False  # run the real handler first (a write applied, its answer lost)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


def aicc_task(
    task_id: str, status: str = "Pending", title: str = "contract task"
) -> dict[str, Any]:
    """An AICC `result` object shaped like the documented detail answer."""
    return {
        "caseInfos": [],
        "customerInfo": {},
        "taskInfo": {
            "attachment": "",
            "closedDate": None,
            "contactId": "ciIy0000013y7cC8T2rA",
            "createdDate": "2023-07-07 14:51:35",
            "creatorId": CREATOR_ID,
            "creatorName": CREATOR_ID,
            "description": "desc",
            "dueDate": "2023-07-08 00:00:00",
            "id": task_id,
            "ownerId": CREATOR_ID,
            "ownerName": "owner",
            "priority": "Low",
            "relateId": None,
            "status": status,
            "stayDate": None,
            "taskNo": "000000000000000000000000001002",
            "title": title,
            "type": "Case",
        },
        "taskTrace": [
            {
                "creatorId": CREATOR_ID,
                "creatorName": CREATOR_ID,
                "description": None,
                "relatedId": None,
                "title": None,
                "type": "CreateTask",
            }
        ],
    }


def secmaster_task(task_id: str, status: str = "waiting", name: str = "contract todo") -> dict:
    """A SecMaster TaskInfo shaped like the documented UpdateTask answer."""
    return {
        "id": task_id,
        "aopengine_task_id": task_id,
        "name": name,
        "project_id": PROJECT_ID,
        "description": "",
        "create_time": "2025-08-19T14:53:42.424Z+0800",
        "creator_id": "",
        "creator_name": "XXXX",
        "modifier_id": "",
        "modifier_name": "",
        "update_time": "2025-08-19T16:50:23.743Z+0800",
        "approveuser_id": "",
        "approveuser_name": "",
        "approver": "",
        "notes": "",
        "note": "",
        "definition_key": "",
        "due_date": "2025-09-03T14:53:42.424Z+0800",
        "action_id": "",
        "action_version_id": "",
        "action_instance_id": "",
        "workspace_id": WORKSPACE_ID,
        "review_comments": "",
        "view_parameters": "",
        "handle_parameters": "",
        "business_type": "WORKFLOWPUBLISH",
        "related_object": "",
        "attachment_id_list": [],
        "comments": [],
        "status": status,
        "due_handle": "CONTINUE",
    }


def koodrive_task(task_id: str, status: int = 0, code: Any = 0) -> dict[str, Any]:
    """A KooDrive task body shaped like the documented detail answer (flat, no wrapper)."""
    body: dict[str, Any] = {
        "taskId": task_id,
        "taskName": "contract transfer",
        "taskType": 0,
        "tenantId": "d5ac574bd2934a69baa4f23c55daa8d4",
        "userId": "1395497048157130881",
        "status": status,
        "code": code,
        "msg": "Success.",
    }
    if status == 3:
        body["resultCode"] = "18000205"
    return body


class ContractSim:
    """The three APIs on one loopback port, in a background thread."""

    def __init__(self, *, expires_in: Any = "7200", koodrive_code: Any = 0) -> None:
        self.lock = threading.RLock()
        self.aicc: dict[str, dict[str, Any]] = {}
        self.secmaster: dict[str, dict[str, Any]] = {}
        self.koodrive: dict[str, dict[str, Any]] = {}
        self.expires_in = expires_in
        self.koodrive_code = koodrive_code
        self.tokens: set[str] = set()
        self.canned: dict[str, deque[Canned]] = {}
        self.seen: list[Seen] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # --- test-facing helpers -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_toml(self, systems: tuple[str, ...] = ("aicc", "secmaster", "koodrive")) -> str:
        parts = []
        if "aicc" in systems:
            parts.append(
                f'[systems.aicc]\nbase_url = "{self.base_url}"\nclient_id = "{CLIENT_ID}"\n'
                f'client_secret = "{CLIENT_SECRET}"\ncreator_id = "{CREATOR_ID}"\n'
            )
        if "secmaster" in systems:
            parts.append(
                f'[systems.secmaster]\nbase_url = "{self.base_url}"\nproject_id = "{PROJECT_ID}"\n'
                f'workspace_id = "{WORKSPACE_ID}"\ntoken = "{SECMASTER_TOKEN}"\n'
            )
        if "koodrive" in systems:
            parts.append(
                f'[systems.koodrive]\nbase_url = "{self.base_url}"\ntoken = "{KOODRIVE_TOKEN}"\n'
            )
        return "\n".join(parts)

    def push(self, key: str, *answers: Canned) -> None:
        """Force the next answers to requests matching key ("METHOD path-prefix")."""
        with self.lock:
            self.canned.setdefault(key, deque()).extend(answers)

    def requests(self, method: str | None = None, contains: str = "") -> list[Seen]:
        with self.lock:
            return [
                s
                for s in self.seen
                if (method is None or s.method == method) and contains in s.path
            ]

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> ContractSim:
        started = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # pragma: no cover - surfaced to the caller
                errors.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="contract-sim", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("contract simulator did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/baas/auth/v1.0/oauth2/token", self.aicc_token)
        app.router.add_post(f"{AICC_PREFIX}/process", self.aicc_process)
        app.router.add_post(f"{AICC_PREFIX}/list", self.aicc_list)
        app.router.add_get(AICC_PREFIX + "/{id}", self.aicc_detail)
        app.router.add_get(SECMASTER_PREFIX, self.secmaster_list)
        app.router.add_get(SECMASTER_PREFIX + "/{id}", self.secmaster_show)
        app.router.add_put(SECMASTER_PREFIX + "/{id}", self.secmaster_update)
        app.router.add_get(KOODRIVE_PREFIX + "/{id}", self.koodrive_detail)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- plumbing ------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        body: Any
        if request.content_type == "application/x-www-form-urlencoded":
            body = dict((await request.post()).items())
        else:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
        with self.lock:
            self.seen.append(
                Seen(request.method, request.path, dict(request.query), dict(request.headers), body)
            )
            forced = None
            for key, queue in self.canned.items():
                method, _, prefix = key.partition(" ")
                if queue and request.method == method and request.path.startswith(prefix):
                    forced = queue.popleft()
                    break
        request[PARSED] = body
        if forced is not None:
            if forced.after_apply:
                await handler(request)
            if forced.status == 0:  # drop the connection: the answer is lost
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)  # never reaches the closed connection
            text = forced.body if isinstance(forced.body, str) else json.dumps(forced.body)
            return web.Response(
                status=forced.status,
                body=text.encode(),
                headers={"Content-Type": forced.content_type, **forced.headers},
            )
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _json(status: int, obj: Any, content_type: str = "application/json", **headers: str):
        return web.Response(
            status=status,
            body=json.dumps(obj, ensure_ascii=False).encode(),
            headers={"Content-Type": content_type, **headers},
        )

    # --- AICC ----------------------------------------------------------------------------

    async def aicc_token(self, request: web.Request) -> web.Response:
        form = request[PARSED] or {}
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_id") != CLIENT_ID
            or form.get("client_secret") != CLIENT_SECRET
        ):
            return self._json(401, {"error": "invalid_client"}, AICC_CT)
        token = "0000000000" + uuid.uuid4().hex
        with self.lock:
            self.tokens.add(token)
        return self._json(
            200,
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"},
            AICC_CT,
        )

    def _aicc_auth(self, request: web.Request) -> web.Response | None:
        if request.headers.get("access-token") not in self.tokens:
            return self._json(401, {"resCode": "401", "resMsg": "invalid access-token"}, AICC_CT)
        return None

    async def aicc_detail(self, request: web.Request) -> web.Response:
        if (denied := self._aicc_auth(request)) is not None:
            return denied
        with self.lock:
            task = copy.deepcopy(self.aicc.get(request.match_info["id"]))
        if task is None:
            # Not-found shape is unknown upstream: a non-"0" resCode with HTTP 200.
            return self._json(200, {"resCode": "1", "resMsg": "task not exist"}, AICC_CT)
        return self._json(200, {"resCode": "0", "resMsg": "成功", "result": task}, AICC_CT)

    async def aicc_process(self, request: web.Request) -> web.Response:
        if (denied := self._aicc_auth(request)) is not None:
            return denied
        body = request[PARSED] or {}
        info = body.get("processInfo") or {}
        with self.lock:
            task = self.aicc.get(body.get("taskId"))
            if task is None:
                return self._json(200, {"resCode": "1", "resMsg": "task not exist"}, AICC_CT)
            task["taskTrace"].append(
                {
                    "creatorId": body.get("creatorId"),
                    "creatorName": body.get("creatorId"),
                    "description": info.get("description"),
                    "relatedId": None,
                    "title": info.get("title"),
                    "type": "StatusUpdate",
                }
            )
        return self._json(200, {"resCode": "0", "resMsg": "Success"}, AICC_CT)

    async def aicc_list(self, request: web.Request) -> web.Response:
        if (denied := self._aicc_auth(request)) is not None:
            return denied
        body = request[PARSED] or {}
        start, limit = int(body.get("start", 0)), int(body.get("limit", 10))
        if not body.get("creatorId") or not 1 <= limit <= 100 or start < 0:
            return self._json(200, {"resCode": "400", "resMsg": "bad parameter"}, AICC_CT)
        with self.lock:
            ids = sorted(self.aicc)
        page = [
            {"taskId": i, "title": self.aicc[i]["taskInfo"]["title"]}
            for i in ids[start : start + limit]
        ]
        return self._json(
            200,
            {"resCode": "0", "resMsg": "Success", "result": {"taskList": page, "count": len(ids)}},
            AICC_CT,
        )

    # --- SecMaster -----------------------------------------------------------------------

    def _secmaster_auth(self, request: web.Request) -> web.Response | None:
        if request.headers.get("X-Auth-Token") != SECMASTER_TOKEN:
            return self._json(
                401,
                {"error_code": "APIGW.0301", "error_msg": "Incorrect token", "request_id": "x"},
            )
        return None

    def _envelope(self, data: Any, **extra: Any) -> web.Response:
        rid = uuid.uuid4().hex
        body = {"code": "00000000", "message": "", "request_id": rid, "success": True}
        body.update(extra)
        body["data"] = data
        return self._json(200, body, **{"X-Request-Id": rid})

    async def secmaster_show(self, request: web.Request) -> web.Response:
        if (denied := self._secmaster_auth(request)) is not None:
            return denied
        with self.lock:
            task = copy.deepcopy(self.secmaster.get(request.match_info["id"]))
        if task is None:
            return self._json(400, {"code": "SecMaster.20030001", "message": "task not exist"})
        return self._envelope(task)

    async def secmaster_list(self, request: web.Request) -> web.Response:
        if (denied := self._secmaster_auth(request)) is not None:
            return denied
        offset = int(request.query.get("offset", 0))
        limit = int(request.query.get("limit", 10))
        if not 0 <= offset <= 9999 or not 1 <= limit <= 100:
            return self._json(400, {"code": "SecMaster.20030001", "message": "bad parameter"})
        with self.lock:
            tasks = [copy.deepcopy(self.secmaster[k]) for k in sorted(self.secmaster)]
        page = tasks[offset : offset + limit]
        return self._envelope(page, total=len(tasks), size=len(page))

    async def secmaster_update(self, request: web.Request) -> web.Response:
        if (denied := self._secmaster_auth(request)) is not None:
            return denied
        body = request[PARSED] or {}
        action = body.get("action")
        with self.lock:
            task = self.secmaster.get(request.match_info["id"])
            if task is None:
                return self._json(400, {"code": "SecMaster.20030001", "message": "task not exist"})
            if action == "ADD_COMMENT" and body.get("comment"):
                task["comments"].append(
                    {
                        "id": str(uuid.uuid4()),
                        "message": body["comment"],
                        "user_id": "u1",
                        "user_name": "contract",
                        "time": 1755586422424,
                    }
                )
            elif action == "DELETE_COMMENT" and body.get("comment_id"):
                task["comments"] = [c for c in task["comments"] if c["id"] != body["comment_id"]]
            elif action == "ADD_ATTACHMENT" and body.get("attachment_id"):
                task["attachment_id_list"].append(body["attachment_id"])
            elif action == "DELETE_ATTACHMENT" and body.get("attachment_id"):
                task["attachment_id_list"] = [
                    a for a in task["attachment_id_list"] if a != body["attachment_id"]
                ]
            elif action == "TERMINATE":
                task["status"] = "canceled"
            elif action == "CONTINUE":
                task["status"] = "finished"
            else:
                return self._json(400, {"code": "SecMaster.20030001", "message": "bad parameter"})
            data = copy.deepcopy(task)
        return self._envelope(data)

    # --- KooDrive ------------------------------------------------------------------------

    async def koodrive_detail(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KOODRIVE_TOKEN}":
            return self._json(401, {"code": 13000401, "msg": "authentication failed"})
        with self.lock:
            task = copy.deepcopy(self.koodrive.get(request.match_info["id"]))
        if task is None:
            return self._json(200, {"code": 13000309, "msg": "resource does not exist"})
        task["code"] = self.koodrive_code
        return self._json(200, task)
