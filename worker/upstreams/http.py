"""The one HTTP path of the three upstream clients: admission (rate control and circuit breaker,
in gate.py), sessions, body cap, classification, and the send / refresh-once-on-auth / resend
flow (`HttpClient.exchange`) that every call goes through.

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
| circuit open, or the rate allows no slot within 65 s   | RETRY (3)     | RETRY (3)     |
| HTTP 500 and other 5xx                                 | RETRY         | UNKNOWN       |
| other HTTP 4xx, business error codes                   | PERMANENT     | PERMANENT     |

"read" is GET and AICC's list POST; "write" is AICC process (POST) and SecMaster UpdateTask (PUT).
(1) Nothing was sent: "sent" is tracked per request with aiohttp's on_request_headers_sent.
(2) A read changed nothing, and the poller already backs off a failing task; an operator who
sees the message can raise `max_body_bytes`. Failing it PERMANENT would buy nothing.
(3) `deferred`: nothing was sent. A poll leaves its task due; an action waits `retry_after`.

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
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple, Protocol, TypeVar

import aiohttp
import anyio
import orjson
from yarl import URL

from worker.metrics import observe_request
from worker.model import JSON, System
from worker.redact import Redactor
from worker.text import one_line
from worker.upstreams.base import ErrorKind, Health, UpstreamError
from worker.upstreams.envelope import auth_like, gateway_fields, parse_retry_after
from worker.upstreams.gate import CircuitBreaker, CircuitOpen, RateControl, parse_policy
from worker.upstreams.signing import encode_query

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CONNECTOR_LIMIT = 64  # per system and session; worker.concurrency bounds it in practice
MAX_DETAIL = 300  # characters of an upstream message kept in an error


class Auth(Protocol):
    """How one system authenticates a request: the credential for it, the headers that carry
    it, and what to do when the upstream refuses it (renew once, or give up by raising)."""

    async def credential(self, task_id: str | None) -> object: ...

    def headers(self, credential: object, method: str, url: str, body: bytes) -> dict[str, str]:
        """Headers for one attempt (a signature is computed per attempt: it carries the time)."""
        ...

    async def renew(self, credential: object, error: UpstreamError, task_id: str | None) -> object:
        """A fresh credential to send again with, or raise `error` when renewing cannot help."""
        ...


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


class _Received(NamedTuple):
    """What came back, before the body is judged (`HttpClient._answer`)."""

    status: int
    headers: Mapping[str, str]
    raw: bytes
    problem: str | None  # the body could not be read whole
    content_type: str


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
        in_flight: asyncio.Semaphore | None = None,
    ) -> None:
        self.system: System = system
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_body_bytes = max_body_bytes
        self.redact = redactor
        self.rate = RateControl(rate_limit)
        self.breaker = CircuitBreaker(system)
        # Shared by every system's client: worker.concurrency requests in flight in all.
        self._in_flight = in_flight
        self._ca_file = ca_file
        self._client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(connect_timeout, timeout)
        )
        self._connector_limit = connector_limit
        self._reads: aiohttp.ClientSession | None = None
        self._writes: aiohttp.ClientSession | None = None

    def health(self) -> Health:
        state = self.rate.state()
        return Health(
            requests=self.rate.requests,
            throttled=self.rate.throttled,
            rate=state.rate,
            ceiling=state.ceiling,
            policy=state.policy,
            circuit=self.breaker.describe(),
        )

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
        deferred: bool = False,
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
            deferred=deferred,
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
        if not detail:
            gateway_code, gateway_message = gateway_fields(answer.data)
            detail = " ".join(
                t for t in (gateway_code and f"{gateway_code}:", gateway_message) if t
            )
        text = detail or f"({answer.described})"
        return self.error(
            kind,
            f"HTTP {status} {text}",
            task_id=task_id,
            http_status=status,
            retry_after=self._retry_after(answer),
            code=code,
        )

    def _retry_after(self, answer: Answer) -> float | None:
        """Retry-After when sent; after a 429 at least until the system's pause ends, so a
        throttled write is retried at the pace the rate control keeps."""
        header = parse_retry_after(answer.headers.get("Retry-After"))
        if answer.status != 429:
            return header
        return max(header or 0.0, self.rate.state().paused_for) or None

    # -- sending ---------------------------------------------------------------------------------

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        task_id: str | None,
        write: bool,
        auth: Auth,
        read: Callable[[Answer], T],
        body: bytes | None = None,
    ) -> T:
        """Send with `auth`'s credential and read the answer with `read` (the system's envelope
        check). When the credential is refused, `auth` may renew it once and the request goes
        again; that is safe for a write too, since a refused credential applied nothing."""
        credential = await auth.credential(task_id)
        renewed = False
        while True:
            headers = auth.headers(credential, method, url, body or b"")
            answer = await self.send(
                method, url, task_id=task_id, write=write, headers=headers, body=body
            )
            try:
                return read(answer)
            except UpstreamError as exc:
                if renewed:
                    raise
                credential = await auth.renew(credential, exc, task_id)
                renewed = True

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
        """Send one request (a write at most once) once the system's rate and circuit allow,
        and read its answer.

        Raises UpstreamError for transport failures, redirects, a 2xx answer whose body is
        unreadable or not JSON, and (deferred) when the request cannot go out soon. Any other
        non-2xx answer is returned for the caller to classify with its envelope (see
        `status_error`); a 429 also slows this system down.
        """
        while True:
            slot = self.rate.reserve()
            if slot is None:
                state = self.rate.state()
                raise self.error(
                    ErrorKind.RETRY,
                    f"throttled by the gateway (policy {state.policy or 'unknown'}): "
                    f"no request for {state.paused_for:.0f}s",
                    task_id=task_id,
                    retry_after=state.paused_for,
                    deferred=True,
                )
            wait, final = slot
            if wait:
                await anyio.sleep(wait)
            if final:
                break
        sent_at = self.rate.now()
        try:
            probe = await self.breaker.admit()
        except CircuitOpen as exc:
            raise self.error(
                ErrorKind.RETRY,
                exc.reason,
                task_id=task_id,
                retry_after=exc.retry_in,
                deferred=True,
            ) from None
        try:
            if self._in_flight is None:
                got = await self._send_once(method, url, task_id, write, headers, body)
            else:
                async with self._in_flight:
                    got = await self._send_once(method, url, task_id, write, headers, body)
        except UpstreamError as exc:
            # transport failures only: an answer the system gave, however garbled, says it is up
            outage = exc.http_status is None and exc.kind in (ErrorKind.RETRY, ErrorKind.UNKNOWN)
            self.breaker.record(up=not outage, probe=probe, failure=exc.detail)
            raise
        except BaseException:
            self.breaker.cancelled(probe=probe)
            raise
        if got.status == 429:
            answer = self._answer(got, task_id, write)  # not 2xx: never raises
            _, message = gateway_fields(answer.data)
            self.rate.throttled_by(
                parse_policy(message), parse_retry_after(answer.headers.get("Retry-After"))
            )
            self.breaker.record(up=True, probe=probe)
            return answer
        self.rate.accepted(sent_at)
        self.breaker.record(up=got.status < 500, probe=probe, failure=f"HTTP {got.status}")
        return self._answer(got, task_id, write)

    async def _send_once(
        self,
        method: str,
        url: str,
        task_id: str | None,
        write: bool,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> _Received:
        session = self._session(write)
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
        return _Received(status, answer_headers, raw, problem, content_type)

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

    def _answer(self, got: _Received, task_id: str | None, write: bool) -> Answer:
        status, headers, raw, problem, content_type = got
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

    async def aclose(self) -> None:
        sessions = [s for s in (self._reads, self._writes) if s is not None]
        self._reads = self._writes = None
        for session in sessions:
            await session.close()


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
