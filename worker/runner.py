"""Run-once commands (`sync`, `discover`, `apply`): open the store and the upstreams, do what
is due, print a summary, exit. Cron, systemd timers and the tests use these."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import anyio

from worker.config import ConfigError, LoadedConfig
from worker.hooks import Hooks
from worker.model import System
from worker.startup import LOOP_OPTIONS, resume_collection
from worker.store import SqliteWorkerLock, Store, sqlite_path, worker_name
from worker.store.engine import async_url
from worker.store.migrate import check_schema, run_migrated
from worker.upstreams import build_upstreams
from worker.upstreams.base import Upstream

T = TypeVar("T")


@contextmanager
def worker_lock(url: str) -> Iterator[None]:
    """SQLite has one writer: hold the worker lock for as long as this process works."""
    path = sqlite_path(async_url(url))
    if path is None:
        yield
        return
    lock = SqliteWorkerLock(path)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def register_secrets(loaded: LoadedConfig) -> None:
    """Every configured secret is masked in every log line from now on."""
    from worker.logs import register_secret

    for section in (
        loaded.settings.systems.aicc,
        loaded.settings.systems.secmaster,
        loaded.settings.systems.koodrive,
    ):
        if section is None:
            continue
        for value in section.model_dump().values():
            if hasattr(value, "get_secret_value"):
                register_secret(value.get_secret_value())
    from sqlalchemy.engine import make_url

    password = make_url(async_url(loaded.settings.database.url)).password
    if password:
        register_secret(str(password))


async def with_worker(
    loaded: LoadedConfig,
    fn: Callable[[Store, dict[System, Upstream], str], Awaitable[T]],
    *,
    check: bool = False,
) -> T:
    """`fn` with the store and the upstream clients; `check`: first make sure the schema is
    current, on the store's own engine (raises NeverMigrated or SchemaOutdated)."""
    # enough connections that `concurrency` requests in flight do not queue for one
    store = Store.open(
        loaded.settings.database.url, pool_size=min(loaded.settings.worker.concurrency, 10)
    )
    upstreams: dict[System, Upstream] = {}
    try:
        if check:
            await check_schema(store.engine)
        upstreams = build_upstreams(loaded.settings)
        return await fn(store, upstreams, worker_name())
    finally:
        with anyio.CancelScope(shield=True):
            for client in upstreams.values():
                await client.aclose()
            await store.aclose()


def _run_worker(
    loaded: LoadedConfig, fn: Callable[[Store, dict[System, Upstream], str], Awaitable[int]]
) -> int:
    """Hold the worker lock and run `fn` in an event loop (the command's modules are loaded).

    The schema is checked on the command's own engine (docs/interface.md: a database never
    migrated is migrated on first use; an older one asks for `tasksync migrate`), not on an
    engine and event loop of its own first: that was ~15 ms of every run on PostgreSQL."""
    url = loaded.settings.database.url

    def work(check: bool) -> int:
        return anyio.run(
            lambda: with_worker(loaded, fn, check=check),
            backend="asyncio",
            backend_options=LOOP_OPTIONS,
        )

    with worker_lock(url):
        resume_collection()
        return run_migrated(url, work)


class ProgressBar(AbstractContextManager["ProgressBar"]):
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, label: str, total: int | None, quiet: bool) -> None:
        self.enabled = not quiet and sys.stdout.isatty()
        self._progress = None
        self._task = None
        if self.enabled:
            from rich.progress import Progress

            self._progress = Progress(transient=True)
            self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def total(self, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)


def _check_systems(loaded: LoadedConfig, systems: Sequence[str]) -> None:
    configured = {
        name
        for name in ("aicc", "secmaster", "koodrive")
        if getattr(loaded.settings.systems, name) is not None
    }
    for system in systems:
        if system not in configured:
            raise ConfigError(
                f"systems.{system}: not configured (add a [systems.{system}] section)"
            )


def run_sync(loaded: LoadedConfig, *, systems: Sequence[str], all_tasks: bool, quiet: bool) -> int:
    from worker.sync import SyncCycle

    _check_systems(loaded, systems)
    register_secrets(loaded)

    async def go(store: Store, upstreams: dict[System, Upstream], worker: str) -> int:
        bar = ProgressBar("polling", None, quiet)
        if bar.enabled and upstreams:  # the count is for the bar alone: none off a terminal
            bar.total(await store.count_due(systems or list(upstreams), all_tasks=all_tasks))
        with bar:
            stats = await SyncCycle(store, upstreams, loaded.settings, worker).run(
                all_tasks=all_tasks, systems=systems, progress=bar.advance if bar.enabled else None
            )
        if not quiet:
            print(f"polled {stats.polled} task(s): {stats.changed} changed, {stats.failed} failed")
        return 0

    return _run_worker(loaded, go)


def run_discover(loaded: LoadedConfig, *, systems: Sequence[str], quiet: bool) -> int:
    from worker.sync import discover

    _check_systems(loaded, systems)
    register_secrets(loaded)

    async def go(store: Store, upstreams: dict[System, Upstream], worker: str) -> int:
        with ProgressBar("discovering", None, quiet) as bar:
            stats = await discover(
                store, upstreams, worker, systems, progress=bar.advance if bar.enabled else None
            )
        if not quiet:
            print(f"listed {stats.seen} task(s): {stats.new} new")
        for failure in stats.failed:
            print(f"tasksync: discovery failed: {failure}", file=sys.stderr)
        return 1 if stats.failed else 0

    return _run_worker(loaded, go)


def run_apply(loaded: LoadedConfig, hooks: Hooks | None = None) -> int:
    from worker.actions import ActionRunner

    register_secrets(loaded)

    async def go(store: Store, upstreams: dict[System, Upstream], worker: str) -> int:
        runner = ActionRunner(store, upstreams, loaded.settings, worker, hooks=hooks or Hooks())
        stats = await runner.run_until_idle()
        print(f"actions: {stats}")
        return 0

    return _run_worker(loaded, go)
