"""AICC case tasks (docs/upstream.md): OAuth2 client-credentials token, detail, process, list.

Envelope: `{"resCode": "0", "resMsg": ..., "result": ...}`. Success is the *string* "0" only;
errors come with HTTP 200 as well as 4xx/5xx. How AICC signals an expired token is **unknown**
(docs/upstream.md): a 401/403, or a non-"0" resCode whose code or message mentions
token/auth/expired, triggers one shared token renewal and one retry.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from functools import partial
from urllib.parse import quote, urlencode

import orjson

from worker.config import AiccSettings
from worker.hashing import content_hash
from worker.model import JSON, Fetched, Observation, State, System, TraceEntry
from worker.redact import Redactor
from worker.text import one_line
from worker.upstreams.base import ErrorKind, Health, UpstreamError, Walk, reword
from worker.upstreams.envelope import as_text, code_and_message, type_name
from worker.upstreams.http import DEFAULT_CONNECTOR_LIMIT, Answer, HttpClient
from worker.upstreams.paging import read_page
from worker.upstreams.tokens import Token, TokenCache
from worker.upstreams.transport import Slots

TOKEN_PATH = "/baas/auth/v1.0/oauth2/token"  # noqa: S105 (a path, not a password)
TASK_PATH = "/service/AICC__Case/1.0.0/openapi/task"
PAGE_SIZE = 100  # the list endpoint's maximum `limit`
# Lifetimes of 7200 s and 1800 s are both documented; when `expires_in` is missing or junk,
# assume the shorter one rather than guess long.
FALLBACK_TOKEN_LIFETIME = 1800.0
DEFAULT_PROCESS_TYPE = "Iternal"  # sic: the only value AICC documents

STATES: Mapping[str, State] = {
    "Pending": State.OPEN,
    "Processing": State.IN_PROGRESS,
    "Completed": State.DONE,
}


def observe_aicc(payload: Mapping[str, JSON]) -> Observation:
    """Pure and total: junk in any field gives None/empty rather than an exception."""
    info = payload.get("taskInfo")
    info = info if isinstance(info, dict) else {}
    status = as_text(info.get("status"))
    trace = payload.get("taskTrace")
    entries = tuple(
        TraceEntry(position, content_hash(entry), entry)
        for position, entry in enumerate(trace if isinstance(trace, list) else ())
        if isinstance(entry, dict)
    )
    return Observation(
        status=status,
        state=STATES.get(status or "", State.UNKNOWN),
        title=as_text(info.get("title")),
        changed_at=None,  # AICC carries no update time
        trace=entries,
    )


def token_lifetime(value: object) -> float:
    """`expires_in`: documented a string, returned a number; anything unusable -> fallback."""
    if isinstance(value, bool):
        return FALLBACK_TOKEN_LIFETIME
    try:
        seconds = float(value) if isinstance(value, int | float | str) else math.nan
    except ValueError:
        return FALLBACK_TOKEN_LIFETIME
    return seconds if math.isfinite(seconds) and seconds > 0 else FALLBACK_TOKEN_LIFETIME


class AiccClient:
    system: System = "aicc"

    def __init__(
        self,
        settings: AiccSettings,
        *,
        connector_limit: int = DEFAULT_CONNECTOR_LIMIT,
        in_flight: Slots | None = None,
        page_delay: float = 0.5,
    ) -> None:
        self._settings = settings
        self._page_delay = page_delay  # backoff base between tries of a failed list page
        self._http = HttpClient(
            "aicc",
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_body_bytes=settings.max_body_bytes,
            rate_limit=settings.rate_limit,
            ca_file=settings.ca_file,
            redactor=Redactor([settings.client_secret]),
            connector_limit=connector_limit,
            in_flight=in_flight,
        )
        self._auth = _TokenAuth(TokenCache(self._issue_token))

    def observe(self, payload: Mapping[str, JSON]) -> Observation:
        return observe_aicc(payload)

    async def aclose(self) -> None:
        await self._http.aclose()

    def health(self) -> Health:
        return self._http.health()

    # -- the three operations --------------------------------------------------------------------

    async def fetch(self, task_id: str) -> Fetched:
        data = await self._call(
            "GET", f"{TASK_PATH}/{quote(task_id, safe='')}", task_id=task_id, write=False
        )
        result = self._object(data, "result", task_id)
        info = self._object(result, "taskInfo", task_id, parent="result.")
        for name in ("status", "title"):
            value = info.get(name)
            if value is not None and not isinstance(value, str):
                raise self._http.malformed(
                    f"result.taskInfo.{name} is {type_name(value)}, expected a string",
                    task_id=task_id,
                    write=False,
                )
        trace = result.get("taskTrace")
        if trace is not None and not isinstance(trace, list):
            raise self._http.malformed(
                f"result.taskTrace is {type_name(trace)}, expected a list",
                task_id=task_id,
                write=False,
            )
        return Fetched.of("aicc", task_id, result, observe_aicc)

    async def apply(self, task_id: str, kind: str, params: Mapping[str, str]) -> Mapping[str, JSON]:
        if kind != "process":
            raise self._http.error(
                ErrorKind.PERMANENT, f"unknown action {kind!r} (aicc has: process)", task_id=task_id
            )
        missing = [name for name in ("title", "description") if not params.get(name)]
        if missing:
            raise self._http.error(
                ErrorKind.PERMANENT, f"process needs {' and '.join(missing)}", task_id=task_id
            )
        creator = params.get("creator_id") or self._settings.creator_id
        if not creator:
            raise self._http.error(
                ErrorKind.PERMANENT,
                "process needs a handler id: give creator_id or set systems.aicc.creator_id",
                task_id=task_id,
            )
        info: dict[str, str] = {
            "type": params.get("type") or DEFAULT_PROCESS_TYPE,
            "title": params["title"],
            "description": params["description"],
        }
        if params.get("attachment"):
            info["attachment"] = params["attachment"]
        body = {"taskId": task_id, "creatorId": creator, "processInfo": info}
        return await self._call(
            "POST", f"{TASK_PATH}/process", task_id=task_id, write=True, payload=body
        )

    async def discover(self, walk: Walk | None = None) -> AsyncIterator[str]:
        creator = self._settings.creator_id
        if not creator:
            raise self._http.error(
                ErrorKind.PERMANENT,
                "discovery needs systems.aicc.creator_id (the task list requires creatorId)",
                task_id=None,
            )
        start, seen = 0, set[str]()
        while True:
            items, total = await read_page(
                partial(self._list_page, start, creator),
                f"task list at start {start}: ",
                self._page_delay,
            )
            if walk is not None:
                walk.pages += 1
            fresh = [task_id for task_id in _ids(items) if task_id not in seen]
            for task_id in fresh:
                seen.add(task_id)
                yield task_id
            start += PAGE_SIZE
            if not fresh or start >= total:  # no new id: a server ignoring start ends here
                return

    async def _list_page(self, start: int, creator: str) -> tuple[list[JSON], int]:
        data = await self._call(
            "POST",
            f"{TASK_PATH}/list",
            task_id=None,
            write=False,
            payload={"start": start, "limit": PAGE_SIZE, "creatorId": creator},
        )
        result = self._object(data, "result", None)
        items = result.get("taskList") or []
        count = result.get("count")
        if not isinstance(items, list):
            raise self._http.malformed(
                f"result.taskList is {type_name(items)}, expected a list",
                task_id=None,
                write=False,
            )
        total = _count(count)
        if total is None:
            raise self._http.malformed(
                f"result.count is {type_name(count)}, expected a number",
                task_id=None,
                write=False,
            )
        return items, total

    # -- plumbing --------------------------------------------------------------------------------

    def _object(
        self, data: Mapping[str, JSON], name: str, task_id: str | None, parent: str = ""
    ) -> dict[str, JSON]:
        value = data.get(name)
        if not isinstance(value, dict):
            raise self._http.malformed(
                f"{parent}{name} is {type_name(value)}, expected an object",
                task_id=task_id,
                write=False,
            )
        return value

    async def _call(
        self,
        method: str,
        path: str,
        *,
        task_id: str | None,
        write: bool,
        payload: JSON = None,
    ) -> dict[str, JSON]:
        return await self._http.exchange(
            method,
            self._http.url(path),
            task_id=task_id,
            write=write,
            auth=self._auth,
            read=lambda answer: self._envelope(answer, task_id=task_id, write=write),
            body=None if payload is None else orjson.dumps(payload),
        )

    def _envelope(self, answer: Answer, *, task_id: str | None, write: bool) -> dict[str, JSON]:
        data = answer.data
        code = data.get("resCode") if isinstance(data, dict) else None
        message = data.get("resMsg") if isinstance(data, dict) else None
        code_text = as_text(code)
        if not answer.ok:
            detail = code_and_message(code_text and f"resCode {code_text}", message)
            error = self._http.status_error(
                answer, task_id=task_id, write=write, detail=detail, code=code_text
            )
            if error.kind is ErrorKind.PERMANENT and self._http.auth_like(code_text, message):
                raise reword(error, task_id=task_id, kind=ErrorKind.AUTH)
            raise error
        if not isinstance(data, dict):
            raise self._http.malformed(
                f"answer is {type_name(data)}, expected an object", task_id=task_id, write=write
            )
        if not isinstance(code, str):
            raise self._http.malformed(
                f'resCode is {type_name(code)} ({code!r}), expected the string "0"',
                task_id=task_id,
                write=write,
            )
        if code != "0":
            raise self._http.error(
                ErrorKind.AUTH if self._http.auth_like(code, message) else ErrorKind.PERMANENT,
                code_and_message(f"resCode {code}", message),
                task_id=task_id,
                http_status=answer.status,
                code=code,
            )
        return data

    async def _issue_token(self, task_id: str | None) -> tuple[str, float]:
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self._settings.client_id,
                "client_secret": self._settings.client_secret.get_secret_value(),
            }
        ).encode()
        try:
            answer = await self._http.send(
                "POST",
                self._http.url(TOKEN_PATH),
                task_id=task_id,
                write=False,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                body=form,
            )
            return self._token_from(answer, task_id)
        except UpstreamError as exc:
            raise reword(exc, task_id=task_id, prefix="token request: ") from None

    def _token_from(self, answer: Answer, task_id: str | None) -> tuple[str, float]:
        data = answer.data if isinstance(answer.data, dict) else {}
        # OAuth2 servers say `error`/`error_description`; AICC's gateway may say resCode/resMsg.
        reason = " ".join(
            one_line(data[k])
            for k in ("error", "error_description", "resCode", "resMsg")
            if k in data
        )
        if not answer.ok:
            error = self._http.status_error(answer, task_id=task_id, write=False, detail=reason)
            if answer.status in (400, 401, 403):  # the client credentials were refused
                raise reword(error, task_id=task_id, kind=ErrorKind.AUTH)
            raise error
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._http.error(
                ErrorKind.AUTH,
                f"no access_token in the answer ({reason or answer.described})",
                task_id=task_id,
                http_status=answer.status,
            )
        self._http.redact.add(token)
        return token, token_lifetime(data.get("expires_in"))


class _TokenAuth:
    """AICC's `access-token` header from the OAuth2 token cache; a refusal renews it once."""

    def __init__(self, tokens: TokenCache) -> None:
        self._tokens = tokens

    async def credential(self, task_id: str | None) -> object:
        return await self._tokens.get(task_id)

    def headers(self, credential: object, method: str, url: str, body: bytes) -> dict[str, str]:
        assert isinstance(credential, Token)
        return {"access-token": credential.value, "Content-Type": "application/json"}

    async def renew(self, credential: object, error: UpstreamError, task_id: str | None) -> object:
        if error.kind is not ErrorKind.AUTH or not isinstance(credential, Token):
            raise error
        return await self._tokens.renew(credential, task_id)


def _ids(items: list[JSON]) -> list[str]:
    """The taskIds of a page of list items; items without one are skipped."""
    ids = (item.get("taskId") if isinstance(item, dict) else None for item in items)
    return [task_id for task_id in ids if isinstance(task_id, str) and task_id]


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
