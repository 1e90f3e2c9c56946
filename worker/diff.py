"""Pure: two observations of a task in, the history events between them out.

Every event carries a `dedup_key` that is unique per (system, task_id, kind) for the change it
describes, so a repeated cycle or two workers racing over the same change insert it once (the
table's unique key makes the second insert do nothing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from worker.model import JSON, Event, EventKind, Observation

_MAX_KEY = 200


def _key(*parts: object) -> str:
    key = ":".join(str(p) for p in parts)
    if len(key) <= _MAX_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def diff(previous: Observation | None, current: Observation, seq: int) -> list[Event]:
    """Events that lead from `previous` to `current`, the task's snapshot number `seq`.

    The first observation (previous is None) records the history the task already has (trace
    entries, comments, attachments) but no status change: there was no earlier status.
    """
    events: list[Event] = []
    if previous is not None and (
        previous.status != current.status or previous.extra_status != current.extra_status
    ):
        data: dict[str, JSON] = {
            "from": previous.status,
            "to": current.status,
            "from_state": str(previous.state),
            "to_state": str(current.state),
        }
        if previous.extra_status or current.extra_status:
            data["from_extra"] = dict(previous.extra_status)
            data["to_extra"] = dict(current.extra_status)
        events.append(Event(EventKind.STATUS_CHANGED, _key(seq), current.changed_at, data))

    seen_trace = {(t.position, t.digest) for t in previous.trace} if previous else set()
    for entry in current.trace:
        if (entry.position, entry.digest) not in seen_trace:
            events.append(
                Event(
                    EventKind.TRACE,
                    _key(entry.position, entry.digest),
                    None,  # AICC trace entries carry no time
                    {"position": entry.position, **entry.entry},
                )
            )

    old_comments: Mapping[str, object] = previous.comments if previous else {}
    for comment_id, comment in current.comments.items():
        if comment_id not in old_comments:
            events.append(
                Event(
                    EventKind.COMMENT_ADDED,
                    _key(comment_id, seq),
                    comment.time,
                    dict(comment.entry),
                )
            )
    if previous is not None:
        for comment_id, comment in previous.comments.items():
            if comment_id not in current.comments:
                events.append(
                    Event(
                        EventKind.COMMENT_REMOVED,
                        _key(comment_id, seq),
                        current.changed_at,
                        dict(comment.entry),
                    )
                )

    old_attachments = previous.attachments if previous else frozenset()
    for attachment in sorted(current.attachments - old_attachments):
        events.append(
            Event(
                EventKind.ATTACHMENT_ADDED,
                _key(attachment, seq),
                current.changed_at if previous else None,
                {"attachment_id": attachment},
            )
        )
    for attachment in sorted(old_attachments - current.attachments):
        events.append(
            Event(
                EventKind.ATTACHMENT_REMOVED,
                _key(attachment, seq),
                current.changed_at,
                {"attachment_id": attachment},
            )
        )
    return events
