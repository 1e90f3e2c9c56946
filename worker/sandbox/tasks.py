"""The simulated tasks: small mutable records per task, rendered to bytes on demand and cached.

Static content derives from each task's 64-bit number `n` (seed.py); a task holds only what can
change. Lists that start out derived (AICC trace, SecMaster comments and attachments) are copied
into the task on its first change, so an untouched task costs a few dozen bytes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

from worker.model import System
from worker.sandbox import payloads, seed

AICC_STATUSES = ("Pending", "Processing", "Completed")
SECMASTER_STATUSES = ("waiting", "finished", "canceled")
KOODRIVE_STATUSES = (0, 1, 2, 3)  # NEW, EXECUTING, SUCCESS, FAILED


class RenderCache:
    """Rendered bodies per task, least recently used evicted past a byte budget.

    Rendering costs 10-20 µs, about a tenth of aiohttp's own cost per request, so the cache is
    a saving rather than a necessity; the budget keeps 100k-task sandboxes in bounded memory.
    A task's entry is dropped whenever the task changes, so an entry is always current.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._entries: OrderedDict[object, bytes] = OrderedDict()

    def get(self, task: object) -> bytes | None:
        body = self._entries.get(task)
        if body is not None:
            self._entries.move_to_end(task)
        return body

    def put(self, task: object, body: bytes) -> None:
        if len(body) > self.budget:
            return
        self._entries[task] = body
        self.used += len(body)
        while self.used > self.budget:
            _, old = self._entries.popitem(last=False)
            self.used -= len(old)

    def drop(self, task: object) -> None:
        body = self._entries.pop(task, None)
        if body is not None:
            self.used -= len(body)


def derive_n(seed_value: int, system: str, task_id: str) -> int:
    """The derivation number of a task: stable for a given seed, system and id."""
    digest = hashlib.blake2b(f"{seed_value}:{system}:{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class AiccTask:
    __slots__ = ("closed", "id", "n", "status", "trace")

    def __init__(self, task_id: str, n: int, status: str) -> None:
        self.id = task_id
        self.n = n
        self.status = status
        self.trace: list[bytes] | None = None  # None: still the derived initial trace
        self.closed: str | None = None

    def materialize(self) -> list[bytes]:
        """The trace as a list owned by the task (called before any change)."""
        if self.trace is None:
            self.trace = payloads.aicc_initial_trace(self.n, self.status)
            if self.status == "Completed" and self.closed is None:
                self.closed = self.derived_closed()
        return self.trace

    def derived_closed(self) -> str:
        return seed.aicc_time(seed.created_epoch(self.n) + 3600 * (1 + self.n % 48))

    def render(self) -> bytes:
        trace = (
            self.trace
            if self.trace is not None
            else payloads.aicc_initial_trace(self.n, self.status)
        )
        closed = self.closed
        if closed is None and self.status == "Completed":
            closed = self.derived_closed()
        return payloads.aicc_detail(self.id, self.n, self.status, trace, closed)


class SecMasterTask:
    __slots__ = ("attachments", "comments", "id", "modifier", "n", "status", "updated_ms")

    def __init__(self, task_id: str, n: int, status: str) -> None:
        self.id = task_id
        self.n = n
        self.status = status
        self.comments: list[payloads.Comment] | None = None  # None: still the derived initial ones
        self.attachments: list[str] | None = None
        self.updated_ms: int | None = None
        self.modifier: tuple[str, str] | None = None

    def materialize(self) -> tuple[list[payloads.Comment], list[str]]:
        if self.comments is None:
            self.comments = payloads.secmaster_initial_comments(self.n)
        if self.attachments is None:
            self.attachments = payloads.secmaster_initial_attachments(self.n)
        return self.comments, self.attachments

    def current_comments(self) -> list[payloads.Comment]:
        return (
            self.comments
            if self.comments is not None
            else payloads.secmaster_initial_comments(self.n)
        )

    def current_attachments(self) -> list[str]:
        if self.attachments is not None:
            return self.attachments
        return payloads.secmaster_initial_attachments(self.n)

    def render(self, project_id: str, workspace_id: str) -> bytes:
        return payloads.secmaster_task(
            self.id,
            self.n,
            project_id=project_id,
            workspace_id=workspace_id,
            status=self.status,
            comments=self.current_comments(),
            attachments=self.current_attachments(),
            updated_ms=self.updated_ms,
            modifier=self.modifier,
        )

    def update_ms(self) -> int:
        """Last update time in epoch ms (for ListTasks' sort_key=update_time)."""
        return (
            self.updated_ms
            if self.updated_ms is not None
            else payloads.secmaster_created_ms(self.n)
        )


class KooDriveTask:
    __slots__ = ("id", "n", "result_code", "status")

    def __init__(self, task_id: str, n: int, status: int) -> None:
        self.id = task_id
        self.n = n
        self.status = status
        self.result_code: str | None = None

    def render(self, tenant_id: str, user_id: str) -> bytes:
        return payloads.koodrive_task(
            self.id,
            self.n,
            tenant_id=tenant_id,
            user_id=user_id,
            status=self.status,
            result_code=self.result_code,
        )


Task = TypeVar("Task", AiccTask, SecMasterTask, KooDriveTask)


class Table(Generic[Task]):
    """One system's tasks in creation order, with their rendered bodies cached."""

    def __init__(self, system: System, cache: RenderCache) -> None:
        self.system = system
        self.tasks: dict[str, Task] = {}
        self.order: list[Task] = []
        self.cache = cache

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.order)

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def add(self, task: Task) -> Task:
        if task.id in self.tasks:
            raise ValueError(f"{self.system} task {task.id} already exists")
        self.tasks[task.id] = task
        self.order.append(task)
        return task

    def changed(self, task: Task) -> None:
        """Forget the task's rendered body: call after every change."""
        self.cache.drop(task)
