"""KooDrive OSE tasks (docs/upstream.md): read-only task detail.

The answer is flat (no `result` wrapper) and is stored whole. `code` 0 means success; it is
documented as a string and returned as a number, so both 0 and "0" are accepted. Errors are
`{"code": 13000xxx, "msg": ...}` with HTTP 200, 400 (authentication failed), 401 or 500.

Where the bearer token comes from is **unknown**: it is taken from the settings, and after a
refusal it is re-read once from `$CREDENTIALS_DIRECTORY/koodrive_token` (systemd
`LoadCredential=`), so an operator can rotate it without a restart.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import quote

from worker.config import KooDriveSettings
from worker.model import JSON, Fetched, Observation, State, System
from worker.redact import Redactor
from worker.text import one_line
from worker.upstreams.base import ErrorKind, Health, UpstreamError, Walk, reword
from worker.upstreams.envelope import as_text, code_and_message, type_name
from worker.upstreams.http import DEFAULT_CONNECTOR_LIMIT, Answer, HttpClient
from worker.upstreams.signing import sign_app
from worker.upstreams.transport import Slots

TASK_PATH = "/koodrive/ose/v1/task"
NOT_FOUND_CODES = frozenset({"13000309"})  # resource does not exist

STATES: Mapping[str, State] = {
    "0": State.OPEN,  # NEW
    "1": State.IN_PROGRESS,  # EXECUTING
    "2": State.DONE,  # SUCCESS
    "3": State.FAILED,  # FAILED
}


def observe_koodrive(payload: Mapping[str, JSON]) -> Observation:
    """Pure and total. `resultCode` (meaning **unknown**) is kept verbatim as extra status."""
    status = as_text(payload.get("status"))
    return Observation(
        status=status,
        state=STATES.get(status or "", State.UNKNOWN),
        title=as_text(payload.get("taskName")),
        extra_status={"resultCode": payload.get("resultCode")},
    )


def default_token_file() -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) / "koodrive_token" if directory else None


class KooDriveClient:
    system: System = "koodrive"

    def __init__(
        self,
        settings: KooDriveSettings,
        *,
        connector_limit: int = DEFAULT_CONNECTOR_LIMIT,
        token_file: Path | None = None,
        in_flight: Slots | None = None,
    ) -> None:
        self._settings = settings
        self._http = HttpClient(
            "koodrive",
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_body_bytes=settings.max_body_bytes,
            rate_limit=settings.rate_limit,
            ca_file=settings.ca_file,
            redactor=Redactor([settings.token, settings.app_secret]),
            connector_limit=connector_limit,
            in_flight=in_flight,
        )
        self._token = None if settings.token is None else settings.token.get_secret_value()
        self._token_file = token_file if token_file is not None else default_token_file()

    def observe(self, payload: Mapping[str, JSON]) -> Observation:
        return observe_koodrive(payload)

    async def aclose(self) -> None:
        await self._http.aclose()

    def health(self) -> Health:
        return self._http.health()

    async def fetch(self, task_id: str) -> Fetched:
        data = await self._http.exchange(
            "GET",
            self._http.url(f"{TASK_PATH}/{quote(task_id, safe='')}"),
            task_id=task_id,
            write=False,
            auth=self,
            read=lambda answer: self._envelope(answer, task_id),
        )
        for name, expected in (("status", (int, str)), ("taskName", (str,))):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
                raise self._http.malformed(
                    f"{name} is {type_name(value)}, expected "
                    + ("a number" if name == "status" else "a string"),
                    task_id=task_id,
                    write=False,
                )
        return Fetched.of("koodrive", task_id, data, observe_koodrive)

    async def apply(self, task_id: str, kind: str, params: Mapping[str, str]) -> Mapping[str, JSON]:
        raise self._http.error(
            ErrorKind.PERMANENT, "koodrive tasks are read-only: no actions", task_id=task_id
        )

    async def discover(self, walk: Walk | None = None) -> AsyncIterator[str]:
        # KooDrive has no list endpoint: tasks are tracked by id only.
        nothing: tuple[str, ...] = ()
        for task_id in nothing:
            yield task_id

    # -- authentication (the Auth flow of HttpClient.exchange) ----------------------------------

    async def credential(self, task_id: str | None) -> object:
        return None  # the bearer token lives on the client: it is re-read from its file

    def headers(self, credential: object, method: str, url: str, body: bytes) -> dict[str, str]:
        if self._token is not None:
            return {"Authorization": f"Bearer {self._token}"}
        settings = self._settings
        assert settings.app_id and settings.app_secret and settings.user_id  # config: app mode
        # X-Date is now truncated to the second, so it is never in the future (docs/upstream.md).
        return sign_app(
            method,
            url,
            {},
            b"",
            settings.app_id,
            settings.app_secret.get_secret_value(),
            settings.user_id,
        )

    async def renew(self, credential: object, error: UpstreamError, task_id: str | None) -> object:
        if error.kind is not ErrorKind.AUTH or not self._reload_token():
            raise error
        return None

    def _reload_token(self) -> bool:
        """Re-read the bearer token from the credential file; True when it changed."""
        if self._token is None or self._token_file is None:
            return False
        try:
            fresh = self._token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return False
        if not fresh or fresh == self._token:
            return False
        self._http.redact.add(fresh)
        self._token = fresh
        return True

    def _envelope(self, answer: Answer, task_id: str) -> dict[str, JSON]:
        data = answer.data
        fields = data if isinstance(data, dict) else {}
        raw_code = fields.get("code")
        code = None if isinstance(raw_code, bool) else as_text(raw_code)
        message = one_line(fields.get("msg") or "")
        detail = code_and_message(code and f"code {code}", message)
        if code in NOT_FOUND_CODES:
            raise self._http.error(
                ErrorKind.NOT_FOUND, detail, task_id=task_id, http_status=answer.status, code=code
            )
        if not answer.ok:
            error = self._http.status_error(
                answer, task_id=task_id, write=False, detail=detail, code=code
            )
            if answer.status == 400 and self._http.auth_like(
                message
            ):  # "400: authentication failed"
                raise reword(error, task_id=task_id, kind=ErrorKind.AUTH)
            raise error
        if not isinstance(data, dict):
            raise self._http.malformed(
                f"answer is {type_name(data)}, expected an object", task_id=task_id, write=False
            )
        if "code" not in data or code is None:
            raise self._http.malformed(
                f'code is {type_name(raw_code)}, expected 0 or "0"', task_id=task_id, write=False
            )
        if code != "0":
            raise self._http.error(
                ErrorKind.AUTH if self._http.auth_like(message) else ErrorKind.PERMANENT,
                detail,
                task_id=task_id,
                http_status=answer.status,
                code=code,
            )
        return data
