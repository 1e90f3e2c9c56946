"""SecMaster to-do tasks (docs/upstream.md): ShowTask, UpdateTask (PUT), ListTasks.

Three auth modes: AK/SK request signing (X-Project-Id sent and signed), an IAM
password token (X-Subject-Token, re-authenticated once on 401), or a fixed X-Auth-Token.

Envelope decision: success needs HTTP 2xx and `code == "00000000"` (a string: the number 0 is a
wrong type, not success). The SDK models every envelope field as optional, so an answer without
`code` is accepted only when `success` is literally true; a present `code` that is not
"00000000" is an error even next to `success: true`, and `success: false` is never success.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal
from urllib.parse import quote

import orjson

from worker import catalog
from worker.config import SecMasterSettings
from worker.model import JSON, Comment, Fetched, Observation, State, System
from worker.redact import Redactor
from worker.text import one_line
from worker.upstreams.base import ErrorKind, Health, UpstreamError, Walk, reword
from worker.upstreams.envelope import as_text, code_and_message, type_name
from worker.upstreams.http import DEFAULT_CONNECTOR_LIMIT, Answer, HttpClient
from worker.upstreams.paging import read_page
from worker.upstreams.signing import sign_sdk
from worker.upstreams.tokens import Token, TokenCache
from worker.upstreams.transport import Slots

log = logging.getLogger(__name__)

SUCCESS = "00000000"
PAGE_SIZE = 100  # ListTasks' maximum limit
MAX_ROWS = 10_000  # ListTasks refuses offsets from here on: at most this many rows per query
DISCOVERY_START = datetime(2000, 1, 1, tzinfo=UTC)  # before any SecMaster task was created
IAM_FALLBACK_LIFETIME = 3600.0  # when token.expires_at is unreadable (documented: 24 h)
IAM_MIN_LIFETIME = 60.0  # a clock-skewed "already expired" answer must not renew every request

STATES: Mapping[str, State] = {
    "waiting": State.OPEN,
    "finished": State.DONE,
    "canceled": State.CANCELED,
}

# action kind -> (UpdateTask action, the parameter it carries), from the catalogue
ACTIONS: Mapping[str, tuple[str, str | None]] = {
    spec.kind: (spec.upstream, spec.required[0] if spec.required else None)
    for spec in catalog.ACTIONS.values()
    if spec.system == "secmaster"
}

_TIME = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?\s*(Z)?\s*"
    r"(?:([+-])(\d{2}):?(\d{2}))?$"
)


def parse_time(value: object) -> datetime | None:
    """SecMaster times such as `2025-08-19T14:53:42.424Z+0800`, or None when unreadable.

    The literal 'Z' *and* an offset is not ISO 8601; it reads like Java's
    `yyyy-MM-dd'T'HH:mm:ss.SSS'Z'Z`, i.e. local time followed by its offset with a quoted 'Z'.
    That reading is **unknown** upstream (nothing documents it): the offset wins when present,
    a lone 'Z' or no zone at all means UTC.
    """
    if not isinstance(value, str):
        return None
    match = _TIME.match(value.strip())
    if match is None:
        return None
    day, clock, fraction, _z, sign, hours, minutes = match.groups()
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}")
        if fraction:
            moment += timedelta(microseconds=int(fraction[:6].ljust(6, "0")))
        zone = UTC
        if sign:
            delta = timedelta(hours=int(hours), minutes=int(minutes))
            zone = timezone(-delta if sign == "-" else delta)
        return moment.replace(tzinfo=zone).astimezone(UTC)
    except ValueError:
        return None


def _epoch_ms(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        millis = float(value)
        return datetime.fromtimestamp(millis / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def observe_secmaster(payload: Mapping[str, JSON]) -> Observation:
    """Pure and total: junk in any field gives None/empty rather than an exception."""
    status = as_text(payload.get("status"))
    comments: dict[str, Comment] = {}
    raw_comments = payload.get("comments")
    for entry in raw_comments if isinstance(raw_comments, list) else ():
        if not isinstance(entry, dict):
            continue
        comment_id = as_text(entry.get("id"))
        if not comment_id:
            continue
        message = entry.get("message")
        comments[comment_id] = Comment(
            id=comment_id,
            message=message if isinstance(message, str) else "",
            time=_epoch_ms(entry.get("time")),
            entry=entry,
        )
    raw_attachments = payload.get("attachment_id_list")
    attachments = frozenset(
        text
        for item in (raw_attachments if isinstance(raw_attachments, list) else ())
        if (text := as_text(item))
    )
    return Observation(
        status=status,
        state=STATES.get(status or "", State.UNKNOWN),
        title=as_text(payload.get("name")),
        changed_at=parse_time(payload.get("update_time")),
        comments=comments,
        attachments=attachments,
    )


class SecMasterClient:
    system: System = "secmaster"

    def __init__(
        self,
        settings: SecMasterSettings,
        *,
        connector_limit: int = DEFAULT_CONNECTOR_LIMIT,
        in_flight: Slots | None = None,
        page_delay: float = 0.5,
    ) -> None:
        self._settings = settings
        self._page_delay = page_delay  # backoff base between tries of a failed list page
        self._mode: Literal["aksk", "iam", "token"] = settings.auth_mode
        self._http = HttpClient(
            "secmaster",
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_body_bytes=settings.max_body_bytes,
            rate_limit=settings.rate_limit,
            ca_file=settings.ca_file,
            redactor=Redactor([settings.ak, settings.sk, settings.password, settings.token]),
            connector_limit=connector_limit,
            in_flight=in_flight,
        )
        self._tokens = TokenCache(self._issue_iam_token) if self._mode == "iam" else None
        project = quote(settings.project_id, safe="")
        workspace = quote(settings.workspace_id, safe="")
        self._tasks_path = f"/v1/{project}/workspaces/{workspace}/soc/tasks"

    def observe(self, payload: Mapping[str, JSON]) -> Observation:
        return observe_secmaster(payload)

    async def aclose(self) -> None:
        await self._http.aclose()

    def health(self) -> Health:
        return self._http.health()

    # -- the three operations --------------------------------------------------------------------

    async def fetch(self, task_id: str) -> Fetched:
        envelope = await self._call(
            "GET", f"{self._tasks_path}/{quote(task_id, safe='')}", task_id=task_id, write=False
        )
        data = self._task_info(envelope, task_id, write=False)
        return Fetched.of("secmaster", task_id, data, observe_secmaster)

    async def apply(self, task_id: str, kind: str, params: Mapping[str, str]) -> Mapping[str, JSON]:
        if kind not in ACTIONS:
            raise self._http.error(
                ErrorKind.PERMANENT,
                f"unknown action {kind!r} (secmaster has: {', '.join(ACTIONS)})",
                task_id=task_id,
            )
        action, field = ACTIONS[kind]
        body: dict[str, str] = {"action": action}
        if field is not None:
            value = params.get(field)
            if not value:
                raise self._http.error(
                    ErrorKind.PERMANENT, f"{kind} needs {field}", task_id=task_id
                )
            body[field] = value
        envelope = await self._call(
            "PUT",
            f"{self._tasks_path}/{quote(task_id, safe='')}",
            task_id=task_id,
            write=True,
            payload=body,
        )
        return envelope

    async def discover(self, walk: Walk | None = None) -> AsyncIterator[str]:
        seen: set[str] = set()
        for query_type in self._settings.discover_query_types:
            async for task_id in self._walk(query_type, None, seen, walk or Walk()):
                yield task_id

    async def _walk(
        self,
        query_type: str,
        window: tuple[datetime, datetime] | None,
        seen: set[str],
        walk: Walk,
        first: tuple[list[JSON], int] | None = None,
    ) -> AsyncIterator[str]:
        """Every task of one list (`query_type`), optionally created within `window`.

        ListTasks refuses offsets of 10,000 and more, so a list longer than that is narrowed
        by from_date/to_date: the window is halved until each part holds fewer rows."""
        offset = 0
        while True:
            if offset == 0 and first is not None:
                items, total = first
            else:
                items, total = await self._page(query_type, window, offset)
                walk.pages += 1
            if offset == 0 and total > MAX_ROWS:
                halves = _halves(window or (DISCOVERY_START, datetime.now(UTC) + timedelta(days=1)))
                parts = (
                    [] if halves is None else [await self._page(query_type, h, 0) for h in halves]
                )
                walk.pages += len(parts)
                if halves is not None and not all(t == total for _, t in parts):
                    for half, part in zip(halves, parts, strict=True):
                        async for task_id in self._walk(query_type, half, seen, walk, part):
                            yield task_id
                    return
                log.warning(
                    "secmaster %s list holds %d tasks that from_date/to_date cannot narrow "
                    "(created within one second, or the dates are ignored): only the first "
                    "%d can be listed",
                    query_type,
                    total,
                    MAX_ROWS,
                )
            fresh = [task_id for task_id in _ids(items, "id") if task_id not in seen]
            for task_id in fresh:
                seen.add(task_id)
                yield task_id
            offset += PAGE_SIZE
            if not fresh or offset >= min(total, MAX_ROWS):  # no new id: offset is ignored
                return

    async def _page(
        self, query_type: str, window: tuple[datetime, datetime] | None, offset: int
    ) -> tuple[list[JSON], int]:
        query = [("limit", str(PAGE_SIZE)), ("offset", str(offset)), ("query_type", query_type)]
        where = f"task list at offset {offset} ({query_type}"
        if window is not None:
            start, end = (_list_time(t) for t in window)
            query += [("from_date", start), ("to_date", end)]
            where += f", created {start} to {end}"
        where += ")"

        async def read() -> tuple[list[JSON], int]:
            envelope = await self._call(
                "GET", self._tasks_path, query=query, task_id=None, write=False
            )
            return self._page_items(envelope)

        return await read_page(read, where + ": ", self._page_delay)

    # -- plumbing --------------------------------------------------------------------------------

    def _page_items(self, envelope: Mapping[str, JSON]) -> tuple[list[JSON], int]:
        items = envelope.get("data")
        total = envelope.get("total")
        if not isinstance(items, list):
            raise self._http.malformed(
                f"data is {type_name(items)}, expected a list", task_id=None, write=False
            )
        if isinstance(total, bool) or not isinstance(total, int):
            raise self._http.malformed(
                f"total is {type_name(total)}, expected a number", task_id=None, write=False
            )
        return items, total

    def _task_info(
        self, envelope: Mapping[str, JSON], task_id: str, write: bool
    ) -> dict[str, JSON]:
        data = envelope.get("data")
        problem = None
        if not isinstance(data, dict):
            problem = f"data is {type_name(data)}, expected an object"
        else:
            for name, expected, kind in (
                ("status", "a string", str),
                ("name", "a string", str),
                ("comments", "a list", list),
                ("attachment_id_list", "a list", list),
            ):
                value = data.get(name)
                if value is not None and not isinstance(value, kind):
                    problem = f"data.{name} is {type_name(value)}, expected {expected}"
                    break
            else:
                for index, comment in enumerate(data.get("comments") or ()):
                    if not isinstance(comment, dict):
                        problem = (
                            f"data.comments[{index}] is {type_name(comment)}, expected an object"
                        )
                        break
        if problem is not None:
            raise self._http.malformed(problem, task_id=task_id, write=write)
        assert isinstance(data, dict)
        return data

    def _headers(self, method: str, url: str, body: bytes, token: Token | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Project-Id": self._settings.project_id}
        if self._mode == "aksk":
            sk = self._settings.sk
            assert self._settings.ak is not None and sk is not None  # config: one complete mode
            # Signed per attempt: X-Sdk-Date must be within 15 minutes of the server's clock.
            return sign_sdk(method, url, headers, body, self._settings.ak, sk.get_secret_value())
        if token is not None:
            headers["X-Auth-Token"] = token.value
        elif self._settings.token is not None:
            headers["X-Auth-Token"] = self._settings.token.get_secret_value()
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        *,
        task_id: str | None,
        write: bool,
        query: list[tuple[str, str]] | None = None,
        payload: JSON = None,
    ) -> dict[str, JSON]:
        return await self._http.exchange(
            method,
            self._http.url(path, query or ()),
            task_id=task_id,
            write=write,
            auth=self,
            read=lambda answer: self._envelope(answer, task_id=task_id, write=write),
            body=None if payload is None else orjson.dumps(payload),
        )

    # -- authentication (the Auth flow of HttpClient.exchange) ----------------------------------

    async def credential(self, task_id: str | None) -> object:
        return await self._tokens.get(task_id) if self._tokens is not None else None

    def headers(self, credential: object, method: str, url: str, body: bytes) -> dict[str, str]:
        token = credential if isinstance(credential, Token) else None
        return self._headers(method, url, body, token)

    async def renew(self, credential: object, error: UpstreamError, task_id: str | None) -> object:
        # Only an IAM token is worth renewing, and only on 401 (403 refuses the user's
        # permissions, which a new token for the same user does not change). A refused AK/SK
        # signature is final at once: five failures in a row lock the AK/SK.
        if error.http_status != 401 or self._tokens is None or not isinstance(credential, Token):
            raise error
        return await self._tokens.renew(credential, task_id)

    def _envelope(self, answer: Answer, *, task_id: str | None, write: bool) -> dict[str, JSON]:
        data = answer.data
        fields = data if isinstance(data, dict) else {}
        # Business errors say code/message; the API gateway says error_code/error_msg.
        code = as_text(fields.get("code")) or as_text(fields.get("error_code"))
        message = fields.get("message") or fields.get("error_msg") or ""
        if not answer.ok:
            detail = code_and_message(code, message)
            if answer.status == 401 and self._mode == "aksk":
                detail += " (AK/SK refused; not retried: repeated failures lock the AK/SK)"
            raise self._http.status_error(
                answer, task_id=task_id, write=write, detail=detail, code=code
            )
        if not isinstance(data, dict):
            raise self._http.malformed(
                f"answer is {type_name(data)}, expected an object", task_id=task_id, write=write
            )
        raw_code, success = data.get("code"), data.get("success")
        if "code" in data and not isinstance(raw_code, str):
            raise self._http.malformed(
                f'code is {type_name(raw_code)} ({raw_code!r}), expected the string "{SUCCESS}"',
                task_id=task_id,
                write=write,
            )
        if raw_code is not None and raw_code != SUCCESS:
            raise self._http.error(
                ErrorKind.PERMANENT,
                code_and_message(raw_code, message),
                task_id=task_id,
                http_status=answer.status,
                code=raw_code,
            )
        if success is False or (raw_code is None and success is not True):
            raise self._http.malformed(
                f"answer says neither code {SUCCESS} nor success true (success={success!r})",
                task_id=task_id,
                write=write,
            )
        return data

    async def _issue_iam_token(self, task_id: str | None) -> tuple[str, float]:
        settings = self._settings
        assert settings.iam_url and settings.password is not None  # config: iam mode complete
        request = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": settings.username,
                            "password": settings.password.get_secret_value(),
                            "domain": {"name": settings.domain},
                        }
                    },
                },
                "scope": {"project": {"name": settings.region}},
            }
        }
        try:
            answer = await self._http.send(
                "POST",
                settings.iam_url.rstrip("/") + "/v3/auth/tokens",
                task_id=task_id,
                write=False,
                headers={"Content-Type": "application/json"},
                body=orjson.dumps(request),
            )
            return self._iam_token_from(answer, task_id)
        except UpstreamError as exc:
            raise reword(exc, task_id=task_id, prefix="IAM token request: ") from None

    def _iam_token_from(self, answer: Answer, task_id: str | None) -> tuple[str, float]:
        data = answer.data if isinstance(answer.data, dict) else {}
        if not answer.ok:
            error = data.get("error")
            detail = ""
            if isinstance(error, dict):  # IAM: {"error": {"code": 401, "message": ..., "title"}}
                detail = one_line(error.get("message") or error.get("title") or "")
            elif "error_msg" in data:
                detail = f"{as_text(data.get('error_code'))}: {one_line(data['error_msg'])}"
            failure = self._http.status_error(answer, task_id=task_id, write=False, detail=detail)
            if answer.status in (400, 401, 403):  # the password or the scope was refused
                raise reword(failure, task_id=task_id, kind=ErrorKind.AUTH)
            raise failure
        token = answer.headers.get("X-Subject-Token")
        if not token:
            raise self._http.error(
                ErrorKind.AUTH,
                f"HTTP {answer.status} without an X-Subject-Token header",
                task_id=task_id,
                http_status=answer.status,
            )
        self._http.redact.add(token)
        info = data.get("token")
        expires = parse_iso(info.get("expires_at") if isinstance(info, dict) else None)
        if expires is None:
            return token, IAM_FALLBACK_LIFETIME
        lifetime = (expires - datetime.now(UTC)).total_seconds()
        return token, max(IAM_MIN_LIFETIME, lifetime)


def _halves(
    window: tuple[datetime, datetime],
) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]] | None:
    """The window split in two (from_date and to_date are both inclusive, to the
    millisecond); None when it is a second or less and cannot usefully be split."""
    start, end = window
    if end - start <= timedelta(seconds=1):
        return None
    middle = start + (end - start) / 2
    middle = middle.replace(microsecond=middle.microsecond // 1000 * 1000)
    return (start, middle), (middle + timedelta(milliseconds=1), end)


def _list_time(moment: datetime) -> str:
    """SecMaster's own time format (a literal Z and an offset), in UTC."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d}Z+0000"


def _ids(items: list[JSON], key: str) -> list[str]:
    """The ids of a page of list items; items without one are skipped."""
    ids = (as_text(item.get(key)) if isinstance(item, dict) else None for item in items)
    return [task_id for task_id in ids if task_id]


def parse_iso(value: object) -> datetime | None:
    """IAM's `expires_at`, e.g. `2025-08-20T06:53:42.424000Z`; None when unreadable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_time(value)
    return moment.replace(tzinfo=moment.tzinfo or UTC).astimezone(UTC)
