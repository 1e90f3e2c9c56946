"""A command's start-up: no cyclic garbage collection while its modules load, none at exit.

A command loads some 70,000 objects that live until it exits (code, classes, SQLAlchemy's and
pydantic's tables). Collecting while they load finds no garbage, and the interpreter's own
collections at exit traverse them all again only to free memory the kernel frees anyway:
together more than a quarter of `tasksync status` (0.43 s -> 0.31 s on SQLite, issue 17).

So `main` defers collection; `resume_collection()` turns it back on before the command's real
work (the event loop, a migration, a server), with what is loaded so far frozen so that later
collections skip it, and with a larger first-generation threshold (see `YOUNG_THRESHOLD`); and
at exit everything is frozen. Only `main` defers: a test or a library calling
`resume_collection()` finds collection untouched.
"""

from __future__ import annotations

import atexit
import gc

# Python's default (700 allocations) suits programs whose objects die young. A poll cycle holds
# every answer of a batch (hundreds of decoded JSON documents: tens of objects each) until the
# batch is written, so each youngest-generation collection traverses them, promotes them and
# the older generations traverse them again: 294 youngest and 26 middle collections took
# 0.15-0.2 s of an unchanged 18,000-task cycle (~10 us a task), for no garbage (answers are
# freed by reference counting). At 50,000 the cycle collects ~50 times, in ~7 ms. Cyclic
# garbage (exceptions with their tracebacks, mostly) waits at most 50,000 allocations longer:
# a few MB at worst.
YOUNG_THRESHOLD = 50_000
MIDDLE_THRESHOLD = 20

# The event loop of `sync`, `apply`, `discover` and `run`: uvloop's (asyncio's interface over
# libuv, its sockets and callbacks in C; anyio's asyncio backend runs on it unchanged). Side by
# side on an unchanged 18,000-task cycle it took 4-6 % less CPU than asyncio's own loop
# (102 vs 106 us a task on PostgreSQL, 122 vs 130 on SQLite). A dependency, so it is there.
LOOP_OPTIONS: dict[str, object] = {"use_uvloop": True}

_deferred = False
_freeze_at_exit = False


def defer_collection() -> None:
    """Called once by `main`, before the command loads its modules."""
    global _deferred, _freeze_at_exit
    if gc.isenabled():
        gc.disable()
        _deferred = True
    if not _freeze_at_exit:
        # atexit runs last-registered first: this runs after the handlers registered later
        # (they may still allocate and be collected normally), before the interpreter's own
        # collections, which then have nothing to traverse. Nothing here needs a finalizer at
        # exit: engines, connections, files and locks are closed explicitly.
        atexit.register(gc.freeze)
        _freeze_at_exit = True


def resume_collection() -> None:
    """The command's modules are loaded: collect again from here on, skipping them."""
    global _deferred
    if _deferred:
        _deferred = False
        gc.freeze()
        _, _, oldest = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, oldest)
        gc.enable()
