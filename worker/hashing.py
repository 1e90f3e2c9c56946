"""Canonical JSON and content hashes: pure, on the hot path of every poll.

orjson with sorted keys is the canonical form: one C call, no Python-level walk of the payload.
Payloads come from orjson.loads, so they hold only JSON types that orjson can write back; non-string
keys (possible in hand-built payloads) are made strings rather than rejected. Anything orjson
refuses (an integer beyond 64 bits, a foreign type) takes a slower stdlib path instead of raising,
so hashing never fails on a dict.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON with keys sorted at every level: equal values give equal bytes."""
    try:
        return orjson.dumps(obj, option=_OPTIONS)
    except TypeError:
        return _fallback(obj)


def content_hash(payload: Any) -> str:
    """sha256 hex digest of the canonical JSON of `payload`."""
    return hash_of(canonical_json(payload))


def hash_of(canonical: bytes) -> str:
    """The content hash of an already canonical JSON document."""
    return hashlib.sha256(canonical).hexdigest()


def _fallback(obj: Any) -> bytes:
    text = json.dumps(
        _plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return text.encode()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
