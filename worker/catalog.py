"""The action catalogue and its validation: pure, shared by `enqueue` and the action runner.

Rows inserted with plain SQL skip the command line, so the runner re-validates every action it
claims with the same function and fails the row with the message this module produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

from worker.model import SYSTEMS, ActionSpec, System

MAX_TASK_ID = 255
MAX_ID_PARAM = 255
MAX_COMMENT = 20_000

ACTIONS: dict[tuple[System, str], ActionSpec] = {
    (spec.system, spec.kind): spec
    for spec in (
        ActionSpec(
            "aicc",
            "process",
            required=("title", "description"),
            optional=("type", "attachment", "creator_id"),
            max_lengths={
                "title": 128,
                "description": 20_000,
                "attachment": 255,
                "type": 64,
                "creator_id": 64,
            },
            defaults={"type": "Iternal"},  # sic: the only value AICC documents
        ),
        ActionSpec(
            "secmaster", "comment", required=("comment",), max_lengths={"comment": MAX_COMMENT}
        ),
        ActionSpec(
            "secmaster",
            "delete-comment",
            required=("comment_id",),
            max_lengths={"comment_id": MAX_ID_PARAM},
        ),
        ActionSpec("secmaster", "terminate"),
        ActionSpec("secmaster", "continue"),
        ActionSpec(
            "secmaster",
            "add-attachment",
            required=("attachment_id",),
            max_lengths={"attachment_id": MAX_ID_PARAM},
        ),
        ActionSpec(
            "secmaster",
            "delete-attachment",
            required=("attachment_id",),
            max_lengths={"attachment_id": MAX_ID_PARAM},
        ),
    )
}


class InvalidInput(ValueError):
    """Bad user input: the message names the field and says what is wrong."""


def option_name(param: str) -> str:
    """The command-line spelling of a parameter: creator_id -> --creator-id."""
    return "--" + param.replace("_", "-")


def shown(value: object, limit: int = 64) -> str:
    """A value quoted for an error message, cut short: a row inserted by SQL may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_system(name: str) -> TypeGuard[System]:
    return name in SYSTEMS


def check_system(system: str) -> System:
    if not is_system(system):
        raise InvalidInput(f"unknown system {shown(system)}: expected one of {', '.join(SYSTEMS)}")
    return system


def check_utf8(name: str, value: str) -> None:
    """Arguments that were not UTF-8 arrive as lone surrogates: refuse them by name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not valid UTF-8 text") from None


def check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not task_id.strip():
        raise InvalidInput("task id must be a non-empty string")
    check_utf8("task id", task_id)
    if len(task_id) > MAX_TASK_ID:
        raise InvalidInput(f"task id is {len(task_id)} characters long; at most {MAX_TASK_ID}")
    if any(ord(c) < 32 or ord(c) == 127 for c in task_id):
        raise InvalidInput("task id contains control characters")
    return task_id


def kinds_for(system: System) -> list[str]:
    return [kind for (sys, kind) in ACTIONS if sys == system]


def action_spec(system: str, kind: str) -> ActionSpec:
    sys = check_system(system)
    if sys == "koodrive":
        raise InvalidInput("koodrive tasks are read-only: there are no koodrive actions")
    spec = ACTIONS.get((sys, kind))
    if spec is None:
        raise InvalidInput(
            f"unknown {sys} action {shown(kind)}: expected one of {', '.join(kinds_for(sys))}"
        )
    return spec


def validate_params(spec: ActionSpec, params: object) -> dict[str, str]:
    """Check params against the spec; return them with defaults filled in.

    Raises InvalidInput naming the offending field. Values must be strings: a number where
    text is expected is refused rather than silently converted.
    """
    if not isinstance(params, Mapping):
        raise InvalidInput(f"params must be a JSON object, not {type(params).__name__}")
    allowed = set(spec.required) | set(spec.optional)
    unknown = sorted(shown(str(k), 40).strip("'") for k in params if k not in allowed)
    if unknown:
        expected = ", ".join(sorted(allowed)) or "none"
        raise InvalidInput(
            f"{spec.system} {spec.kind} does not take {', '.join(unknown)} (it takes: {expected})"
        )
    out: dict[str, str] = dict(spec.defaults)
    for name in (*spec.required, *spec.optional):
        value: Any = params.get(name)
        if value is None:
            if name in spec.required:
                raise InvalidInput(f"{spec.system} {spec.kind} needs {name} ({option_name(name)})")
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be a string, not {type(value).__name__}")
        if not value.strip():  # an empty optional value would reach the upstream as blank
            raise InvalidInput(f"{name} ({option_name(name)}) must not be empty")
        limit = spec.max_lengths.get(name)
        if limit is not None and len(value) > limit:
            raise InvalidInput(
                f"{name} ({option_name(name)}) is {len(value)} characters long; at most {limit}"
            )
        if "\x00" in value:
            raise InvalidInput(f"{name} contains a NUL character")
        check_utf8(f"{name} ({option_name(name)})", value)
        out[name] = value
    return out


def validate_action(system: str, kind: str, params: object) -> tuple[ActionSpec, dict[str, str]]:
    spec = action_spec(system, kind)
    return spec, validate_params(spec, params)
