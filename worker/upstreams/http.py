"""Shared HTTP machinery of the upstream clients: sessions, limits, body cap, classification,
redaction and a shared token cache.

Failure classes (`ErrorKind`), decided here once for all three systems:

| what happened                                          | read          | write         |
|--------------------------------------------------------|---------------|---------------|
| connect refused / DNS / TLS / connect or pool timeout  | RETRY         | RETRY (1)     |
| timeout, reset or disconnect after the request left    | RETRY         | UNKNOWN       |
| answer cut off, not JSON, NaN, wrong envelope types    | RETRY         | UNKNOWN       |
| answer larger than max_body_bytes                      | RETRY (2)     | UNKNOWN       |
| HTTP 3xx (redirects are never followed)                | PERMANENT     | PERMANENT     |
| HTTP 401/403 (after the client's one refresh, if any)  | AUTH          | AUTH          |
| HTTP 404                                               | NOT_FOUND     | NOT_FOUND     |
| HTTP 408, 429, 502, 503, 504 (Retry-After honoured)    | RETRY         | RETRY         |
| HTTP 500 and other 5xx                                 | RETRY         | UNKNOWN       |
| other HTTP 4xx, business error codes                   | PERMANENT     | PERMANENT     |

"read" is GET and AICC's list POST; "write" is AICC process (POST) and SecMaster UpdateTask (PUT).
(1) Nothing was sent: "sent" is tracked per request with aiohttp's on_request_headers_sent.
(2) A read changed nothing, and the poller already backs off a failing task; an operator who
sees the message can raise `max_body_bytes`. Failing it PERMANENT would buy nothing.

Writes go through their own session with `force_close=True` *and* a per-request middleware that
refuses a second send. Both are needed: aiohttp 3.14 re-sends PUT/DELETE by itself after
`ServerDisconnectedError` or `ClientOSError` on *any* connection, fresh ones included
(`_retry_connection` in aiohttp/client.py does not look at whether the connection was reused),
so `force_close` alone still lets a PUT reach the server twice (tests/test_upstreams.py shows
both). `force_close` still matters: without it a write could go out on a pooled connection that
the server already closed and come back UNKNOWN when nothing was applied.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from pydantic import SecretStr
from yarl import URL

from worker.metrics import observe_request
from worker.model import JSON, System
from worker.upstreams.base import ErrorKind, UpstreamError
from worker.upstreams.signing import encode_query

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CONNECTOR_LIMIT = 64  # per system and session; worker.concurrency bounds it in practice
MAX_DETAIL = 300  # characters of an upstream message kept in an error


# -- redaction ------------------------------------------------------------------------------------


def secret_value(secret: SecretStr | str | None) -> str | None:
    if secret is None:
        return None
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


class Redactor:
    """Replaces every known secret (and its URL- and JSON-escaped forms) with `***`.

    Configured secrets are added at construction, live tokens as they are issued. Used on every
    error message and log line, never on the hot path of a successful request.
    """

    MASK = "***"

    def __init__(self, secrets: Iterable[SecretStr | str | None] = ()) -> None:
        self._needles: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: SecretStr | str | None) -> None:
        value = secret_value(secret)
        if not value:
            return
        escaped = orjson.dumps(value).decode()[1:-1]
        forms = {value, quote(value, safe=""), quote_plus(value), escaped}
        self._needles = sorted(set(self._needles) | forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, self.MASK)
        return text


# -- small helpers for envelopes -----------------------------------------------------------------


def one_line(text: object, limit: int = MAX_DETAIL) -> str:
    """Upstream text squeezed into one bounded line for an error message."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


_AUTH_WORDS = re.compile(r"token|auth|expired", re.IGNORECASE)


def code_and_message(code: str | None, message: object) -> str:
    """`CODE: message`, `CODE` or `message`, for an error detail."""
    text = one_line(message) if message else ""
    if code and text:
        return f"{code}: {text}"
    return code or text


def auth_like(*texts: object) -> bool:
    """Does an error code or message talk about credentials (token, auth*, expired)?"""
    return any(isinstance(t, str) and _AUTH_WORDS.search(t) for t in texts)


def as_text(value: object) -> str | None:
    """A scalar upstream value as text (KooDrive's status 2 -> "2"); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date. None when unusable."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# -- the answer and the client -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer with its body decoded. `data` is None unless `is_json`."""

    status: int
    headers: Mapping[str, str]
    data: JSON
    is_json: bool
    described: str  # "text/html, 1532 bytes": for messages about the body

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class _BodyProblem(Exception):
    """The body could not be read whole (too large, cut off, timed out)."""


class _ResendRefused(aiohttp.ClientError):
    """aiohttp tried to send a write a second time on its own; the guard refused."""


class _WriteAttempt:
    """Per write request: was anything sent yet, and refuse aiohttp's silent second send."""

    __slots__ = ("sends", "sent")

    def __init__(self) -> None:
        self.sent = False
        self.sends = 0

    async def guard(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        if self.sends:
            raise _ResendRefused("connection lost after the request was sent")
        self.sends += 1
        return await handler(request)


async def _on_headers_sent(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    attempt = getattr(context, "trace_request_ctx", None)
    if isinstance(attempt, _WriteAttempt):
        attempt.sent = True


def _write_trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    return trace


class HttpClient:
    """One system's HTTP: a keep-alive session for reads, a never-reused one for writes.

    Sessions, the rate limiter and the TLS context are created at first use, so clients can be
    built outside an event loop (configuration time) and closed without ever being used.
    """

    def __init__(
        self,
        system: System,
        *,
        base_url: str,
        timeout: float,
        max_body_bytes: int,
        redactor: Redactor,
        rate_limit: float | None = None,
        ca_file: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        connector_limit: int = DEFAULT_CONNECTOR_LIMIT,
    ) -> None:
        self.system: System = system
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_body_bytes = max_body_bytes
        self.redact = redactor
        self._rate_limit = rate_limit
        self._ca_file = ca_file
        self._client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(connect_timeout, timeout)
        )
        self._connector_limit = connector_limit
        self._reads: aiohttp.ClientSession | None = None
        self._writes: aiohttp.ClientSession | None = None
        self._limiter: AsyncLimiter | None = None

    # -- building blocks -------------------------------------------------------------------------

    def url(self, path: str, query: Sequence[tuple[str, str]] = ()) -> str:
        """Absolute URL as sent on the wire: `path` already percent-encoded, query canonical."""
        return self.base_url + path + (f"?{encode_query(query)}" if query else "")

    def error(
        self,
        kind: ErrorKind,
        message: str,
        *,
        task_id: str | None,
        http_status: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> UpstreamError:
        """The one place errors are built: the message is redacted and kept to one line."""
        return UpstreamError(
            kind,
            one_line(self.redact(message), limit=2 * MAX_DETAIL),
            system=self.system,
            task_id=task_id,
            http_status=http_status,
            retry_after=retry_after,
            code=None if code is None else self.redact(code),
        )

    def auth_like(self, *texts: object) -> bool:
        """`auth_like` on the redacted texts: an echoed credential must not look like a word."""
        return auth_like(*(self.redact(t) if isinstance(t, str) else t for t in texts))

    def malformed(self, message: str, *, task_id: str | None, write: bool) -> UpstreamError:
        """An answer we cannot understand: a read may be retried; a write may have applied."""
        if write:
            message += "; the write may have been applied"
        return self.error(ErrorKind.UNKNOWN if write else ErrorKind.RETRY, message, task_id=task_id)

    def status_error(
        self,
        answer: Answer,
        *,
        task_id: str | None,
        write: bool,
        detail: str = "",
        code: str | None = None,
    ) -> UpstreamError:
        """Classify a non-2xx answer by its HTTP status (module docstring, table)."""
        status = answer.status
        if status in (401, 403):
            kind = ErrorKind.AUTH
        elif status == 404:
            kind = ErrorKind.NOT_FOUND
        elif status in (408, 429, 502, 503, 504):
            kind = ErrorKind.RETRY
        elif 400 <= status < 500:
            kind = ErrorKind.PERMANENT
        else:  # 500, other 5xx, and anything unexpected
            kind = ErrorKind.UNKNOWN if write else ErrorKind.RETRY
        text = detail or f"({answer.described})"
        return self.error(
            kind,
            f"HTTP {status} {text}",
            task_id=task_id,
            http_status=status,
            retry_after=parse_retry_after(answer.headers.get("Retry-After")),
            code=code,
        )

    # -- sending ---------------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        url: str,
        *,
        task_id: str | None,
        write: bool,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> Answer:
        """Send one request (a write at most once) and read its answer.

        Raises UpstreamError for transport failures, redirects, and a 2xx answer whose body is
        unreadable or not JSON. Any other non-2xx answer is returned for the caller to classify
        with its envelope (see `status_error`).
        """
        session = self._session(write)
        if self._rate_limit is not None:
            await self._get_limiter().acquire()
        attempt = _WriteAttempt() if write else None
        extra: dict[str, Any] = {}
        if attempt is not None:
            extra = {"trace_request_ctx": attempt, "middlewares": (attempt.guard,)}
        started = time.perf_counter()
        code: int | str | None = "error"  # metrics: a transport failure unless a status came
        try:
            async with session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                **extra,
            ) as response:
                code = response.status
                if 300 <= response.status < 400:
                    raise self._redirect(response, task_id)
                try:
                    raw = await self._read(response)
                    problem = None
                except _BodyProblem as exc:
                    raw, problem = b"", str(exc)
                status, answer_headers = response.status, response.headers
                content_type = response.headers.get("Content-Type", "no content type")
        except UpstreamError:
            raise
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            sent = attempt is None or attempt.sent or isinstance(exc, _ResendRefused)
            error = self._transport_error(exc, task_id=task_id, write=write, sent=sent)
            self._log(method, url, f"failed ({error.kind})", started)
            raise error from None
        except ValueError as exc:  # e.g. a header value with a newline: nothing was sent
            code = None
            raise self.error(
                ErrorKind.PERMANENT, f"request could not be built: {exc}", task_id=task_id
            ) from None
        finally:
            if code is not None:
                observe_request(self.system, code, time.perf_counter() - started)
        self._log(method, url, status, started)
        return self._answer(status, answer_headers, raw, problem, content_type, task_id, write)

    def _log(self, method: str, url: str, outcome: object, started: float) -> None:
        # Method, path, status and time only: headers carry credentials and are never logged.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %s -> %s in %.1f ms",
                self.system,
                method,
                self.redact(URL(url, encoded=True).raw_path_qs),
                outcome,
                (time.perf_counter() - started) * 1000,
            )

    def _answer(
        self,
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        problem: str | None,
        content_type: str,
        task_id: str | None,
        write: bool,
    ) -> Answer:
        ok = 200 <= status < 300
        described = f"{one_line(content_type, 60)}, {len(raw)} bytes"
        if problem is not None:
            if ok:
                raise self.malformed(problem, task_id=task_id, write=write)
            return Answer(status, headers, None, False, f"{described}; {problem}")
        try:
            data = orjson.loads(raw) if raw else None
            is_json = bool(raw)
        except orjson.JSONDecodeError as exc:
            if ok:
                # NaN/Infinity, truncated documents, HTML error pages all land here.
                if exc.pos >= len(raw.rstrip()):
                    reason = f"answer is truncated JSON ({described})"
                else:
                    reason = f"answer is not JSON ({described}): {exc.msg} at byte {exc.pos}"
                raise self.malformed(reason, task_id=task_id, write=write) from None
            data, is_json = None, False
        if ok and not is_json:
            raise self.malformed(f"answer is empty ({described})", task_id=task_id, write=write)
        if ok and b"\\u0000" in raw and _holds_nul(data):
            # PostgreSQL's JSONB (and text) cannot store U+0000: refusing the answer here costs
            # this task only, where storing it would fail the whole batch it was written with.
            raise self.malformed(
                f"answer contains a NUL character (\\u0000), which cannot be stored ({described})",
                task_id=task_id,
                write=write,
            )
        return Answer(status, headers, data, is_json, described)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self.max_body_bytes
        length = response.content_length
        if length is not None and length > cap:
            raise _BodyProblem(f"answer of {length} bytes exceeds the {cap}-byte limit")
        chunks: list[bytes] = []
        size = 0
        of = f" of {length}" if length is not None else ""
        try:
            while chunk := await response.content.readany():
                size += len(chunk)
                if size > cap:
                    raise _BodyProblem(f"answer exceeds the {cap}-byte limit")
                chunks.append(chunk)
        except aiohttp.ClientPayloadError:
            raise _BodyProblem(f"answer cut off after {size}{of} bytes") from None
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            raise _BodyProblem(f"connection lost after {size}{of} bytes of the answer") from None
        except TimeoutError:
            raise _BodyProblem(f"no complete answer within {self.timeout:g}s") from None
        return b"".join(chunks)

    def _redirect(self, response: aiohttp.ClientResponse, task_id: str | None) -> UpstreamError:
        location = response.headers.get("Location", "")
        try:
            host = URL(location).host or URL(self.base_url).host
        except ValueError:
            host = None
        return self.error(
            ErrorKind.PERMANENT,
            f"HTTP {response.status} redirect to {host or 'an unparsable location'}; "
            "redirects are never followed: check base_url",
            task_id=task_id,
            http_status=response.status,
        )

    def _transport_error(
        self, exc: BaseException, *, task_id: str | None, write: bool, sent: bool
    ) -> UpstreamError:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return self.error(
                ErrorKind.RETRY, f"TLS certificate not trusted: {exc}", task_id=task_id
            )
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            # Nothing left this process: safe to retry for reads and writes alike.
            return self.error(ErrorKind.RETRY, f"cannot connect: {exc}", task_id=task_id)
        if isinstance(exc, _ResendRefused):
            cause = "connection lost after the request was sent (not re-sent)"
        elif isinstance(exc, TimeoutError):
            cause = f"no answer within {self.timeout:g}s"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            cause = "server closed the connection without answering"
        elif isinstance(exc, aiohttp.ClientPayloadError):
            cause = f"answer cut off: {exc}"
        else:
            cause = f"{type(exc).__name__}: {exc}"
        kind = ErrorKind.UNKNOWN if write and sent else ErrorKind.RETRY
        if kind is ErrorKind.UNKNOWN:
            cause += "; the write may have been applied"
        return self.error(kind, cause, task_id=task_id)

    # -- lifecycle -------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        if self._ca_file is None:
            return True  # aiohttp's default context: system CAs, verification on
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=self._ca_file)  # in addition to the system CAs
        return context

    def _session(self, write: bool) -> aiohttp.ClientSession:
        if write:
            if self._writes is None:
                self._writes = self._new_session(force_close=True)
            return self._writes
        if self._reads is None:
            self._reads = self._new_session(force_close=False)
        return self._reads

    def _new_session(self, *, force_close: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._connector_limit, force_close=force_close, ssl=self._ssl()
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._client_timeout,
            trace_configs=[_write_trace()] if force_close else None,
            headers={"Accept": "application/json"},
        )

    def _get_limiter(self) -> AsyncLimiter:
        if self._limiter is None:
            rate = self._rate_limit or 1.0
            # aiolimiter's bucket holds max_rate tokens: below 1 req/s, stretch the period instead.
            self._limiter = AsyncLimiter(rate, 1.0) if rate >= 1 else AsyncLimiter(1, 1.0 / rate)
        return self._limiter

    async def aclose(self) -> None:
        sessions = [s for s in (self._reads, self._writes) if s is not None]
        self._reads = self._writes = None
        for session in sessions:
            await session.close()


# -- tokens ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    refresh_at: float  # monotonic: renew proactively from here on
    expires_at: float  # monotonic: the issuer's own expiry
    generation: int


Issuer = Callable[[str | None], Awaitable[tuple[str, float]]]
"""Fetch a new token for (the task that needs it): returns (token, lifetime in seconds)."""


class TokenCache:
    """One cached credential per client, renewed at `refresh_fraction` of its lifetime.

    Concurrent callers share one renewal: they wait on the lock and, when they get it, see that
    the attempt counter moved and take its result (the new token, or the same failure) instead
    of issuing another token request.
    """

    def __init__(
        self,
        issue: Issuer,
        *,
        refresh_fraction: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issue = issue
        self._fraction = refresh_fraction
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: Token | None = None
        self._attempts = 0
        self._failure: UpstreamError | None = None

    async def get(self, task_id: str | None) -> Token:
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token
        return await self._renew(task_id, stale=token, forced=False)

    async def renew(self, stale: Token, task_id: str | None) -> Token:
        """After the upstream refused `stale`: a new token (shared with concurrent callers)."""
        return await self._renew(task_id, stale=stale, forced=True)

    async def _renew(self, task_id: str | None, *, stale: Token | None, forced: bool) -> Token:
        seen = self._attempts
        async with self._lock:
            current = self._token
            if self._attempts != seen:  # someone renewed while this caller waited
                if current is not None and current is not stale:
                    return current
                if self._failure is not None:
                    raise _for_task(self._failure, task_id)
            if current is not None and current is not stale:
                return current
            if not forced and current is not None and self._clock() < current.refresh_at:
                return current
            try:
                value, lifetime = await self._issue(task_id)
            except UpstreamError as exc:
                # Counted when the attempt ends, so callers that queued behind it see it.
                self._attempts += 1
                self._failure = exc
                if not forced and current is not None and self._clock() < current.expires_at:
                    # A proactive renewal failed but the old token still lives: keep using it.
                    log.warning("token renewal failed, old token still valid: %s", exc)
                    return current
                self._token = None
                raise
            self._attempts += 1
            now = self._clock()
            self._failure = None
            self._token = Token(
                value, now + self._fraction * lifetime, now + lifetime, self._attempts
            )
            return self._token


def _for_task(error: UpstreamError, task_id: str | None) -> UpstreamError:
    return reword(error, task_id=task_id)


def reword(
    error: UpstreamError,
    *,
    task_id: str | None,
    prefix: str = "",
    kind: ErrorKind | None = None,
) -> UpstreamError:
    """The same failure for another task, with context (e.g. "task list at 200: ") prefixed,
    or reclassified (`kind`). The detail was redacted when first built."""
    return UpstreamError(
        kind or error.kind,
        prefix + error.detail,
        system=error.system,
        task_id=task_id,
        http_status=error.http_status,
        retry_after=error.retry_after,
        code=error.code,
    )


def _holds_nul(value: object) -> bool:
    """Whether a decoded JSON value has U+0000 in any key or string (the raw-bytes check above
    only says the escape appears somewhere, perhaps as an escaped backslash)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
