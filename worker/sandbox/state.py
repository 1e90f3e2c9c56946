"""All simulated tasks, every change applied to them, and changes made "by someone else".

Every change goes through one method here and is recorded as an `Effect` with a global sequence
number, so a test can check that each queued action took effect exactly once and in order, and
tell the client's own writes (origin "api") from background churn (origin "mutation").
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.model import SYSTEMS, System
from worker.sandbox import payloads, seed
from worker.sandbox.auth import Credentials
from worker.sandbox.tasks import (
    AiccTask,
    KooDriveTask,
    RenderCache,
    SecMasterTask,
    Table,
    derive_n,
)

Origin = Literal["api", "mutation"]

# SecMaster action -> the tasksync action kind recorded in effects (worker/catalog.py names).
SECMASTER_KINDS = {
    "TERMINATE": "terminate",
    "CONTINUE": "continue",
    "ADD_COMMENT": "comment",
    "DELETE_COMMENT": "delete-comment",
    "ADD_ATTACHMENT": "add-attachment",
    "DELETE_ATTACHMENT": "delete-attachment",
}
MUTATION_KINDS: dict[System, tuple[str, ...]] = {
    "aicc": ("trace", "status"),
    "secmaster": ("comment", "delete-comment", "add-attachment", "delete-attachment", "status"),
    "koodrive": ("status",),
}
# Seeded status distributions, in tenths: mostly open work, some done.
_AICC_SEEDED = ("Pending",) * 5 + ("Processing",) * 3 + ("Completed",) * 2
_SECMASTER_SEEDED = ("waiting",) * 7 + ("finished",) * 2 + ("canceled",)
_KOODRIVE_SEEDED = (0, 0, 1, 1, 1, 2, 2, 2, 2, 3)


@dataclass(frozen=True, slots=True)
class Effect:
    """One change applied to one task, in the order the sandbox applied them."""

    seq: int
    system: System
    task_id: str
    kind: str  # the tasksync action kind ("process", "comment", ...) or a mutation kind
    params: Mapping[str, Any] = field(default_factory=dict)
    origin: Origin = "api"


class BusinessError(Exception):
    """A write the upstream refuses (SecMaster answers it as HTTP 400 with this code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _now_ms() -> int:
    return int(time.time() * 1000)


class SandboxState:
    def __init__(
        self,
        *,
        seed_value: int = 1,
        tasks_per_system: int = 30,
        credentials: Credentials,
        cache_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if not 0 <= tasks_per_system <= 1_000_000:
            raise ValueError("tasks_per_system must be between 0 and 1,000,000")
        self.seed = seed_value
        self.credentials = credentials
        self.cache = RenderCache(cache_bytes)
        self.aicc: Table[AiccTask] = Table("aicc", self.cache)
        self.secmaster: Table[SecMasterTask] = Table("secmaster", self.cache)
        self.koodrive: Table[KooDriveTask] = Table("koodrive", self.cache)
        self.effects: list[Effect] = []
        self.rng = random.Random(f"mutations:{seed_value}")
        for task_id in seed.aicc_ids(seed_value, tasks_per_system):
            self.add_task("aicc", task_id)
        for task_id in seed.secmaster_ids(seed_value, tasks_per_system):
            self.add_task("secmaster", task_id)
        for task_id in seed.koodrive_ids(seed_value, tasks_per_system):
            self.add_task("koodrive", task_id)

    def table(self, system: System) -> Table[Any]:
        tables: dict[str, Table[Any]] = {
            "aicc": self.aicc,
            "secmaster": self.secmaster,
            "koodrive": self.koodrive,
        }
        return tables[system]

    def task_ids(self, system: System) -> list[str]:
        return [task.id for task in self.table(system)]

    # --- rendering (cached) ---------------------------------------------------------------

    def aicc_body(self, task: AiccTask) -> bytes:
        body = self.cache.get(task)
        if body is None:
            body = task.render()
            self.cache.put(task, body)
        return body

    def secmaster_data(self, task: SecMasterTask) -> bytes:
        body = self.cache.get(task)
        if body is None:
            creds = self.credentials
            body = task.render(creds.project_id, creds.workspace_id)
            self.cache.put(task, body)
        return body

    def koodrive_body(self, task: KooDriveTask) -> bytes:
        body = self.cache.get(task)
        if body is None:
            body = task.render(self.credentials.tenant_id, self.credentials.koodrive_user_id)
            self.cache.put(task, body)
        return body

    # --- adding tasks ---------------------------------------------------------------------

    def add_task(self, system: System, task_id: str | None = None, status: Any = None) -> str:
        """Add a task (a generated id when none is given); its status derives from the id
        unless given. Returns the id."""
        if task_id is None:
            task_id = self._new_id(system)
        n = derive_n(self.seed, system, task_id)
        pick = (n >> 56) % 10  # a tenth of the tasks per step of the distributions below
        if system == "aicc":
            self.aicc.add(AiccTask(task_id, n, status or _AICC_SEEDED[pick]))
        elif system == "secmaster":
            self.secmaster.add(SecMasterTask(task_id, n, status or _SECMASTER_SEEDED[pick]))
        elif system == "koodrive":
            code = _KOODRIVE_SEEDED[pick] if status is None else int(status)
            task = self.koodrive.add(KooDriveTask(task_id, n, code))
            if code == 3:
                task.result_code = seed.pick(n, 8, payloads.KOODRIVE_FAILURES)
        else:
            raise ValueError(f"unknown system {system!r}")
        return task_id

    def _new_id(self, system: System) -> str:
        table = self.table(system)
        while True:
            if system == "aicc":
                candidate = f"ccqG{len(table):07d}" + seed.random_alnum(self.rng, 9)
            elif system == "secmaster":
                candidate = str(uuid.UUID(int=self.rng.getrandbits(128), version=1))
            else:
                candidate = str(self.rng.randrange(10**18, 10**19))
            if table.get(candidate) is None:
                return candidate

    # --- recording ------------------------------------------------------------------------

    def _record(
        self, system: System, task_id: str, kind: str, params: Mapping[str, Any], origin: Origin
    ) -> Effect:
        effect = Effect(len(self.effects) + 1, system, task_id, kind, dict(params), origin)
        self.effects.append(effect)
        return effect

    # --- the clients' writes --------------------------------------------------------------

    def aicc_process(
        self,
        task: AiccTask,
        *,
        creator_id: str,
        process_type: str,
        title: str,
        description: str,
        attachment: str | None,
        origin: Origin = "api",
    ) -> Effect:
        """Handle a task: a StatusUpdate trace entry, and Pending moves to Processing."""
        task.materialize().append(
            payloads.aicc_trace_entry(creator_id, creator_id, "StatusUpdate", title, description)
        )
        if task.status == "Pending":
            task.status = "Processing"
        self.aicc.changed(task)
        params = {"creator_id": creator_id, "type": process_type, "title": title}
        params["description"] = description
        if attachment is not None:
            params["attachment"] = attachment
        return self._record("aicc", task.id, "process", params, origin)

    def secmaster_update(
        self,
        task: SecMasterTask,
        action: str,
        value: str | None,
        user: tuple[str, str],
        origin: Origin = "api",
    ) -> Effect:
        """Apply one UpdateTask action; raise BusinessError when SecMaster would refuse it.

        `value` is the action's one parameter (comment, comment_id or attachment_id).
        """
        kind = SECMASTER_KINDS.get(action)
        if kind is None:
            raise BusinessError("SecMaster.20030001", f"invalid action {action!r}")
        params: dict[str, Any] = {}
        if action in ("TERMINATE", "CONTINUE"):
            if task.status != "waiting":
                # The code is invented: the documents name only the 2003xxxx family.
                raise BusinessError(
                    "SecMaster.20030005",
                    f"the task is {task.status}; only waiting tasks can change",
                )
            task.status = "canceled" if action == "TERMINATE" else "finished"
        else:
            if not value:
                name = {"ADD_COMMENT": "comment", "DELETE_COMMENT": "comment_id"}.get(
                    action, "attachment_id"
                )
                raise BusinessError("SecMaster.20030001", f"{name} is required for {action}")
            comments, attachments = task.materialize()
            if action == "ADD_COMMENT":
                comment_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
                comments.append((comment_id, value, user[0], user[1], _now_ms()))
                params = {"comment": value, "comment_id": comment_id}
            elif action == "DELETE_COMMENT":
                index = next((i for i, c in enumerate(comments) if c[0] == value), None)
                if index is None:
                    raise BusinessError("SecMaster.20030001", f"comment {value} does not exist")
                del comments[index]
                params = {"comment_id": value}
            elif action == "ADD_ATTACHMENT":
                if value not in attachments:  # adding an attachment twice lists it once
                    attachments.append(value)
                params = {"attachment_id": value}
            else:
                if value not in attachments:
                    raise BusinessError("SecMaster.20030001", f"attachment {value} does not exist")
                attachments.remove(value)
                params = {"attachment_id": value}
        task.updated_ms = _now_ms()
        task.modifier = user
        self.secmaster.changed(task)
        return self._record("secmaster", task.id, kind, params, origin)

    # --- changes by someone else ----------------------------------------------------------

    def mutate(self, system: System, task_id: str, kind: str, **params: Any) -> Effect:
        """Change a task as another user would. Kinds: MUTATION_KINDS.

        aicc: trace (title=, description=), status (status=; default: the next one);
        secmaster: comment (comment=), delete-comment (comment_id=; default: a random one),
        add-attachment (attachment_id=), delete-attachment (attachment_id=), status (status=);
        koodrive: status (status=, result_code=). Raises ValueError when impossible.
        """
        if kind not in MUTATION_KINDS.get(system, ()):
            raise ValueError(f"unknown {system} mutation {kind!r}")
        task = self.table(system).get(task_id)
        if task is None:
            raise ValueError(f"{system} task {task_id} does not exist")
        if isinstance(task, AiccTask):
            return self._mutate_aicc(task, kind, params)
        if isinstance(task, SecMasterTask):
            return self._mutate_secmaster(task, kind, params)
        return self._mutate_koodrive(task, params)

    def _mutate_aicc(self, task: AiccTask, kind: str, params: dict[str, Any]) -> Effect:
        person_id, person_name = self.rng.choice(seed.PEOPLE)
        if kind == "trace":
            title = params.get("title", "补充处理记录")
            description = params.get("description", f"{person_name} 更新了处理进展。")
            task.materialize().append(
                payloads.aicc_trace_entry(
                    person_id, person_name, "StatusUpdate", title, description
                )
            )
            self.aicc.changed(task)
            return self._record(
                "aicc", task.id, "trace", {"title": title, "description": description}, "mutation"
            )
        order = ("Pending", "Processing", "Completed")
        current = order.index(task.status) if task.status in order else 0
        if "status" not in params and current == len(order) - 1:
            raise ValueError(f"aicc task {task.id} is already Completed")
        status = params.get("status", order[min(current + 1, len(order) - 1)])
        task.materialize()
        task.status = status
        if status == "Completed":
            task.closed = seed.aicc_time(time.time())
        self.aicc.changed(task)
        return self._record("aicc", task.id, "status", {"status": status}, "mutation")

    def _mutate_secmaster(self, task: SecMasterTask, kind: str, params: dict[str, Any]) -> Effect:
        user = self.rng.choice(seed.SECMASTER_USERS)
        if kind == "status":
            if "status" not in params and task.status != "waiting":
                raise ValueError(f"secmaster task {task.id} is already {task.status}")
            status = params.get("status", self.rng.choice(("finished", "canceled")))
            task.materialize()
            task.status = status
            task.updated_ms = _now_ms()
            task.modifier = user
            self.secmaster.changed(task)
            return self._record("secmaster", task.id, "status", {"status": status}, "mutation")
        comments, attachments = task.materialize()
        action = {v: k for k, v in SECMASTER_KINDS.items()}[kind]
        if kind == "comment":
            value = params.get("comment", self.rng.choice(seed.COMMENTS))
        elif kind == "delete-comment":
            if "comment_id" not in params and not comments:
                raise ValueError(f"secmaster task {task.id} has no comment to delete")
            value = params.get("comment_id") or self.rng.choice(comments)[0]
        elif kind == "add-attachment":
            value = params.get("attachment_id") or str(
                uuid.UUID(int=self.rng.getrandbits(128), version=4)
            )
        else:
            if "attachment_id" not in params and not attachments:
                raise ValueError(f"secmaster task {task.id} has no attachment to delete")
            value = params.get("attachment_id") or self.rng.choice(attachments)
        try:
            return self.secmaster_update(task, action, value, user, origin="mutation")
        except BusinessError as exc:
            raise ValueError(exc.message) from None

    def _mutate_koodrive(self, task: KooDriveTask, params: dict[str, Any]) -> Effect:
        if "status" in params:
            status = int(params["status"])
        elif task.status in (2, 3):
            raise ValueError(f"koodrive task {task.id} has already ended ({task.status})")
        else:
            status = task.status + 1 if task.status == 0 else self.rng.choice((2, 2, 2, 3))
        task.status = status
        task.result_code = (
            params.get("result_code") or self.rng.choice(payloads.KOODRIVE_FAILURES)
            if status == 3
            else None
        )
        self.koodrive.changed(task)
        effect = {"status": status, "result_code": task.result_code}
        return self._record("koodrive", task.id, "status", effect, "mutation")

    def mutate_random(self, count: int = 1) -> list[Effect]:
        """`count` random changes to random tasks (impossible picks are drawn again)."""
        effects: list[Effect] = []
        systems = [s for s in SYSTEMS if len(self.table(s))]
        attempts = 0
        while systems and len(effects) < count and attempts < count * 20:
            attempts += 1
            system = self.rng.choice(systems)
            task = self.rng.choice(self.table(system).order)
            try:
                effects.append(
                    self.mutate(system, task.id, self.rng.choice(MUTATION_KINDS[system]))
                )
            except ValueError:
                continue
        return effects
