"""Pure functions: diffing, backoff, action validation. No event loop, no I/O."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.backoff import action_delay, poll_delay
from worker.catalog import (
    Adds,
    InvalidInput,
    action_spec,
    all_params,
    configured_defaults,
    option_name,
    validate_action,
    validate_params,
)
from worker.config import AiccSettings
from worker.diff import diff
from worker.model import Comment, EventKind, Observation, State, TraceEntry

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def obs(
    status: str = "waiting",
    comments: dict[str, str] | None = None,
    attachments: set[str] | None = None,
    trace: list[str] | None = None,
) -> Observation:
    return Observation(
        status=status,
        state=State.OPEN,
        title="t",
        changed_at=T0,
        trace=tuple(TraceEntry(i, f"d{i}-{t}", {"title": t}) for i, t in enumerate(trace or [])),
        comments={
            k: Comment(k, v, T0, {"id": k, "message": v}) for k, v in (comments or {}).items()
        },
        attachments=frozenset(attachments or ()),
    )


def kinds(events: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(str(e.kind) for e in events)


def test_first_observation_records_existing_history_but_no_status_change() -> None:
    events = diff(None, obs(comments={"c1": "hi"}, attachments={"a1"}, trace=["created"]), 1)
    assert kinds(events) == ["attachment_added", "comment_added", "trace"]


def test_each_change_is_one_event() -> None:
    before = obs(comments={"c1": "hi", "c2": "bye"}, attachments={"a1"}, trace=["created"])
    after = obs(
        status="finished",
        comments={"c1": "hi", "c3": "new"},
        attachments={"a2"},
        trace=["created", "handled"],
    )
    events = diff(before, after, 2)
    assert kinds(events) == [
        "attachment_added",
        "attachment_removed",
        "comment_added",
        "comment_removed",
        "status_changed",
        "trace",
    ]
    status = next(e for e in events if e.kind is EventKind.STATUS_CHANGED)
    assert status.data["from"] == "waiting" and status.data["to"] == "finished"


def test_no_change_no_event() -> None:
    same = obs(comments={"c1": "hi"}, trace=["x"])
    assert diff(same, same, 5) == []


ids = st.text(alphabet="abcdef0123456789", min_size=1, max_size=6)


@given(
    st.dictionaries(ids, st.text(max_size=5), max_size=6),
    st.dictionaries(ids, st.text(max_size=5), max_size=6),
    st.frozensets(ids, max_size=5),
    st.frozensets(ids, max_size=5),
    st.integers(min_value=1, max_value=10_000),
)
def test_diff_properties(
    c1: dict[str, str], c2: dict[str, str], a1: frozenset[str], a2: frozenset[str], seq: int
) -> None:
    before, after = obs(comments=c1, attachments=set(a1)), obs(comments=c2, attachments=set(a2))
    events = diff(before, after, seq)
    # exactly the set differences, each once
    assert sum(e.kind is EventKind.COMMENT_ADDED for e in events) == len(set(c2) - set(c1))
    assert sum(e.kind is EventKind.COMMENT_REMOVED for e in events) == len(set(c1) - set(c2))
    assert sum(e.kind is EventKind.ATTACHMENT_ADDED for e in events) == len(a2 - a1)
    assert sum(e.kind is EventKind.ATTACHMENT_REMOVED for e in events) == len(a1 - a2)
    keys = [(e.kind, e.dedup_key) for e in events]
    assert len(keys) == len(set(keys))
    assert all(len(e.dedup_key) <= 255 for e in events)
    # deterministic: a repeated computation gives the same keys (so the insert is a no-op)
    assert [(e.kind, e.dedup_key) for e in diff(before, after, seq)] == keys


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.001, max_value=10),
    st.floats(min_value=0.01, max_value=3600),
)
def test_action_delay_is_capped_and_non_negative(attempt: int, base: float, cap: float) -> None:
    delay = action_delay(attempt, base, cap, rng=random.Random(attempt))
    assert 0 <= delay <= cap


def test_retry_after_is_a_floor_even_past_the_cap() -> None:
    assert action_delay(1, 0.01, 600, retry_after=30, rng=random.Random(1)) >= 30
    assert action_delay(1, 0.01, 10, retry_after=30, rng=random.Random(1)) >= 30
    assert action_delay(1, 0.01, 10, retry_after=10**9, rng=random.Random(1)) == 86_400


def test_poll_delay_grows_and_is_capped() -> None:
    rng = random.Random(0)
    delays = [poll_delay(n, 300, 3600, rng) for n in range(1, 12)]
    assert delays[0] < delays[3] < delays[6]
    assert max(delays) <= 3600 * 1.1


@pytest.mark.parametrize(
    ("system", "kind", "params", "error"),
    [
        ("aicc", "process", {"title": "t", "description": "d"}, None),
        ("aicc", "process", {"title": "", "description": "d"}, "must not be empty"),
        (
            "aicc",
            "process",
            {"title": "t" * 128, "description": "d" * 20000, "attachment": "a" * 255},
            None,
        ),
        ("secmaster", "comment", {"comment": "x\x00y"}, "NUL"),
        ("secmaster", "terminate", {"comment": "x"}, "does not take comment"),
        ("secmaster", "comment", ["x"], "JSON object"),
        ("koodrive", "anything", {}, "read-only"),
    ],
)
def test_action_validation(system: str, kind: str, params: object, error: str | None) -> None:
    if error is None:
        _spec, clean = validate_action(system, kind, params)
        assert clean["type"] == "Iternal"
        return
    with pytest.raises(InvalidInput, match=error):
        validate_action(system, kind, params)


def trace_obs(*entries: tuple[str, str]) -> Observation:
    return Observation(
        status="open",
        state=State.OPEN,
        title="t",
        trace=tuple(
            TraceEntry(i, f"d{i}", {"title": t, "description": d})
            for i, (t, d) in enumerate(entries)
        ),
    )


@pytest.mark.parametrize(
    ("system", "kind", "params", "observation", "count"),
    [
        ("aicc", "process", {"title": "a", "description": "b"}, trace_obs(), 0),
        (
            "aicc",
            "process",
            {"title": "a", "description": "b"},
            trace_obs(("a", "b"), ("a", "other"), ("a", "b")),
            2,
        ),
        ("secmaster", "comment", {"comment": "hi"}, obs(comments={"1": "hi", "2": "ho"}), 1),
        ("secmaster", "comment", {"comment": "hi"}, obs(comments={"1": "hi", "2": "hi"}), 2),
        ("secmaster", "delete-comment", {"comment_id": "1"}, obs(comments={"1": "hi"}), 0),
        ("secmaster", "delete-comment", {"comment_id": "9"}, obs(comments={"1": "hi"}), 1),
        ("secmaster", "add-attachment", {"attachment_id": "a"}, obs(attachments={"a"}), 1),
        ("secmaster", "add-attachment", {"attachment_id": "a"}, obs(), 0),
        ("secmaster", "delete-attachment", {"attachment_id": "a"}, obs(attachments={"a"}), 0),
        ("secmaster", "delete-attachment", {"attachment_id": "a"}, obs(), 1),
        ("secmaster", "terminate", {}, obs(status="canceled"), 1),
        ("secmaster", "terminate", {}, obs(status="waiting"), 0),
        ("secmaster", "continue", {}, obs(status="finished"), 1),
        ("secmaster", "continue", {}, obs(status="canceled"), 0),
    ],
)
def test_effect_counted_from_the_catalogue(
    system: str, kind: str, params: dict[str, str], observation: Observation, count: int
) -> None:
    """What a read-back counts, per kind: the table in README "How actions are applied"."""
    spec = action_spec(system, kind)
    assert spec.effect.count(params, observation) == count
    assert isinstance(spec.effect, Adds) == (kind in ("process", "comment"))


def test_additive_effects_know_their_own_earlier_actions() -> None:
    comment = action_spec("secmaster", "comment").effect
    process = action_spec("aicc", "process").effect
    assert isinstance(comment, Adds) and isinstance(process, Adds)
    assert comment.same('{"comment": "x"}', {"comment": "x"})  # a JSON column read as text
    assert comment.same({"comment": "x"}, {"comment": "x"})
    assert not comment.same({"comment": "y"}, {"comment": "x"})
    assert not comment.same("not json", {"comment": "x"}) and not comment.same(3, {"comment": "x"})
    mine = {"title": "a", "description": "b"}
    assert process.same({"title": "a", "description": "b", "type": "Other"}, mine)
    assert not process.same({"title": "a", "description": "c"}, mine)


def test_the_catalogue_drives_the_command_line_and_the_upstream() -> None:
    """The enqueue options and SecMaster's UpdateTask mapping are read from the catalogue;
    they must stay what the contract and the API say."""
    from worker.cli import build_parser
    from worker.upstreams.secmaster import ACTIONS as SECMASTER_ACTIONS

    assert [option_name(p) for p in all_params()] == [
        "--title",
        "--description",
        "--type",
        "--attachment",
        "--creator-id",
        "--comment",
        "--comment-id",
        "--attachment-id",
    ]
    enqueue = build_parser().parse_args(
        ["enqueue", "secmaster", "t", "comment", "--comment-id", "9"]
    )
    assert enqueue.comment_id == "9" and enqueue.title is None
    assert SECMASTER_ACTIONS == {
        "comment": ("ADD_COMMENT", "comment"),
        "delete-comment": ("DELETE_COMMENT", "comment_id"),
        "terminate": ("TERMINATE", None),
        "continue": ("CONTINUE", None),
        "add-attachment": ("ADD_ATTACHMENT", "attachment_id"),
        "delete-attachment": ("DELETE_ATTACHMENT", "attachment_id"),
    }
    spec = action_spec("aicc", "process")
    assert configured_defaults(spec, None) == {}
    assert configured_defaults(spec, AiccSettings.model_construct(creator_id="u1")) == {
        "creator_id": "u1"
    }
    with pytest.raises(InvalidInput, match=r"does not take --title \(it takes: --comment\)"):
        validate_params(action_spec("secmaster", "comment"), {"title": "x"}, option_name)
