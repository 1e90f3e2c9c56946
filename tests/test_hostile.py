"""Hostile input, end to end: each bad thing costs only the task (or the row) it concerns.

- Upstream answers: a small hostile `aiohttp.web` upstream answers some task ids of each system
  with something hostile (huge, deep, non-UTF-8, NaN, wrong types, missing fields, HTML with
  200, a redirect to another host, a trickling body, ...) and the others with a good answer; a
  real `tasksync sync` then must record an error naming system and task on exactly the hostile
  tasks and store the others, on both databases.
- Database input: rows inserted into `actions` by SQL with SQL-looking text in every column,
  unknown kinds, bad JSON, missing and oversized parameters: each is failed with a reason or
  applied with its text taken literally, and every table is intact afterwards.
- Configuration: inline secrets in a world-readable file warn; `http://` to a non-loopback
  host is refused; there is no key that turns TLS verification off.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web
from pydantic import SecretStr

from tests.support.cli import run_cli
from tests.support.db import Database, count, rows
from tests.support.sandbox import clients, settings_for
from tests.support.web import json_response, serve
from worker.actions import ActionRunner
from worker.config import ConfigError, load_config
from worker.model import SYSTEMS, System
from worker.sandbox import Sandbox
from worker.store import Store

pytestmark = pytest.mark.anyio

AICC_SECRET = "hostile-aicc-client-secret-7d1f"
AICC_TOKEN = "hostile-aicc-access-token-52c9"
SM_TOKEN = "hostile-secmaster-token-e83a"
KD_TOKEN = "hostile-koodrive-token-0b44"
CAP = 256 * 1024  # max_body_bytes in the configuration below
TIMEOUT = 2.0  # the systems' timeout: a trickling body must end within it
PLACEHOLDER = b'"@@HOSTILE@@"'
SECRETS = (AICC_SECRET, AICC_TOKEN, SM_TOKEN, KD_TOKEN)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- what a good answer looks like ---------------------------------------------------------------


def task_fields(system: System, task_id: str) -> dict[str, Any]:
    """The object that carries status and title: AICC taskInfo, SecMaster data, KooDrive body."""
    if system == "aicc":
        return {
            "taskId": task_id,
            "status": "Pending",
            "title": f"case {task_id}",
            "priority": "High",
        }
    if system == "secmaster":
        return {
            "id": task_id,
            "name": f"to-do {task_id}",
            "status": "waiting",
            "comments": [
                {
                    "id": f"c-{task_id}",
                    "message": "first look",
                    "user_id": "u1",
                    "time": 1755586422424,
                }
            ],
            "attachment_id_list": ["att-1"],
            "update_time": "2025-08-19T14:53:42.424Z+0800",
        }
    return {
        "code": 0,
        "msg": "success",
        "taskId": task_id,
        "taskName": f"transfer {task_id}",
        "status": 1,
    }


def stored_payload(system: System, fields: dict[str, Any]) -> dict[str, Any]:
    """What tasksync stores for an answer built by `body_for` around `fields`."""
    if system == "aicc":
        return {"taskInfo": fields, "taskTrace": [{"type": "CreateTask", "title": "opened"}]}
    return fields


def body_for(system: System, fields: dict[str, Any] | bytes) -> bytes:
    """A whole answer around `fields` (raw bytes are spliced in verbatim)."""
    inner = fields if isinstance(fields, bytes) else orjson.dumps(fields)
    if system == "aicc":
        trace = orjson.dumps([{"type": "CreateTask", "title": "opened"}])
        return b'{"resCode":"0","resMsg":"Success","result":{"taskInfo":%s,"taskTrace":%s}}' % (
            inner,
            trace,
        )
    if system == "secmaster":
        return (
            b'{"code":"00000000","message":"","request_id":"r1","success":true,"data":%s}' % inner
        )
    return inner


def spliced(system: System, task_id: str, raw: bytes, field: str | None = None) -> bytes:
    """A good answer whose title (or `field`) is replaced by raw, possibly invalid, JSON bytes."""
    name = field or {"aicc": "title", "secmaster": "name", "koodrive": "taskName"}[system]
    fields = task_fields(system, task_id) | {name: "@@HOSTILE@@"}
    return body_for(system, orjson.dumps(fields)).replace(PLACEHOLDER, raw)


# -- the hostile answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fragment: str  # what last_error must say after "<system> task <id>: " ("a|b": either)
    respond: Callable[[System, str, web.Request], Awaitable[web.StreamResponse]]
    systems: tuple[System, ...] = SYSTEMS


def fixed(
    make: Callable[[System, str], bytes], **kwargs: Any
) -> Callable[..., Awaitable[web.StreamResponse]]:
    async def respond(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
        return json_response(make(system, task_id), **kwargs)

    return respond


async def huge_declared(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
    fields = task_fields(system, task_id) | {"padding": "x" * (2 * CAP)}
    return json_response(body_for(system, fields))


async def huge_streamed(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
    """No Content-Length: the cap must be enforced while reading, not from a header."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"padding":"')
    try:
        for _ in range(64):  # up to 4 MB, far past the cap; the client hangs up before
            await response.write(b"y" * 65536)
    except (ConnectionError, RuntimeError):
        return response
    await response.write(b'"}')
    return response


async def gzip_bomb(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
    """A small compressed body that inflates far beyond the cap."""
    fields = task_fields(system, task_id) | {"padding": "z" * (40 * CAP)}
    packed = gzip.compress(body_for(system, fields), compresslevel=9)
    assert len(packed) < CAP // 4
    return web.Response(
        body=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )


async def trickle(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
    """Slowloris: a valid answer, one byte every 100 ms (about a minute in all)."""
    body = body_for(system, task_fields(system, task_id) | {"padding": "." * 600})
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", "Content-Length": str(len(body))}
    )
    await response.prepare(request)
    try:
        for i in range(len(body)):
            await response.write(body[i : i + 1])
            await anyio.sleep(0.1)
    except (ConnectionError, RuntimeError):
        pass
    return response


async def cut_off(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
    """Content-Length promises more than is sent, then the connection closes."""
    body = body_for(system, task_fields(system, task_id))
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", "Content-Length": str(len(body) + 500)}
    )
    await response.prepare(request)
    await response.write(body)
    assert request.transport is not None
    request.transport.close()
    return response


async def echo_credentials(
    system: System, task_id: str, request: web.Request
) -> web.StreamResponse:
    """A 400 whose message quotes the request's headers back, credentials included."""
    seen = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
    text = f"rejected request with headers {seen}"
    body: dict[str, Any] = {
        "resCode": "400001",
        "resMsg": text,
        "code": "SecMaster.20030001",
        "message": text,
    }
    body |= {"msg": text} if system == "koodrive" else {}
    if system == "koodrive":
        body["code"] = 13000102
    return web.json_response(body, status=400)


def redirect(evil: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    async def respond(system: System, task_id: str, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"{evil}/steal?task={task_id}"})

    return respond


def cases(evil: str) -> list[Case]:
    deep = b"[" * 5000 + b"]" * 5000
    common = [
        Case("nan", "not JSON", fixed(lambda s, t: spliced(s, t, b"NaN"))),
        Case("infinity", "not JSON", fixed(lambda s, t: spliced(s, t, b"-Infinity"))),
        Case("huge-number", "not JSON", fixed(lambda s, t: spliced(s, t, b"1e400"))),
        Case("non-utf8", "not JSON", fixed(lambda s, t: spliced(s, t, b'"caf\xe9 \xff\xfe"'))),
        Case("lone-surrogate", "not JSON", fixed(lambda s, t: spliced(s, t, b'"\\ud800x"'))),
        Case("deep-nesting", "not JSON", fixed(lambda s, t: spliced(s, t, deep))),
        Case("huge-body", f"exceeds the {CAP}-byte limit", huge_declared),
        Case("huge-streamed", f"exceeds the {CAP}-byte limit", huge_streamed),
        Case("gzip-bomb", f"exceeds the {CAP}-byte limit", gzip_bomb),
        Case(
            "html-200",
            "not JSON (text/html",
            fixed(
                lambda s, t: b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            ),
        ),
        Case("empty-200", "answer is empty", fixed(lambda s, t: b"")),
        Case(
            "truncated", "truncated JSON", fixed(lambda s, t: body_for(s, task_fields(s, t))[:40])
        ),
        Case("top-level-array", "expected an object", fixed(lambda s, t: b"[1, 2, 3]")),
        Case("top-level-string", "expected an object", fixed(lambda s, t: b'"ok"')),
        Case("redirect", "redirect to 127.0.0.1; redirects are never followed", redirect(evil)),
        Case("echo-credentials", "HTTP 400", echo_credentials),
        Case("trickle", f"no complete answer within {TIMEOUT:g}s", trickle),
        Case("cut-off", "answer cut off after|connection lost after", cut_off),
        Case("title-is-a-number", "expected a string", fixed(lambda s, t: spliced(s, t, b"12345"))),
        Case(
            "status-is-an-object",
            "status is an object",
            fixed(lambda s, t: spliced(s, t, b'{"code": 1}', field="status")),
        ),
    ]
    aicc: list[tuple[str, str, bytes]] = [
        (
            "rescode-number",
            'resCode is a number (0), expected the string "0"',
            b'{"resCode":0,"result":{"taskInfo":{}}}',
        ),
        ("rescode-missing", "resCode is null", b'{"resMsg":"ok","result":{"taskInfo":{}}}'),
        ("result-missing", "result is null, expected an object", b'{"resCode":"0","resMsg":"ok"}'),
        ("result-list", "result is a list, expected an object", b'{"resCode":"0","result":[]}'),
        (
            "taskinfo-missing",
            "result.taskInfo is null",
            b'{"resCode":"0","result":{"taskTrace":[]}}',
        ),
        (
            "taskinfo-string",
            "result.taskInfo is a string",
            b'{"resCode":"0","result":{"taskInfo":"x"}}',
        ),
        (
            "trace-object",
            "result.taskTrace is an object",
            b'{"resCode":"0","result":{"taskInfo":{},"taskTrace":{}}}',
        ),
        (
            "rescode-error-200",
            "resCode 10001: database busy",
            b'{"resCode":"10001","resMsg":"database busy"}',
        ),
    ]
    secmaster: list[tuple[str, str, bytes]] = [
        (
            "code-number",
            'code is a number (0), expected the string "00000000"',
            b'{"code":0,"success":true,"data":{}}',
        ),
        ("no-code-no-success", "neither code 00000000 nor success true", b'{"data":{"id":"x"}}'),
        ("success-false", "success=False", b'{"success":false,"data":{}}'),
        ("data-missing", "data is null, expected an object", b'{"code":"00000000","success":true}'),
        (
            "data-list",
            "data is a list, expected an object",
            b'{"code":"00000000","success":true,"data":[]}',
        ),
        (
            "comments-object",
            "data.comments is an object",
            b'{"code":"00000000","data":{"comments":{}}}',
        ),
        (
            "comment-string",
            "data.comments[0] is a string",
            b'{"code":"00000000","data":{"comments":["hi"]}}',
        ),
        (
            "attachments-string",
            "data.attachment_id_list is a string",
            b'{"code":"00000000","data":{"attachment_id_list":"a"}}',
        ),
    ]
    koodrive: list[tuple[str, str, bytes]] = [
        ("code-missing", 'code is null, expected 0 or "0"', b'{"taskId":"x","status":1}'),
        ("code-list", 'code is a list, expected 0 or "0"', b'{"code":[],"status":1}'),
        ("code-bool", 'code is a boolean, expected 0 or "0"', b'{"code":false,"status":1}'),
        ("status-bool", "status is a boolean, expected a number", b'{"code":0,"status":true}'),
        (
            "code-error-200",
            "code 13000410: no permission",
            b'{"code":13000410,"msg":"no permission"}',
        ),
    ]
    out = list(common)
    by_system: tuple[tuple[System, list[tuple[str, str, bytes]]], ...] = (
        ("aicc", aicc),
        ("secmaster", secmaster),
        ("koodrive", koodrive),
    )
    for system, specific in by_system:
        for name, fragment, body in specific:
            out.append(Case(name, fragment, fixed(lambda s, t, b=body: b), systems=(system,)))  # type: ignore[misc]
    return out


def odd_but_valid(system: System, task_id: str, n: int) -> dict[str, Any]:
    """Good answers that are unusual but not wrong: extra fields, missing optional fields, odd
    types where the client does not care, exotic text. These must be stored as they came."""
    fields = task_fields(system, task_id)
    variants: list[dict[str, Any]] = [
        fields | {"unexpected": {"nested": [1, 2, {"deeper": None}]}, "another": True},
        {k: v for k, v in fields.items() if k not in ("title", "name", "taskName", "comments")},
        fields
        | {
            "title"
            if system == "aicc"
            else "name"
            if system == "secmaster"
            else "taskName": "ünïcødé 工单 🚀 \u202eRTL\u200b"
        },
        fields
        | {"big": 18446744073709551615, "tiny": -9223372036854775808, "float": 0.1, "exp": 2.5e-8},
        fields | {"note": "'); DROP TABLE tasks; -- \" OR 1=1"},
        fields | {"shallow": json.loads("[" * 200 + "]" * 200)},
    ]
    if system == "secmaster":  # entries of fields the client reads defensively
        variants.append(
            fields
            | {
                "comments": [
                    {"id": {"x": 1}, "message": 5},
                    {"id": "c2", "message": None, "time": "never"},
                ]
            }
        )
    if system == "aicc":
        variants.append(fields | {"customerInfo": 5, "caseInfos": "none"})
    if system == "koodrive":
        variants.append(fields | {"resultCode": [], "tenantId": False, "status": "1"})
    return variants[n % len(variants)]


# -- the hostile upstream ------------------------------------------------------------------------


class HostileUpstream:
    """The three APIs' detail routes (and AICC's token route) answering per task id."""

    def __init__(self) -> None:
        self.answers: dict[
            tuple[System, str], Callable[[web.Request], Awaitable[web.StreamResponse]]
        ] = {}
        self.requests: dict[tuple[System, str], int] = {}
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/baas/auth/v1.0/oauth2/token", self._aicc_token)
        app.router.add_get("/service/AICC__Case/1.0.0/openapi/task/{id}", self._aicc)
        app.router.add_get("/v1/{p}/workspaces/{w}/soc/tasks/{id}", self._secmaster)
        app.router.add_get("/koodrive/ose/v1/task/{id}", self._koodrive)
        return app

    async def _aicc_token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if form.get("client_secret") != AICC_SECRET:
            return web.json_response({"resCode": "401", "resMsg": "bad client"}, status=401)
        return web.json_response({"access_token": AICC_TOKEN, "expires_in": 7200})

    async def _aicc(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("access-token") != AICC_TOKEN:
            return web.json_response({"resCode": "401", "resMsg": "token"}, status=401)
        return await self._answer("aicc", request)

    async def _secmaster(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Auth-Token") != SM_TOKEN:
            return web.json_response({"error_code": "APIGW.0301", "error_msg": "auth"}, status=401)
        return await self._answer("secmaster", request)

    async def _koodrive(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {KD_TOKEN}":
            return web.json_response({"code": 13000401, "msg": "auth"}, status=401)
        return await self._answer("koodrive", request)

    async def _answer(self, system: System, request: web.Request) -> web.StreamResponse:
        key = (system, request.match_info["id"])
        self.requests[key] = self.requests.get(key, 0) + 1
        handler = self.answers.get(key)
        if handler is None:
            return web.json_response({"resCode": "404", "resMsg": "no such task"}, status=404)
        return await handler(request)

    def config(self, database_url: str) -> str:
        url = self.url
        return "\n".join(
            [
                "[database]",
                f'url = "{database_url}"',
                "",
                "[systems.aicc]",
                f'base_url = "{url}"',
                'client_id = "hostile-client"',
                f'client_secret = "{AICC_SECRET}"',
                f"timeout = {TIMEOUT}",
                f"max_body_bytes = {CAP}",
                "",
                "[systems.secmaster]",
                f'base_url = "{url}"',
                'project_id = "p1"',
                'workspace_id = "w1"',
                f'token = "{SM_TOKEN}"',
                f"timeout = {TIMEOUT}",
                f"max_body_bytes = {CAP}",
                "",
                "[systems.koodrive]",
                f'base_url = "{url}"',
                f'token = "{KD_TOKEN}"',
                f"timeout = {TIMEOUT}",
                f"max_body_bytes = {CAP}",
                "",
            ]
        )


class Evil:
    """Another host that a redirect points at: it must never be asked anything."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.seen.append(f"{request.method} {request.path_qs} {dict(request.headers)}")
            return web.json_response({"stolen": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


def _decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def test_hostile_answers_cost_only_their_own_task(
    database: Database, store: Store, tmp_path: Path
) -> None:
    upstream, evil = HostileUpstream(), Evil()
    async with (
        serve(evil.app(), handler_cancellation=True) as evil_url,
        serve(upstream.app(), handler_cancellation=True) as url,
    ):
        upstream.url = url
        all_cases = cases(evil_url)
        hostile: dict[tuple[System, str], Case] = {}
        good: dict[tuple[System, str], dict[str, Any]] = {}
        for case in all_cases:
            for system in case.systems:
                task_id = f"hostile-{case.name}"
                hostile[(system, task_id)] = case
                upstream.answers[(system, task_id)] = lambda request, c=case, s=system, t=task_id: (
                    c.respond(s, t, request)
                )
        for system in SYSTEMS:
            for n in range(12):
                task_id = f"good-{n:02d}"
                fields = (
                    odd_but_valid(system, task_id, n) if n >= 4 else task_fields(system, task_id)
                )
                good[(system, task_id)] = stored_payload(system, fields)
                upstream.answers[(system, task_id)] = lambda request, s=system, f=fields: _good(
                    s, f
                )
        for system in SYSTEMS:
            await store.track(system, sorted(t for s, t in (*hostile, *good) if s == system))
        config = tmp_path / "tasksync.toml"
        config.write_text(upstream.config(database.url))
        config.chmod(0o600)

        started = time.monotonic()
        with anyio.fail_after(90):
            result = await anyio.to_thread.run_sync(
                lambda: run_cli(
                    "--config", str(config), "--log-level", "debug", "sync", "--quiet", timeout=80
                )
            )
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        # the echoed credentials reach neither the log nor (below) the stored errors
        leaked = [s for s in SECRETS if s in result.stdout + result.stderr]
        assert leaked == [], leaked
        # every request that could hang was bounded by the timeout (plus process start-up)
        assert elapsed < TIMEOUT + 20, elapsed
        assert evil.seen == [], "a redirect was followed to another host"

    tasks = {
        (r["system"], r["task_id"]): r
        for r in await rows(
            store,
            "SELECT system, task_id, last_error, consecutive_failures, snapshot_seq, status "
            "FROM tasks",
        )
    }
    wrong: list[str] = []
    for (system, task_id), case in hostile.items():
        row = tasks[(system, task_id)]
        error = row["last_error"] or ""
        prefix = f"{system} task {task_id}: "
        if not (error.startswith(prefix) and any(f in error for f in case.fragment.split("|"))):
            wrong.append(f"{system} {case.name}: {error!r} (expected {case.fragment!r})")
        elif row["snapshot_seq"] != 0 or row["consecutive_failures"] != 1:
            wrong.append(f"{system} {case.name}: stored something {row}")
        elif "\n" in error or len(error) > 700:
            wrong.append(f"{system} {case.name}: not one bounded line: {error!r}")
    for key, payload in good.items():
        row = tasks[key]
        if row["last_error"] is not None or row["snapshot_seq"] != 1:
            wrong.append(f"good {key}: {row}")
            continue
        [snap] = await rows(
            store,
            "SELECT payload FROM task_snapshots WHERE system = :s AND task_id = :t",
            s=key[0],
            t=key[1],
        )
        if _decode(snap["payload"]) != payload:
            wrong.append(f"good {key}: stored {snap['payload']!r:.200}")
    assert not wrong, "\n".join(wrong)
    echoed = [tasks[(s, "hostile-echo-credentials")]["last_error"] for s in SYSTEMS]
    assert all("***" in e for e in echoed), echoed
    everything = " ".join(str(r) for r in await rows(store, "SELECT * FROM tasks"))
    assert [s for s in SECRETS if s in everything] == []
    [run] = await rows(store, "SELECT polled, failed FROM sync_runs")
    assert (run["polled"], run["failed"]) == (len(hostile) + len(good), len(hostile))
    # each hostile task was asked once: nothing was retried in a loop within the cycle
    assert await count(store, "task_snapshots") == len(good)


async def _good(system: System, fields: dict[str, Any]) -> web.StreamResponse:
    return json_response(body_for(system, fields))


async def test_a_nul_character_in_an_answer_costs_only_its_task(
    database: Database, store: Store, tmp_path: Path
) -> None:
    """JSON may carry \\u0000; PostgreSQL text and JSONB cannot hold it. Whatever tasksync does
    with it (store it escaped, or refuse the answer), the other tasks of the batch must be
    stored."""
    upstream = HostileUpstream()
    async with serve(upstream.app(), handler_cancellation=True) as url:
        upstream.url = url
        for system in SYSTEMS:
            upstream.answers[(system, "nul-title")] = lambda request, s=system: _raw(
                spliced(s, "nul-title", b'"before\\u0000after"')
            )
            upstream.answers[(system, "nul-extra")] = lambda request, s=system: _raw(
                body_for(s, task_fields(s, "nul-extra") | {"note": "a\x00b"})
            )
            for n in range(3):
                fields = task_fields(system, f"good-{n}")
                upstream.answers[(system, f"good-{n}")] = lambda request, s=system, f=fields: _good(
                    s, f
                )
            await store.track(system, ["nul-title", "nul-extra", "good-0", "good-1", "good-2"])
        config = tmp_path / "tasksync.toml"
        config.write_text(upstream.config(database.url))
        config.chmod(0o600)
        with anyio.fail_after(60):
            result = await anyio.to_thread.run_sync(
                lambda: run_cli("--config", str(config), "sync", "--quiet", timeout=50)
            )
    assert result.returncode == 0, result.stderr[-3000:]
    stored = await rows(
        store,
        "SELECT system, task_id, last_error, snapshot_seq FROM tasks ORDER BY system, task_id",
    )
    good_rows = [r for r in stored if r["task_id"].startswith("good-")]
    assert all(r["snapshot_seq"] == 1 and r["last_error"] is None for r in good_rows), stored
    nul_rows = [r for r in stored if r["task_id"].startswith("nul-")]
    for row in nul_rows:  # stored, or an error naming the task: never silently nothing
        assert row["snapshot_seq"] == 1 or (row["last_error"] or "").startswith(
            f"{row['system']} task {row['task_id']}: "
        ), row


async def _raw(body: bytes) -> web.StreamResponse:
    return json_response(body)


# -- database input ------------------------------------------------------------------------------

SQL_LOOKING = [
    "'; DROP TABLE actions; --",
    "x' OR '1'='1",
    '"); DELETE FROM tasks; --',
    "1; UPDATE actions SET status='succeeded'",
    "Robert'); DROP TABLE task_events;--",
    "$$; DROP TABLE sync_runs; $$",
    "\\'; TRUNCATE action_attempts; --",
]


async def _table_counts(store: Store) -> dict[str, int]:
    names = ("tasks", "task_snapshots", "task_events", "actions", "action_attempts", "sync_runs")
    return {name: await count(store, name) for name in names}


async def test_sql_looking_text_in_every_column_is_data(database: Database, store: Store) -> None:
    async with Sandbox(seed=41, tasks_per_system=4) as sb:
        settings = settings_for(sb, database.url)
        waiting = [
            t for t in sb.task_ids("secmaster") if sb.payload("secmaster", t)["status"] == "waiting"
        ]
        target, aicc = waiting[0], sb.task_ids("aicc")[0]
        cast = "CAST(:p AS JSONB)" if database.kind == "postgres" else ":p"
        insert = sa.text(
            f"INSERT INTO actions (system, task_id, kind, params, idempotency_key) "
            f"VALUES (:s, :t, :k, {cast}, :key)"
        )
        bad: list[tuple[str, str, str, str, str]] = []  # system, task, kind, params, fragment
        for n, text in enumerate(SQL_LOOKING):
            bad += [
                (
                    text,
                    target,
                    "comment",
                    orjson.dumps({"comment": "x"}).decode(),
                    "unknown system",
                ),
                ("secmaster", target, text, "{}", "unknown secmaster action"),
                (
                    "secmaster",
                    target,
                    "comment",
                    orjson.dumps({text: "x"}).decode(),
                    "does not take",
                ),
                (
                    "secmaster",
                    target,
                    "delete-comment",
                    orjson.dumps({"comment_id": text}).decode(),
                    "does not exist",
                ),
                (
                    "secmaster",
                    target + text[: n + 1],
                    "comment",
                    orjson.dumps({"comment": "x"}).decode(),
                    "not found",
                ),
            ]
        good_texts = [f"{text} #{n}" for n, text in enumerate(SQL_LOOKING)]
        async with store.engine.begin() as conn:
            for n, (system, task, kind, params, _) in enumerate(bad):
                await conn.execute(
                    insert, {"s": system, "t": task, "k": kind, "p": params, "key": f"bad-{n}"}
                )
            for text in good_texts:
                params = orjson.dumps({"comment": text}).decode()
                await conn.execute(
                    insert,
                    {"s": "secmaster", "t": target, "k": "comment", "p": params, "key": text},
                )
            params = orjson.dumps(
                {"title": SQL_LOOKING[0][:128], "description": SQL_LOOKING[1], "creator_id": "x'--"}
            ).decode()
            await conn.execute(
                insert, {"s": "aicc", "t": aicc, "k": "process", "p": params, "key": SQL_LOOKING[2]}
            )
        before = await _table_counts(store)
        async with clients(settings) as upstreams:
            with anyio.fail_after(60):
                await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
        after = await _table_counts(store)
        outcome = await rows(
            store, "SELECT id, system, task_id, kind, status, last_error FROM actions ORDER BY id"
        )
        assert len(outcome) == len(bad) + len(good_texts) + 1
        for row, (_, _, _, _, fragment) in zip(outcome, bad, strict=False):
            assert row["status"] == "failed" and fragment in (row["last_error"] or ""), (
                row,
                fragment,
            )
        rest = outcome[len(bad) :]
        assert [r["status"] for r in rest] == ["succeeded"] * len(rest), rest
        # the SQL-looking comments went upstream verbatim, once each, in order
        seen = [e.params["comment"] for e in sb.applied("secmaster", target)]
        assert seen == good_texts
        [process] = sb.applied("aicc", aicc)
        assert process.params["title"] == SQL_LOOKING[0][:128]
        assert process.params["description"] == SQL_LOOKING[1]
        assert process.params["creator_id"] == "x'--"
        # every table is still there, nothing was deleted, nothing but our rows changed
        assert after["actions"] == before["actions"]
        assert after["tasks"] >= before["tasks"]
        # one attempt per action that reached the upstream: the good ones and the deletes of a
        # comment that does not exist (unknown tasks fail on the read before the first attempt)
        assert after["action_attempts"] == len(rest) + len(SQL_LOOKING)
        keys = await rows(store, "SELECT idempotency_key FROM actions ORDER BY id")
        assert [k["idempotency_key"] for k in keys][len(bad) :] == [*good_texts, SQL_LOOKING[2]]


async def test_sql_looking_text_through_the_command_line_is_data(
    database: Database, store: Store, tmp_path: Path
) -> None:
    env = {"TASKSYNC_DATABASE__URL": database.url}
    task = SQL_LOOKING[0]
    comment = SQL_LOOKING[4]
    results = []
    for args in (
        ("track", "secmaster", task, SQL_LOOKING[1]),
        ("enqueue", "secmaster", task, "comment", "--comment", comment, "--key", SQL_LOOKING[2]),
        (
            "enqueue",
            "aicc",
            SQL_LOOKING[3],
            "process",
            "--title",
            SQL_LOOKING[5],
            "--description",
            SQL_LOOKING[6],
        ),
        ("show", "secmaster", task, "--json"),
        ("actions", "--json"),
    ):
        result = await anyio.to_thread.run_sync(lambda a=args: run_cli(*a, env=env, cwd=tmp_path))
        assert result.returncode == 0, (args, result.stderr)
        results.append(result)
    shown = json.loads(results[3].stdout)
    assert shown["task"]["task_id"] == task
    assert [a["params"] for a in shown["actions"]] == [{"comment": comment}]
    listed = json.loads(results[4].stdout)
    assert [(a["task_id"], a["idempotency_key"]) for a in listed] == [
        (task, SQL_LOOKING[2]),
        (SQL_LOOKING[3], None),
    ]
    counts = await _table_counts(store)
    assert (counts["tasks"], counts["actions"]) == (3, 2)
    stored = await rows(store, "SELECT task_id FROM tasks ORDER BY id")
    assert [r["task_id"] for r in stored] == [task, SQL_LOOKING[1], SQL_LOOKING[3]]


async def test_oversized_and_malformed_rows_are_failed_with_a_reason(
    database: Database, store: Store
) -> None:
    async with Sandbox(seed=42, tasks_per_system=2) as sb:
        settings = settings_for(sb, database.url)
        sec = sb.task_ids("secmaster")[0]
        cast = "CAST(:p AS JSONB)" if database.kind == "postgres" else ":p"
        insert = sa.text(
            f"INSERT INTO actions (system, task_id, kind, params) VALUES (:s, :t, :k, {cast})"
        )
        bad = [
            ("secmaster", sec, "comment", {"comment": "c" * 20_001}, "at most 20000"),
            ("secmaster", sec, "add-attachment", {"attachment_id": "a" * 256}, "at most 255"),
            ("aicc", "t", "process", {"title": "t", "description": "d" * 20_001}, "at most 20000"),
            (
                "secmaster",
                sec,
                "comment",
                {"comment": "x", "extra": "y" * 1_000_000},
                "does not take extra",
            ),
            ("secmaster", sec, "comment", {"comment": ["a", "list"]}, "must be a string"),
            (
                "secmaster",
                sec,
                "comment",
                {"comment": {"nested": {"deeper": 1}}},
                "must be a string",
            ),
            ("secmaster", sec, "comment", {"comment": None}, "needs comment"),
            ("secmaster", sec, "comment", {"comment": "   "}, "must not be empty"),
            ("secmaster", sec, "comment", [1, 2], "must be a JSON object"),
            ("secmaster", sec, "comment", 42, "must be a JSON object"),
            ("secmaster", sec, "terminate", {"comment": "no"}, "does not take comment"),
            ("secmaster", sec, "comment\x01", {"comment": "x"}, "unknown secmaster action"),
            ("x" * 300, sec, "comment", {"comment": "x"}, "unknown system"),
            ("secmaster", sec, "k" * 300, {}, "unknown secmaster action"),
        ]
        async with store.engine.begin() as conn:
            for system, task, kind, params, _ in bad:
                await conn.execute(
                    insert, {"s": system, "t": task, "k": kind, "p": orjson.dumps(params).decode()}
                )
            if database.kind == "sqlite":  # PostgreSQL refuses these at INSERT time itself
                for text in ("{'single': 'quotes'}", '{"comment": "x"', "NaN", ""):
                    await conn.execute(
                        sa.text(
                            "INSERT INTO actions (system, task_id, kind, params) "
                            "VALUES ('secmaster', :t, 'comment', :p)"
                        ),
                        {"t": sec, "p": text},
                    )
            else:
                with pytest.raises(sa.exc.DBAPIError):
                    async with conn.begin_nested():
                        await conn.execute(
                            sa.text(
                                "INSERT INTO actions (system, task_id, kind, params) "
                                "VALUES ('secmaster', 'x', 'comment', CAST('{bad' AS JSONB))"
                            )
                        )
        async with clients(settings) as upstreams:
            with anyio.fail_after(60):
                await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
        outcome = await rows(store, "SELECT status, last_error FROM actions ORDER BY id")
        assert all(r["status"] == "failed" and r["last_error"] for r in outcome), outcome
        for row, (*_, fragment) in zip(outcome, bad, strict=False):
            assert fragment in row["last_error"], (fragment, row["last_error"][:300])
        for row in outcome[len(bad) :]:
            assert "params is not valid JSON" in row["last_error"], row
        # nothing reached the upstream
        assert sb.applied() == []


async def test_errors_about_oversized_rows_are_bounded(database: Database, store: Store) -> None:
    """A 10,000-character system or kind must not come back whole in last_error (and in every
    log line about it): the message names what is wrong in bounded text."""
    async with Sandbox(seed=45, tasks_per_system=1) as sb:
        settings = settings_for(sb, database.url)
        sec = sb.task_ids("secmaster")[0]
        async with store.engine.begin() as conn:
            for system, kind in (("x" * 10_000, "comment"), ("secmaster", "k" * 10_000)):
                await conn.execute(
                    sa.text(
                        "INSERT INTO actions (system, task_id, kind, params) "
                        "VALUES (:s, :t, :k, '{}')"
                    ),
                    {"s": system, "t": sec, "k": kind},
                )
        async with clients(settings) as upstreams:
            with anyio.fail_after(30):
                await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
        outcome = await rows(store, "SELECT status, last_error FROM actions ORDER BY id")
        assert [r["status"] for r in outcome] == ["failed", "failed"]
        assert "unknown system" in outcome[0]["last_error"]
        assert "unknown secmaster action" in outcome[1]["last_error"]
        assert [len(r["last_error"]) < 1000 for r in outcome] == [True, True], [
            len(r["last_error"]) for r in outcome
        ]


# -- configuration -------------------------------------------------------------------------------


def _write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


async def test_inline_secrets_in_a_world_readable_file_warn(tmp_path: Path) -> None:
    async with Sandbox(seed=43, tasks_per_system=1) as sb:
        db = f"sqlite:///{tmp_path / 'w.db'}"
        env = {"TASKSYNC_DATABASE__URL": db}
        secrets = sb.credentials
        values = (secrets.client_secret, secrets.sk, secrets.koodrive_token)
        loose = _write(tmp_path / "loose.toml", sb.config_toml(), 0o644)
        tight = _write(tmp_path / "tight.toml", sb.config_toml(), 0o600)
        for command in (["status"], ["sync", "--quiet"]):
            warned = await anyio.to_thread.run_sync(
                lambda c=command: run_cli("--config", str(loose), *c, env=env)
            )
            assert warned.returncode == 0, warned.stderr
            assert "readable by everyone and holds secrets inline" in warned.stderr
            for key in (
                "systems.aicc.client_secret",
                "systems.secmaster.sk",
                "systems.koodrive.token",
            ):
                assert key in warned.stderr
            # the warning names the keys, never their values
            assert not [v for v in values if v in warned.stderr + warned.stdout]
        quiet = await anyio.to_thread.run_sync(
            lambda: run_cli("--config", str(tight), "status", env=env)
        )
        assert quiet.returncode == 0 and "readable" not in quiet.stderr, quiet.stderr
        # the same check in-process, for the other modes and auth modes
        group = _write(tmp_path / "group.toml", sb.config_toml(), 0o640)
        assert "readable by its group" in " ".join(load_config(str(group), {}).warnings)
        for secmaster_auth, koodrive_auth, keys in (
            ("iam", "app", ("systems.secmaster.password", "systems.koodrive.app_secret")),
            ("token", "token", ("systems.secmaster.token", "systems.koodrive.token")),
        ):
            text = sb.config_toml(secmaster_auth=secmaster_auth, koodrive_auth=koodrive_auth)  # type: ignore[arg-type]
            warnings = " ".join(
                load_config(str(_write(tmp_path / "m.toml", text, 0o604)), {}).warnings
            )
            assert all(k in warnings for k in keys), warnings
        # world-readable but no inline secrets (they come from the environment): no warning
        public = _write(
            tmp_path / "public.toml",
            "\n".join(
                line
                for line in sb.config_toml(systems=["aicc"]).splitlines()
                if not line.startswith("client_secret")
            ),
            0o644,
        )
        result = await anyio.to_thread.run_sync(
            lambda: run_cli(
                "--config",
                str(public),
                "status",
                env=env | {"TASKSYNC_SYSTEMS__AICC__CLIENT_SECRET": secrets.client_secret},
            )
        )
        assert result.returncode == 0 and "readable" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("base_url", "refused"),
    [
        ("http://service.besclouds.com", True),
        ("http://10.0.0.7:8080", True),
        ("http://[2001:db8::1]/", True),
        ("http://127.0.0.1.evil.example", True),
        ("http://localhost.evil.example:80", True),
        ("ftp://127.0.0.1/", True),
        ("http://user:pw@127.0.0.1/", True),
        ("https://service.besclouds.com", False),
        ("http://127.0.0.1:9", False),
        ("http://[::1]:9", False),
        ("http://localhost:9", False),
    ],
)
async def test_plain_http_to_a_remote_host_is_refused(
    tmp_path: Path, base_url: str, refused: bool
) -> None:
    config = _write(
        tmp_path / "t.toml",
        f'[systems.koodrive]\nbase_url = "{base_url}"\ntoken = "kd-token-123456"\n',
        0o600,
    )
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 't.db'}"}
    result = await anyio.to_thread.run_sync(
        lambda: run_cli("--config", str(config), "status", env=env)
    )
    if refused:
        assert result.returncode == 78, (result.returncode, result.stderr)
        assert "systems.koodrive.base_url" in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    else:
        assert result.returncode == 0, result.stderr
    # the same through the environment, and for every system and SecMaster's iam_url
    variables = {
        "TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL": base_url,
        "TASKSYNC_SYSTEMS__KOODRIVE__TOKEN": "kd-token-123456",
    }
    sections = {
        "aicc": f'base_url = "{base_url}"\nclient_id = "c"\nclient_secret = "s"',
        "secmaster": f'base_url = "{base_url}"\nproject_id = "p"\nworkspace_id = "w"\ntoken = "t"',
        "secmaster.iam_url": (
            'base_url = "https://secmaster.example"\nproject_id = "p"\nworkspace_id = "w"\n'
            f'iam_url = "{base_url}"\nusername = "u"\npassword = "p"\ndomain = "d"\nregion = "r"'
        ),
    }
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL", lambda: load_config(None, variables))
    ]
    for name, body in sections.items():
        system = name.partition(".")[0]
        file = _write(tmp_path / f"{name}.toml", f"[systems.{system}]\n{body}\n", 0o600)
        key = f"systems.{name}" if "." in name else f"systems.{name}.base_url"
        attempts.append((key, lambda f=file: load_config(str(f), {})))
    for named, attempt in attempts:
        if refused:
            with pytest.raises(ConfigError, match=re.escape(named)):
                attempt()
        else:
            attempt()


TLS_OFF = (
    "verify_tls = false",
    "ssl = false",
    "verify = false",
    "verify_ssl = false",
    "insecure = true",
    "tls_verify = false",
    "ssl_verify = false",
    "insecure_skip_verify = true",
)


@pytest.mark.parametrize("key", TLS_OFF)
async def test_tls_verification_cannot_be_turned_off(tmp_path: Path, key: str) -> None:
    name = key.split(" =")[0]
    async with Sandbox(seed=44, tasks_per_system=1) as sb:
        texts = {
            system: sb.config_toml(systems=[system]).replace(
                f"[systems.{system}]\n", f"[systems.{system}]\n{key}\n"
            )
            for system in SYSTEMS
        }
        plain = sb.config_toml()
    # a real command, for one system per key: exit 78 naming the key
    system = SYSTEMS[TLS_OFF.index(key) % 3]
    config = _write(tmp_path / "t.toml", texts[system], 0o600)
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 't.db'}"}
    result = await anyio.to_thread.run_sync(
        lambda: run_cli("--config", str(config), "sync", env=env)
    )
    assert result.returncode == 78, (result.returncode, result.stderr)
    assert re.search(rf"systems\.{system}\.{name} \(from .*t\.toml\): unknown key", result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # every system, any other section, the top level, and the environment: all refused
    for system, text in texts.items():
        with pytest.raises(
            ConfigError, match=rf"systems\.{system}\.{name} \(from .*\): unknown key"
        ):
            load_config(str(_write(tmp_path / "s.toml", text, 0o600)), {})
        variable = f"TASKSYNC_SYSTEMS__{system.upper()}__{name.upper()}"
        with pytest.raises(ConfigError, match=re.escape(f"(from {variable}): unknown key")):
            load_config(str(_write(tmp_path / "p.toml", plain, 0o600)), {variable: "false"})
    for section in ("[worker]\n", "[database]\n", "[retry]\n", ""):
        text = (plain + "\n" + section + key + "\n") if section else (key + "\n" + plain)
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(str(_write(tmp_path / "x.toml", text, 0o600)), {})


@pytest.mark.parametrize("refusal", ["wrong-credential", "throttled-forever", "failing-forever"])
async def test_an_action_on_a_task_that_cannot_be_read_fails_after_max_attempts(
    database: Database, store: Store, refusal: str
) -> None:
    """Before its first attempt an action on a task never synced reads the task once (its
    baseline). When that read keeps failing (a refused credential, 429 or 503 forever), the
    action must still end `failed` after max_attempts, like any retried action, instead of
    being rescheduled forever (with AK/SK, five refused signatures in a row lock the key)."""
    async with Sandbox(seed=46, tasks_per_system=2) as sb:
        settings = settings_for(sb, database.url)
        systems = settings.systems
        if refusal == "wrong-credential":
            assert systems.secmaster is not None
            settings = settings.model_copy(
                update={
                    "systems": systems.model_copy(
                        update={
                            "secmaster": systems.secmaster.model_copy(
                                update={"sk": SecretStr("wrongSK0000000000000000000000000000")}
                            )
                        }
                    )
                }
            )
        else:
            sb.set_faults("429=1.0" if refusal == "throttled-forever" else "500=1.0")
        settings = settings.model_copy(
            update={"retry": settings.retry.model_copy(update={"max_attempts": 3})}
        )
        task = sb.task_ids("secmaster")[0]
        await store.enqueue("secmaster", task, "comment", {"comment": "never readable"})
        runner = ActionRunner(store, {}, settings, "w1")
        async with clients(settings) as upstreams:
            runner.upstreams = upstreams
            with anyio.fail_after(5):  # a correct runner needs well under a second here
                while await count(store, "actions", "status IN ('pending', 'running')"):
                    await runner.run_until_idle()
                    await anyio.sleep(0.05)
        [row] = await rows(store, "SELECT status, attempts, last_error FROM actions")
        assert row["status"] == "failed" and row["last_error"], row
        assert sb.applied() == []
        # bounded: a handful of reads, not one per backoff step for ever
        assert sb.requests.routes["secmaster.show"] + sb.requests.routes["secmaster.update"] <= 10
