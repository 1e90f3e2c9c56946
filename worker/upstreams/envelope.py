"""Small pure helpers for reading the three systems' answer envelopes (docs/upstream.md)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from worker.text import one_line

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


def gateway_fields(data: object) -> tuple[str | None, str]:
    """The API gateway's own envelope, `{"error_code": "APIGW.0308", "error_msg": ...}`, which
    fronts all three systems (AICC's throttling comes this way too, not as resCode)."""
    if not isinstance(data, dict):
        return None, ""
    return as_text(data.get("error_code")), one_line(data.get("error_msg") or "")
