"""The action catalogue: everything about an action kind, in one entry, and its validation.

An entry says which params a kind takes (and their limits and defaults), how its effect shows
when the task is read back, and which operation it is upstream. The command line builds its
`enqueue` options from it, the action runner validates and reads back with it, the SecMaster
client maps kinds to its `UpdateTask` actions with it: none of them names a kind.

Rows inserted with plain SQL skip the command line, so the runner re-validates every action it
claims with the same function and fails the row with the message this module produces.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import orjson

from worker.model import SYSTEMS, Observation, System
from worker.text import clip

MAX_TASK_ID = 255
MAX_ID_PARAM = 255
MAX_COMMENT = 20_000


# --- how an effect is counted on a read-back ----------------------------------------------
#
# The action runner records the count before the first attempt (the action's *baseline*) and,
# after an unknown outcome, reads the task back: a count above the baseline means the action
# took effect. An additive effect is one more matching item each time it is applied; a state
# counts 1 while it holds and 0 when it does not, with a baseline of 0.


@dataclass(frozen=True, slots=True)
class Adds:
    """Additive: each application adds one item to the task's `items` whose fields match."""

    items: Literal["trace", "comments"]
    identity: Mapping[str, str]  # param -> the item field that must equal it

    def count(self, params: Mapping[str, str], observation: Observation) -> int:
        return sum(
            1
            for item in _items(observation, self.items)
            if all(item.get(f) == params.get(p) for p, f in self.identity.items())
        )

    def same(self, stored: object, params: Mapping[str, str]) -> bool:
        """Whether an earlier action's stored params have the same effect as these."""
        if isinstance(stored, str):  # a JSON column can come back as text
            try:
                stored = orjson.loads(stored)
            except orjson.JSONDecodeError:
                return False
        if not isinstance(stored, Mapping):
            return False
        return all(stored.get(p) == params.get(p) for p in self.identity)


@dataclass(frozen=True, slots=True)
class Member:
    """A state: the id given in `param` is (present) or is not (not present) in `items`."""

    items: Literal["comments", "attachments"]
    param: str
    present: bool

    def count(self, params: Mapping[str, str], observation: Observation) -> int:
        ids = observation.comments if self.items == "comments" else observation.attachments
        return 1 if (params.get(self.param) in ids) == self.present else 0


@dataclass(frozen=True, slots=True)
class StatusIs:
    """A state: the task's upstream status is `status`."""

    status: str

    def count(self, params: Mapping[str, str], observation: Observation) -> int:
        return 1 if observation.status == self.status else 0


Effect = Adds | Member | StatusIs  # Adds is additive; the others are states


def _items(observation: Observation, items: str) -> Iterable[Mapping[str, Any]]:
    if items == "trace":
        return (t.entry for t in observation.trace)
    return ({"id": c.id, "message": c.message} for c in observation.comments.values())


# --- the kinds ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One action kind: its params, how its effect shows, what it is upstream."""

    system: System
    kind: str
    effect: Effect
    upstream: str  # the operation: AICC's endpoint, SecMaster's UpdateTask action
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    max_lengths: Mapping[str, int] = field(default_factory=dict)
    defaults: Mapping[str, str] = field(default_factory=dict)
    # param -> the key of the system's configuration section that gives its default
    configured: Mapping[str, str] = field(default_factory=dict)

    @property
    def params(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)


def _id_param(name: str) -> dict[str, Any]:
    return {"required": (name,), "max_lengths": {name: MAX_ID_PARAM}}


ACTIONS: dict[tuple[System, str], ActionSpec] = {
    (spec.system, spec.kind): spec
    for spec in (
        ActionSpec(
            "aicc",
            "process",
            Adds("trace", {"title": "title", "description": "description"}),
            upstream="process",
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
            configured={"creator_id": "creator_id"},
        ),
        ActionSpec(
            "secmaster",
            "comment",
            Adds("comments", {"comment": "message"}),
            upstream="ADD_COMMENT",
            required=("comment",),
            max_lengths={"comment": MAX_COMMENT},
        ),
        ActionSpec(
            "secmaster",
            "delete-comment",
            Member("comments", "comment_id", present=False),
            upstream="DELETE_COMMENT",
            **_id_param("comment_id"),
        ),
        ActionSpec("secmaster", "terminate", StatusIs("canceled"), upstream="TERMINATE"),
        ActionSpec("secmaster", "continue", StatusIs("finished"), upstream="CONTINUE"),
        ActionSpec(
            "secmaster",
            "add-attachment",
            Member("attachments", "attachment_id", present=True),
            upstream="ADD_ATTACHMENT",
            **_id_param("attachment_id"),
        ),
        ActionSpec(
            "secmaster",
            "delete-attachment",
            Member("attachments", "attachment_id", present=False),
            upstream="DELETE_ATTACHMENT",
            **_id_param("attachment_id"),
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
    return clip(repr(value), limit)


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
    kinds = kinds_for(sys)
    if not kinds:
        raise InvalidInput(f"{sys} tasks are read-only: there are no {sys} actions")
    spec = ACTIONS.get((sys, kind))
    if spec is None:
        raise InvalidInput(
            f"unknown {sys} action {shown(kind)}: expected one of {', '.join(kinds)}"
        )
    return spec


def all_params() -> list[str]:
    """Every param some kind takes, in catalogue order: the command line's enqueue options."""
    return list(dict.fromkeys(p for spec in ACTIONS.values() for p in spec.params))


def configured_defaults(spec: ActionSpec, section: object) -> dict[str, str]:
    """The defaults a kind takes from its system's configuration section (None: not set up)."""
    out: dict[str, str] = {}
    for param, key in spec.configured.items():
        value = getattr(section, key, None)
        if isinstance(value, str) and value:
            out[param] = value
    return out


def validate_params(
    spec: ActionSpec, params: object, spell: Callable[[str], str] = str
) -> dict[str, str]:
    """Check params against the spec; return them with defaults filled in.

    Raises InvalidInput naming the offending field (a name it does not take spelled with
    `spell`: the command line passes `option_name`). Values must be strings: a number where
    text is expected is refused rather than silently converted.
    """
    if not isinstance(params, Mapping):
        raise InvalidInput(f"params must be a JSON object, not {type(params).__name__}")
    unknown = sorted(spell(shown(str(k), 40).strip("'")) for k in params if k not in spec.params)
    if unknown:
        expected = ", ".join(sorted(spell(p) for p in spec.params)) or "none"
        raise InvalidInput(
            f"{spec.system} {spec.kind} does not take {', '.join(unknown)} (it takes: {expected})"
        )
    out: dict[str, str] = dict(spec.defaults)
    for name in spec.params:
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
