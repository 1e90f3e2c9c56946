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
(1) Nothing was sent: the connection was never made (transport.ConnectError).
(2) A read changed nothing, and the poller already backs off a failing task; an operator who
sees the message can raise `max_body_bytes`. Failing it PERMANENT would buy nothing.
(3) `deferred`: nothing was sent. A poll leaves its task due; an action waits `retry_after`.

The wire is `transport.py`'s: reads on kept-alive connections, each write on a new connection
of its own, and no request ever sent twice by the transport (aiohttp's client, used before,
re-sends a dropped PUT by itself; docs/upstream.md). A read that finds its kept-alive
connection closed by the server before any answer goes once more on a new one.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio
import orjson

from worker.metrics import observe_request
from worker.model import JSON, System
from worker.redact import Redactor
from worker.text import one_line
from worker.upstreams.base import ErrorKind, Health, UpstreamError
from worker.upstreams.envelope import auth_like, gateway_fields, parse_retry_after
from worker.upstreams.gate import CircuitBreaker, CircuitOpen, RateControl, parse_policy
from worker.upstreams.signing import encode_query
from worker.upstreams.transport import (
    ConnectError,
    Origin,
    Pool,
    Slots,
    TransportError,
    split_url,
)

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
    content_type: str
    size: int  # bytes of the body
    problem: str | None = None  # the body could not be read whole

    @property
    def described(self) -> str:
        """ "text/html, 1532 bytes": for messages about the body (made only for a message)."""
        text = f"{one_line(self.content_type, 60)}, {self.size} bytes"
        return text if self.problem is None else f"{text}; {self.problem}"

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
        in_flight: Slots | None = None,
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
        self._connect_timeout = min(connect_timeout, timeout)
        self._connector_limit = connector_limit
        self._pools: dict[tuple[Origin, bool], Pool] = {}
        # URLs are built from base_url: its scheme://host:port prefix is split off without
        # parsing each time (split_url is the fallback, e.g. for SecMaster's IAM endpoint).
        self._base_origin, _ = split_url(self.base_url)
        slash = self.base_url.find("/", self.base_url.find("://") + 3)
        self._prefix = self.base_url if slash < 0 else self.base_url[:slash]
        self._tls: ssl.SSLContext | None = None

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
        started = time.perf_counter()
        code: int | str | None = "error"  # metrics: a transport failure unless a status came
        target = url
        try:
            pool, target = self._pool(url, write)
            sent_headers = list(headers.items())
            if "Accept" not in headers:
                sent_headers.append(("Accept", "application/json"))
            response = await pool.request(
                method,
                target,
                sent_headers,
                body,
                time_limit=self.timeout,
                cap=self.max_body_bytes,
            )
            code = response.status
        except ConnectError as exc:
            # Nothing left this process: safe to retry for reads and writes alike.
            reason = "TLS certificate not trusted" if exc.certificate else "cannot connect"
            self._log(method, target, "failed (cannot connect)", started)
            raise self.error(ErrorKind.RETRY, f"{reason}: {exc}", task_id=task_id) from None
        except TransportError as exc:
            error = self._lost(str(exc), task_id=task_id, write=write, sent=exc.sent)
            self._log(method, target, f"failed ({error.kind})", started)
            raise error from None
        except ValueError as exc:  # e.g. a header value with a newline: nothing was sent
            code = None
            raise self.error(
                ErrorKind.PERMANENT, f"request could not be built: {exc}", task_id=task_id
            ) from None
        finally:
            if code is not None:
                observe_request(self.system, code, time.perf_counter() - started)
        if 300 <= response.status < 400:
            raise self._redirect(response.status, response.headers.get("Location"), task_id)
        self._log(method, target, response.status, started)
        content_type = response.headers.get("Content-Type") or "no content type"
        return _Received(
            response.status, response.headers, response.body, response.problem, content_type
        )

    def _pool(self, url: str, write: bool) -> tuple[Pool, str]:
        """The pool for the URL's origin (one for reads, one for writes), and the target."""
        prefix = self._prefix
        if url.startswith(prefix) and url[len(prefix) : len(prefix) + 1] in ("/", "?", ""):
            origin, target = self._base_origin, url[len(prefix) :] or "/"
        else:
            origin, target = split_url(url)
        pool = self._pools.get((origin, write))
        if pool is None:
            pool = self._pools[(origin, write)] = Pool(
                origin,
                limit=self._connector_limit,
                connect_timeout=self._connect_timeout,
                ssl_context=self._ssl() if origin.scheme == "https" else None,
                keep_alive=not write,
            )
        return pool, target

    def _log(self, method: str, target: str, outcome: object, started: float) -> None:
        # Method, path, status and time only: headers carry credentials and are never logged.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %s -> %s in %.1f ms",
                self.system,
                method,
                self.redact(target),
                outcome,
                (time.perf_counter() - started) * 1000,
            )

    def _answer(self, got: _Received, task_id: str | None, write: bool) -> Answer:
        status, headers, raw, problem, content_type = got
        ok = 200 <= status < 300
        if problem is not None:
            if ok:
                raise self.malformed(problem, task_id=task_id, write=write)
            return Answer(status, headers, None, False, content_type, len(raw), problem)
        try:
            data = orjson.loads(raw) if raw else None
            is_json = bool(raw)
        except orjson.JSONDecodeError as exc:
            if ok:
                described = Answer(status, headers, None, False, content_type, len(raw)).described
                # NaN/Infinity, truncated documents, HTML error pages all land here.
                if exc.pos >= len(raw.rstrip()):
                    reason = f"answer is truncated JSON ({described})"
                else:
                    reason = f"answer is not JSON ({described}): {exc.msg} at byte {exc.pos}"
                raise self.malformed(reason, task_id=task_id, write=write) from None
            data, is_json = None, False
        answer = Answer(status, headers, data, is_json, content_type, len(raw))
        if ok and not is_json:
            raise self.malformed(
                f"answer is empty ({answer.described})", task_id=task_id, write=write
            )
        if ok and b"\\u0000" in raw and _holds_nul(data):
            # PostgreSQL's JSONB (and text) cannot store U+0000: refusing the answer here costs
            # this task only, where storing it would fail the whole batch it was written with.
            raise self.malformed(
                "answer contains a NUL character (\\u0000), which cannot be stored "
                f"({answer.described})",
                task_id=task_id,
                write=write,
            )
        return answer

    def _redirect(self, status: int, location: str | None, task_id: str | None) -> UpstreamError:
        try:
            host = urlsplit(location or "").hostname or self._base_origin.host
        except ValueError:
            host = None
        return self.error(
            ErrorKind.PERMANENT,
            f"HTTP {status} redirect to {host or 'an unparsable location'}; "
            "redirects are never followed: check base_url",
            task_id=task_id,
            http_status=status,
        )

    def _lost(self, cause: str, *, task_id: str | None, write: bool, sent: bool) -> UpstreamError:
        """A request that left (or may have) and got no whole answer head."""
        kind = ErrorKind.UNKNOWN if write and sent else ErrorKind.RETRY
        if kind is ErrorKind.UNKNOWN:
            cause += "; the write may have been applied"
        return self.error(kind, cause, task_id=task_id)

    # -- lifecycle -------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        if self._tls is None:
            context = ssl.create_default_context()  # system CAs, verification on
            if self._ca_file is not None:
                context.load_verify_locations(cafile=self._ca_file)  # in addition to them
            self._tls = context
        return self._tls

    async def aclose(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


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
