"""Wire shapes shared by the handlers: content types, error bodies, envelopes, parameter checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from worker.model import System
from worker.sandbox import seed

AICC_TYPE: Final = "application/json%3Bcharset=UTF-8"  # sic: what AICC's documented answer carries
JSON_TYPE: Final = "application/json;charset=UTF-8"
GATEWAY_TYPE: Final = "application/json"


def new_request_id() -> str:
    return os.urandom(16).hex()


def json_response(
    status: int, payload: object, content_type: str = JSON_TYPE, **headers: str
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), headers={"Content-Type": content_type, **headers}
    )


def gateway_error(
    status: int, code: str, message: str, *, retry_after: bool = False
) -> web.Response:
    """Huawei API gateway's own error shape (401 APIGW.0301, 429 APIGW.0308)."""
    request_id = new_request_id()
    headers = {"X-Request-Id": request_id}
    if retry_after:
        headers["Retry-After"] = "1"
    body = {"error_code": code, "error_msg": message, "request_id": request_id}
    return json_response(status, body, GATEWAY_TYPE, **headers)


def aicc_error(status: int, code: str, message: str) -> web.Response:
    return json_response(status, {"resCode": code, "resMsg": message}, AICC_TYPE)


def secmaster_error(status: int, code: str, message: str) -> web.Response:
    return json_response(
        status, {"code": code, "message": message}, JSON_TYPE, **{"X-Request-Id": new_request_id()}
    )


def koodrive_error(status: int, code: int, message: str) -> web.Response:
    return json_response(status, {"code": code, "msg": message})


# What a 500 fault answers. The codes are invented: the documents list no server-error codes.
INTERNAL_ERRORS: Final[dict[System, Callable[[], web.Response]]] = {
    "aicc": lambda: aicc_error(500, "500", "Internal Server Error"),
    "secmaster": lambda: secmaster_error(500, "SecMaster.00000500", "internal server error"),
    "koodrive": lambda: koodrive_error(500, 13000500, "internal server error"),
}


class BadRequest(Exception):
    """A parameter the handler refuses: answered in the system's own error shape."""


def envelope(data: bytes) -> web.Response:
    request_id = new_request_id()
    body = b'{"code":"00000000","message":"","request_id":"%s","success":true,"data":%s}' % (
        request_id.encode(),
        data,
    )
    return web.Response(body=body, headers={"Content-Type": JSON_TYPE, "X-Request-Id": request_id})


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def text_param(data: dict[str, Any], name: str, limit: int, *, label: str | None = None) -> str:
    value = data.get(name)
    label = label or name
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{label} is required and must be a non-empty string")
    if len(value) > limit:
        raise BadRequest(f"{label} is {len(value)} characters long; at most {limit}")
    return value


def int_param(data: dict[str, Any], name: str, low: int, high: int | None) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} is required and must be an integer")
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name} must be between {low} and {high}" if high else f"{name} < {low}")
    return value


def aicc_time_param(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    try:
        return seed.parse_aicc_time(str(value))
    except ValueError:
        raise BadRequest(f"{name} must be YYYY-MM-DD HH:mm:ss") from None


def query_int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return number
