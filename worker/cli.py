"""The `tasksync` command line: parse, call one function, print. No business logic here.

Exit status (docs/interface.md): 0 success; 2 bad usage or input; 78 bad configuration; 1
anything else. A user error never prints a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from worker.catalog import (
    InvalidInput,
    action_spec,
    all_params,
    check_system,
    check_task_id,
    configured_defaults,
    option_name,
    validate_params,
)
from worker.config import EX_CONFIG, ConfigError, LoadedConfig, load_config
from worker.model import ActionStatus
from worker.startup import defer_collection, resume_collection

if TYPE_CHECKING:
    from worker.store import Store

log = logging.getLogger("worker.cli")
T = TypeVar("T")

EX_USAGE = 2
EX_FAILURE = 1


class UsageError(Exception):
    """Bad command-line usage: exit 2 with this one-line message."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming what is wrong, instead of argparse's usage dump.
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    parser = Parser(
        prog="tasksync", description="Sync Huawei Cloud tasks into a database and act on them."
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $TASKSYNC_CONFIG, ./tasksync.toml, /etc/tasksync/tasksync.toml)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=None,
        help="debug, info, warning or error (default: info; warning for one-shot commands)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    sub.add_parser("migrate", help="bring the database schema to the newest revision")
    for name, verb in (("track", "start tracking"), ("untrack", "stop polling")):
        p = sub.add_parser(name, help=f"{verb} tasks")
        p.add_argument("system", metavar="SYSTEM")
        p.add_argument("task_ids", metavar="TASK_ID", nargs="+")
    p = sub.add_parser("discover", help="page through list endpoints and track new tasks")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("systems", metavar="SYSTEM", nargs="*")
    p = sub.add_parser("sync", help="one poll cycle over due tasks, then exit")
    p.add_argument("--all", action="store_true", help="poll every tracked task, due or not")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("systems", metavar="SYSTEM", nargs="*")
    p = sub.add_parser("enqueue", help="queue an action; prints its id")
    p.add_argument("system", metavar="SYSTEM")
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("action", metavar="ACTION")
    for param in all_params():  # every param of every kind; the catalogue says which fits
        p.add_argument(option_name(param), dest=param, metavar="TEXT")
    p.add_argument(
        "--key", metavar="KEY", help="idempotency key: a second enqueue with it prints the first id"
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        metavar="N",
        help="attempts before the action fails (default: retry.max_attempts)",
    )
    p.add_argument(
        "--requested-by",
        metavar="TEXT",
        help="who asked, for a wrapper acting for a person (default: the database role)",
    )
    sub.add_parser("apply", help="apply every due action, then exit")
    sub.add_parser("run", help="the daemon: scheduled sync, actions and discovery")
    p = sub.add_parser("status", help="tasks, action queue, last cycles, failing tasks")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="a task's latest snapshot, history and actions")
    p.add_argument("system", metavar="SYSTEM")
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("actions", help="list actions")
    p.add_argument("--status", choices=[s.value for s in ActionStatus])
    p.add_argument("--json", action="store_true")
    for name in ("cancel", "retry"):
        p = sub.add_parser(name, help=f"{name} an action")
        p.add_argument("action_id", metavar="ACTION_ID")
    p = sub.add_parser("sandbox", help="serve simulators of the three APIs on loopback")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--faults", metavar="SPEC")
    p.add_argument(
        "--throttle",
        metavar="SPEC",
        help="gateway limits per system, e.g. aicc=40/1s,secmaster=100/1s,koodrive=600/1m",
    )
    p.add_argument("--write-config", metavar="FILE")
    p.add_argument(
        "--seed-tasks",
        type=int,
        default=20,
        metavar="N",
        help="tasks seeded per system (default 20)",
    )
    p.add_argument(
        "--mutate-every", type=float, metavar="SECONDS", help="change random tasks on a timer"
    )
    sub.add_parser("demo", help="an end-to-end run on SQLite against the sandbox")
    p = sub.add_parser("grants", help="PostgreSQL: print the SQL granting roles read or submit")
    p.add_argument(
        "--reader", action="append", default=[], metavar="ROLE", help="SELECT only (repeatable)"
    )
    p.add_argument(
        "--submitter",
        action="append",
        default=[],
        metavar="ROLE",
        help="a reader that may also INSERT requests into actions (repeatable)",
    )
    p = sub.add_parser("healthcheck", help="exit 0 when healthy, 1 when not; one line per check")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("prune", help="delete what [retention] lets go; rows per table")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--vacuum", action="store_true", help="then reclaim the space (SQLite: VACUUM)")
    p = sub.add_parser("events", help="history events in id order (the newest 10 without --since)")
    p.add_argument("--since", metavar="ID", help="events after this id")
    p.add_argument("--follow", action="store_true", help="keep printing new events until a signal")
    p.add_argument("--system", dest="systems", metavar="SYSTEM", nargs="+", action="extend")
    p.add_argument("--kind", dest="kinds", metavar="KIND", nargs="+", action="extend")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    defer_collection()  # until the command's modules are loaded (worker/startup.py)
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args)
        handler = COMMANDS[args.command]
        return handler(args)
    except UsageError as exc:
        return _fail(str(exc), EX_USAGE)
    except InvalidInput as exc:
        return _fail(f"tasksync: {exc}", EX_USAGE)
    except ConfigError as exc:
        return _fail(f"tasksync: configuration error: {exc}", EX_CONFIG)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`tasksync actions | head -1`): not an error of ours
        _silence_stdout()
        return 0
    except Exception as exc:  # the last line of defence: one line, no traceback
        described = _describe_failure(exc)
        if described is None:
            raise
        return _fail(f"tasksync: {described[0]}", described[1])


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def _describe_failure(exc: BaseException) -> tuple[str, int] | None:
    """One line and an exit status for the failures a user can meet; None for a bug."""
    if isinstance(exc, BaseExceptionGroup):  # a failure inside a task group
        for inner in exc.exceptions:
            described = _describe_failure(inner)
            if described is not None:
                return described
        return None
    from worker.store import DatabaseUrlError, WorkerLockError

    if isinstance(exc, DatabaseUrlError):
        return f"configuration error: {exc}", EX_CONFIG
    from worker.observe import ListenError
    from worker.store.migrate import SchemaOutdated

    if isinstance(exc, WorkerLockError | CommandFailed | SchemaOutdated | ListenError):
        return str(exc), EX_FAILURE
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    if isinstance(exc, DBAPIError):
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        return f"database error: {detail}", EX_FAILURE
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {str(exc).splitlines()[0]}", EX_FAILURE
    if isinstance(exc, OSError):
        return f"cannot reach the database: {exc.strerror or exc}", EX_FAILURE
    return None


class CommandFailed(Exception):
    """A command that ran but could not do what was asked (exit 1)."""


def _setup_logging(args: argparse.Namespace) -> None:
    long_running = args.command in ("run", "sandbox")
    level = (args.log_level or ("info" if long_running else "warning")).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise UsageError(
            f"tasksync: --log-level {args.log_level!r}: expected debug, info, warning or error"
        )
    from worker.logs import setup_logging

    setup_logging(level)


# ---------------------------------------------------------------------------------------------
# plumbing shared by the commands


def _config(args: argparse.Namespace) -> LoadedConfig:
    loaded = load_config(args.config)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return loaded


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    import anyio

    resume_collection()  # the command's modules are loaded by now (worker/startup.py)
    return anyio.run(fn, backend="asyncio")


def _open_store(loaded: LoadedConfig) -> Store:
    from worker.store import Store

    return Store.open(loaded.settings.database.url)


def _ensure_schema(url: str) -> None:
    from worker.store.migrate import ensure_schema

    ensure_schema(url)


async def _with_store(
    loaded: LoadedConfig, fn: Callable[[Store], Awaitable[T]], *, check_schema: bool = False
) -> T:
    store = _open_store(loaded)
    try:
        if check_schema:
            from worker.store.migrate import check_schema as check

            await check(store.engine)
        return await fn(store)
    finally:
        await store.aclose()


def _with_schema(loaded: LoadedConfig, fn: Callable[[Store], Awaitable[T]]) -> T:
    """`fn` on the store, once the schema is known to be current (docs/interface.md: a database
    never migrated is migrated on first use; an older one asks for `tasksync migrate`)."""
    from worker.store.migrate import run_migrated

    return run_migrated(
        loaded.settings.database.url,
        lambda check: _run(lambda: _with_store(loaded, fn, check_schema=check)),
    )


def _store_call(args: argparse.Namespace, fn: Callable[[Store], Awaitable[T]]) -> T:
    return _with_schema(_config(args), fn)


def _parse_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"action id must be a whole number, not {text[:32]!r}") from None
    if not 0 < value < 2**63:
        raise InvalidInput(f"action id {text[:32]!r} is out of range (1 to 2^63-1)")
    return value


# ---------------------------------------------------------------------------------------------
# commands


def cmd_migrate(args: argparse.Namespace) -> int:
    from worker.store import redact_url
    from worker.store.migrate import check_not_newer, upgrade

    loaded = _config(args)
    url = loaded.settings.database.url
    check_not_newer(url)
    resume_collection()
    revision = upgrade(url)
    print(f"database {redact_url(url)} is at revision {revision}")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    system = check_system(args.system)
    ids = [check_task_id(t) for t in args.task_ids]
    added = _store_call(args, lambda store: store.track(system, ids))
    print(f"tracking {len(ids)} {system} task(s), {added} new")
    return 0


def cmd_untrack(args: argparse.Namespace) -> int:
    system = check_system(args.system)
    ids = [check_task_id(t) for t in args.task_ids]
    removed = _store_call(args, lambda store: store.untrack(system, ids))
    print(f"untracked {removed} {system} task(s); their history is kept")
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    system = check_system(args.system)
    task_id = check_task_id(args.task_id)
    spec = action_spec(system, args.action)
    given = {p: getattr(args, p) for p in all_params() if getattr(args, p) is not None}
    validate_params(spec, given, option_name)  # before the configuration: bad input is exit 2
    if args.key is not None and (not args.key.strip() or len(args.key) > 255):
        raise InvalidInput("--key must be 1 to 255 characters")
    if args.max_attempts is not None and not 1 <= args.max_attempts <= 1000:
        raise InvalidInput("--max-attempts must be between 1 and 1000")
    by = args.requested_by
    if by is not None and (not by.strip() or len(by) > 255 or not by.isprintable()):
        raise InvalidInput("--requested-by must be 1 to 255 printable characters")
    loaded = _config(args)
    section = getattr(loaded.settings.systems, spec.system)
    params = validate_params(spec, configured_defaults(spec, section) | given, option_name)
    action_id, _created = _with_schema(
        loaded,
        lambda store: store.enqueue(
            system,
            task_id,
            spec.kind,
            params,
            key=args.key,
            max_attempts=args.max_attempts,
            requested_by=by,
        ),
    )
    print(action_id)
    return 0


def cmd_actions(args: argparse.Namespace) -> int:
    from worker.output import decode_json_text, dumps, table

    rows = _store_call(args, lambda store: store.list_actions(args.status))
    for row in rows:
        row["params"] = decode_json_text(row["params"])
        row["result"] = decode_json_text(row["result"])
    if args.json:
        print(dumps(rows))
        return 0
    if not rows:
        print("no actions" + (f" with status {args.status}" if args.status else ""))
        return 0
    print(
        table(
            (
                "id",
                "system",
                "task",
                "action",
                "status",
                "tries",
                "next attempt",
                "last error",
                "params",
                "requested by",
            ),
            [
                (
                    r["id"],
                    r["system"],
                    r["task_id"],
                    r["kind"],
                    r["status"],
                    r["attempts"],
                    r["next_attempt_at"] if r["status"] == ActionStatus.PENDING else None,
                    r["last_error"],
                    r["params"],
                    r["requested_by"],
                )
                for r in rows
            ],
            width=48,
        )
    )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    action_id = _parse_id(args.action_id)
    status, changed = _store_call(args, lambda store: store.cancel(action_id))
    if status is None:
        raise CommandFailed(f"there is no action {action_id}")
    if not changed:
        raise CommandFailed(f"action {action_id} is {status}: only pending actions can be canceled")
    print(f"action {action_id} canceled")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    action_id = _parse_id(args.action_id)
    status, changed = _store_call(args, lambda store: store.retry(action_id))
    if status is None:
        raise CommandFailed(f"there is no action {action_id}")
    if not changed:
        raise CommandFailed(f"action {action_id} is {status}: only failed actions can be retried")
    print(f"action {action_id} is pending again with a fresh attempt budget")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.output import dumps

    async def gather(store: Store) -> dict[str, Any]:
        return {**await store.status_report(), **await store.upstream_report()}

    report = _store_call(args, gather)
    if args.json:
        print(dumps(report))
    else:
        print(_format_status(report))
    return 0


def _format_status(report: dict[str, Any]) -> str:
    from worker.output import table

    out: list[str] = []
    states = ("open", "in_progress", "done", "failed", "canceled", "unknown")
    if report["tasks"]:
        rows = [
            (system, *(counts.get(s, 0) for s in states), sum(counts.values()))
            for system, counts in sorted(report["tasks"].items())
        ]
        out += ["Tracked tasks", table(("system", *states, "total"), rows), ""]
    else:
        out += ["Tracked tasks: none (tasksync track SYSTEM TASK_ID, or tasksync discover)", ""]
    queue = report["actions"]
    out += ["Action queue: " + ", ".join(f"{queue.get(s, 0)} {s}" for s in ActionStatus), ""]
    if report["runs"]:
        rows = [
            (
                r["id"],
                r["kind"],
                r["worker"],
                r["started_at"],
                r["finished_at"],
                r["polled"],
                r["changed"],
                r["failed"],
            )
            for r in report["runs"]
        ]
        out += [
            "Last cycles",
            table(
                ("id", "kind", "worker", "started", "finished", "polled", "changed", "failed"), rows
            ),
            "",
        ]
    else:
        out += ["Last cycles: none yet", ""]
    out += _format_upstreams(report)
    if report["failing"]:
        rows = [
            (
                r["system"],
                r["task_id"],
                r["consecutive_failures"],
                r["next_poll_at"],
                r["last_error"],
            )
            for r in report["failing"]
        ]
        out += [
            "Failing tasks",
            table(("system", "task", "failures", "next poll", "last error"), rows, width=80),
        ]
    else:
        out += ["Failing tasks: none"]
    out += ["", *_format_storage(report)]
    return "\n".join(out)


def _format_upstreams(report: dict[str, Any]) -> list[str]:
    from worker.output import table

    out: list[str] = []
    if report.get("upstreams"):
        rows = [
            (
                system,
                "-" if h["rate"] is None else f"{h['rate']:.1f}/s",
                "-" if h["ceiling"] is None else f"{h['ceiling']:.1f}/s",
                h["policy"],
                f"{h['throttled']} of {h['requests']}",
                h["circuit"],
                h["updated_at"],
            )
            for system, h in sorted(report["upstreams"].items())
        ]
        headers = ("system", "rate", "ceiling", "gateway", "429s last cycle", "circuit", "as of")
        out += ["Upstreams (rate control, newest cycle)", table(headers, rows), ""]
    if report.get("discovery"):
        walk_rows = [
            (
                system,
                w["started_at"],
                w["pages"],
                w["found"],
                w["new"],
                "complete" if w["complete"] else f"stopped: {w['error']}",
            )
            for system, w in sorted(report["discovery"].items())
        ]
        walk_headers = ("system", "started", "pages", "found", "new", "walk")
        out += ["Last discovery", table(walk_headers, walk_rows, width=80), ""]
    return out


def _format_storage(report: dict[str, Any]) -> list[str]:
    from worker.output import cell

    rows = report.get("rows") or {}
    out = ["Rows: " + ", ".join(f"{n} {table}" for table, n in rows.items())]
    pruned = report.get("last_prune")
    if pruned is None:
        return [*out, "Last prune: never"]
    removed = ", ".join(f"{n} {t}" for t, n in (pruned["deleted"] or {}).items() if n) or "nothing"
    when = cell(pruned["finished_at"]) if pruned["finished_at"] else "not finished"
    return [*out, f"Last prune: {when} by {pruned['worker']}: removed {removed}"]


def cmd_show(args: argparse.Namespace) -> int:
    from worker.output import decode_json_text, dumps

    system = check_system(args.system)
    task_id = check_task_id(args.task_id)
    shown = _store_call(args, lambda store: store.show_task(system, task_id))
    if shown is None:
        raise CommandFailed(
            f"{system} task {task_id} is not known: tasksync track {system} {task_id}"
        )
    for action in shown["actions"]:
        action["params"] = decode_json_text(action["params"])
    if args.json:
        print(dumps(shown))
    else:
        print(_format_show(shown))
    return 0


def _format_show(shown: dict[str, Any]) -> str:
    from worker.output import cell, dumps, table

    t = shown["task"]
    out = [
        f"{t['system']} task {t['task_id']}" + ("" if t["tracked"] else " (not tracked)"),
        f"  title:        {cell(t['title'], 100)}",
        f"  status:       {cell(t['status'])} ({t['state']})",
        f"  last polled:  {cell(t['last_polled_at'])}    next poll: {cell(t['next_poll_at'])}",
        f"  last changed: {cell(t['last_changed_at'])}    snapshots: {t['snapshot_seq']}",
    ]
    if t["last_error"]:
        out.append(f"  last error:   {t['last_error']} ({t['consecutive_failures']} in a row)")
    out.append("")
    if shown["events"]:
        rows: list[tuple[Any, ...]] = [
            (e["observed_at"], e["kind"], e["occurred_at"], e["data"]) for e in shown["events"]
        ]
        out += ["History", table(("observed", "event", "occurred", "data"), rows, width=90), ""]
    else:
        out += ["History: none yet", ""]
    if shown["actions"]:
        rows = [
            (
                a["id"],
                a["kind"],
                a["status"],
                a["attempts"],
                a["last_error"],
                a["params"],
                a["requested_by"],
            )
            for a in shown["actions"]
        ]
        out += [
            "Actions",
            table(
                ("id", "action", "status", "tries", "last error", "params", "requested by"), rows
            ),
            "",
        ]
    if shown["snapshot"]:
        s = shown["snapshot"]
        out += [
            f"Latest snapshot (#{s['seq']}, fetched {cell(s['fetched_at'])})",
            dumps(s["payload"]),
        ]
    else:
        out += ["Latest snapshot: none yet (tasksync sync)"]
    return "\n".join(out)


def cmd_sync(args: argparse.Namespace) -> int:
    from worker.runner import run_sync

    systems = [check_system(s) for s in args.systems]
    return run_sync(_config(args), systems=systems, all_tasks=args.all, quiet=args.quiet)


def cmd_discover(args: argparse.Namespace) -> int:
    from worker.runner import run_discover

    systems = [check_system(s) for s in args.systems]
    return run_discover(_config(args), systems=systems, quiet=args.quiet)


def cmd_apply(args: argparse.Namespace) -> int:
    from worker.hooks import Hooks
    from worker.runner import run_apply

    return run_apply(_config(args), Hooks.from_environ(os.environ))


def cmd_run(args: argparse.Namespace) -> int:
    from worker.hooks import Hooks
    from worker.service import run_daemon

    loaded = _config(args)
    _ensure_schema_once_up(loaded.settings.database.url)
    resume_collection()
    return run_daemon(loaded, Hooks.from_environ(os.environ))


def _ensure_schema_once_up(url: str) -> None:
    """The daemon starts while its database is down (a host booting, a server restarting): it
    checks the schema as soon as the database answers, one log line per try, instead of
    exiting 1 and leaving it to systemd. A database that answers with an error still fails."""
    import time

    from worker.store.listen import describe_outage, is_outage

    delay = 1.0
    while True:
        try:
            _ensure_schema(url)
            return
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("database unavailable (%s); retrying in %.0fs", describe_outage(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from worker.sandbox import serve

    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port {args.port}: expected 0 to 65535")
    if args.seed_tasks < 0:
        raise InvalidInput("--seed-tasks must be zero or more")
    if args.mutate_every is not None and not 0 < args.mutate_every < float("inf"):
        raise InvalidInput("--mutate-every must be a positive number of seconds")
    resume_collection()
    try:
        return serve(
            port=args.port,
            faults=args.faults,
            write_config=args.write_config,
            seed_tasks=args.seed_tasks,
            mutate_every=args.mutate_every,
            throttle=args.throttle,
        )
    except ValueError as exc:  # a bad --faults or --throttle spec
        raise InvalidInput(str(exc)) from None


def cmd_grants(args: argparse.Namespace) -> int:
    from worker.store.grants import GrantsError, GrantsUnsupported, build_grants, check_role_name

    try:
        readers = [check_role_name(r) for r in args.reader]
        submitters = [check_role_name(r) for r in args.submitter]
    except ValueError as exc:
        raise InvalidInput(f"grants: {exc}") from None
    if not readers and not submitters:
        raise InvalidInput("grants: name at least one --reader ROLE or --submitter ROLE")
    loaded = _config(args)
    try:
        sql = build_grants(loaded.settings.database.url, readers, submitters)
    except GrantsUnsupported as exc:
        raise InvalidInput(str(exc)) from None
    except GrantsError as exc:
        raise CommandFailed(f"grants: {exc}") from None
    print(sql, end="")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from worker.health import healthy, run_checks
    from worker.output import dumps

    loaded = _config(args)  # no migration: a probe reports an old schema, it never changes it
    checks = _run(lambda: _with_store(loaded, lambda store: run_checks(store, loaded.settings)))
    ok = healthy(checks)
    if args.json:
        print(dumps({"healthy": ok, "checks": [c.as_dict() for c in checks]}))
    else:
        print("\n".join(c.line() for c in checks))
    return 0 if ok else EX_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    resume_collection()
    return run_demo()


def cmd_prune(args: argparse.Namespace) -> int:
    from worker.output import table
    from worker.retention import prune_once
    from worker.store import worker_name

    loaded = _config(args)
    retention = loaded.settings.retention
    if not retention.configured:
        print("nothing to prune: no [retention] age is configured (every row is kept)")
        return 0
    report = _with_schema(
        loaded,
        lambda store: prune_once(
            store, retention, worker_name(), dry_run=args.dry_run, vacuum=args.vacuum
        ),
    )
    verb = "would remove" if report.dry_run else "removed"
    print(table(("table", verb), [(t, n) for t, n in report.rows.items()]))
    if report.size_before is not None and report.size_after is not None:
        freed = (report.size_before - report.size_after) / 1e6
        print(
            f"vacuum: {report.size_before / 1e6:.1f} MB -> {report.size_after / 1e6:.1f} MB "
            f"({freed:.1f} MB reclaimed)"
        )
    return 0


EVENT_KINDS = (
    "status_changed",
    "trace",
    "comment_added",
    "comment_removed",
    "attachment_added",
    "attachment_removed",
)


def cmd_events(args: argparse.Namespace) -> int:
    from worker.changes import stream_events

    since = None if args.since is None else _parse_event_id(args.since)
    systems = [check_system(s) for s in args.systems or ()]
    kinds = list(args.kinds or ())
    for kind in kinds:
        if kind not in EVENT_KINDS:
            raise InvalidInput(
                f"unknown event kind {kind[:40]!r}: expected {', '.join(EVENT_KINDS)}"
            )
    emit = _print_events_json if args.json else _print_events
    loaded = _config(args)
    url = loaded.settings.database.url
    kept = _with_schema(
        loaded,
        lambda store: stream_events(
            store, url, since=since, follow=args.follow, systems=systems, kinds=kinds, emit=emit
        ),
    )
    if not kept:  # the reader went away: not an error of ours
        _silence_stdout()
    return 0


def _parse_event_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(
            f"--since must be an event id (a whole number), not {text[:32]!r}"
        ) from None
    if not 0 <= value < 2**63:
        raise InvalidInput(f"--since {text[:32]!r} is out of range (0 to 2^63-1)")
    return value


def _print_events_json(events: list[dict[str, Any]]) -> None:
    import orjson

    from worker.output import to_jsonable

    keys = ("id", "system", "task_id", "kind", "occurred_at", "observed_at", "data", "title")
    out = sys.stdout
    for e in events:
        out.write(orjson.dumps(to_jsonable({k: e[k] for k in keys})).decode() + "\n")
    out.flush()


def _print_events(events: list[dict[str, Any]]) -> None:
    from worker.output import cell

    out = sys.stdout
    for e in events:
        out.write(
            f"{e['id']}  {cell(e['observed_at'])}  {e['system']}  {e['task_id']}  {e['kind']}  "
            f"{cell(e['data'], 100)}\n"
        )
    out.flush()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "track": cmd_track,
    "untrack": cmd_untrack,
    "discover": cmd_discover,
    "sync": cmd_sync,
    "enqueue": cmd_enqueue,
    "apply": cmd_apply,
    "run": cmd_run,
    "status": cmd_status,
    "show": cmd_show,
    "actions": cmd_actions,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "sandbox": cmd_sandbox,
    "demo": cmd_demo,
    "grants": cmd_grants,
    "healthcheck": cmd_healthcheck,
    "prune": cmd_prune,
    "events": cmd_events,
}
