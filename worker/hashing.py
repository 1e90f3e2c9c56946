"""Canonical JSON and content hashes: pure, on the hot path of every poll.

orjson with sorted keys is the canonical form: one C call, no Python-level walk of the payload.
Payloads come from orjson.loads, so they hold only JSON types; non-string keys (possible in
hand-built payloads) are made strings rather than rejected.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON with keys sorted at every level: equal values give equal bytes."""
    return orjson.dumps(obj, option=_OPTIONS)


def content_hash(payload: Any) -> str:
    """sha256 hex digest of the canonical JSON of `payload`."""
    return hashlib.sha256(orjson.dumps(payload, option=_OPTIONS)).hexdigest()
