"""`tasksync grants`: the SQL that gives PostgreSQL roles read access, or read access plus the
right to queue actions, and nothing more.

The privileges are looked up in the database first (its schema, the role that owns the tables,
the sequence behind `actions.id`, which of our tables exist, the roles named) so the printed
SQL is plain GRANT statements an operator can read before piping it to `psql`. It is
idempotent and exact: each role's privileges on our objects are revoked and granted again in
one transaction, so re-running it (after `tasksync migrate`, or to turn a submitter into a
reader) leaves exactly what it prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.store.schema import VIEW_NAMES, metadata

# What a request needs; every other column (status, attempts, result, leases, requested_by, the
# timestamps) is left to its default and to the daemon.
SUBMIT_COLUMNS = ("system", "task_id", "kind", "params", "idempotency_key", "max_attempts")

# Every relation users query, plus alembic_version so a reader's `tasksync status`, `show` and
# `actions` can check the schema revision before they read.
READABLE = (*metadata.tables, *VIEW_NAMES, "alembic_version")

_RESERVED = ("public", "current_user", "current_role", "session_user", "none")


class GrantsError(Exception):
    """The grants cannot be printed as asked (a missing role, the owner named, no schema)."""


class GrantsUnsupported(Exception):
    """SQLite has no roles: file permissions are the control there."""


@dataclass(frozen=True, slots=True)
class GrantTarget:
    """What the SQL refers to, as found in the database."""

    schema: str
    owner: str  # the daemon's role: it owns the tables and runs the migrations
    relations: tuple[str, ...]  # the READABLE relations that exist, in READABLE order
    sequences: tuple[str, ...]  # the sequences behind our id columns
    actions_sequence: str
    has_cancel: bool  # tasksync_cancel(bigint), from revision 0002 on


def check_role_name(name: str) -> str:
    """A PostgreSQL role name as the command line gives it (quoted in the SQL, so any
    characters work). Raises ValueError with a one-line reason."""
    if not name or len(name.encode()) > 63 or "\x00" in name:
        raise ValueError(f"role name {name[:70]!r}: expected 1 to 63 bytes")
    if name.lower() in _RESERVED or name.lower().startswith("pg_"):
        raise ValueError(f"role name {name!r} is reserved; name a role you created")
    return name


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def find_target(conn: AsyncConnection, roles: Sequence[str]) -> GrantTarget:
    """Look up the schema tasksync lives in, checking that every named role exists and is
    neither the owner nor a superuser (a superuser ignores grants)."""
    found = (
        await conn.execute(
            sa.text(
                "SELECT current_schema(), t.tableowner, pg_get_serial_sequence("
                "quote_ident(current_schema()) || '.actions', 'id') "
                "FROM pg_tables t WHERE t.schemaname = current_schema() "
                "AND t.tablename = 'actions'"
            )
        )
    ).first()
    if found is None:
        raise GrantsError("the database has no tasksync tables yet: run `tasksync migrate` first")
    schema, owner, actions_sequence = str(found[0]), str(found[1]), str(found[2])
    existing = set(
        (
            await conn.execute(
                sa.text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'v', 'm', 'p')"
                )
            )
        )
        .scalars()
        .all()
    )
    with_id = [t for t in metadata.tables if t in existing and "id" in metadata.tables[t].c]
    sequences = (
        (
            await conn.execute(
                sa.text(
                    "SELECT s FROM (SELECT pg_get_serial_sequence(quote_ident(current_schema()) "
                    "|| '.' || quote_ident(t), 'id') AS s FROM unnest(CAST(:tables AS text[])) "
                    "AS t) q WHERE s IS NOT NULL ORDER BY s"
                ),
                {"tables": with_id},
            )
        )
        .scalars()
        .all()
    )
    has_cancel = await conn.scalar(
        sa.text(
            "SELECT to_regprocedure(quote_ident(current_schema()) "
            "|| '.tasksync_cancel(bigint)') IS NOT NULL"
        )
    )
    known: dict[str, bool] = dict(
        (
            await conn.execute(
                sa.text("SELECT rolname, rolsuper FROM pg_roles WHERE rolname = ANY(:names)"),
                {"names": list(roles)},
            )
        ).all()
    )
    for role in roles:
        if role not in known:
            raise GrantsError(f"role {role!r} does not exist: create it first (CREATE ROLE ...)")
        if role == owner:
            raise GrantsError(
                f"role {role!r} owns the tasksync tables (the daemon's role): it needs no grants"
            )
        if known[role]:
            raise GrantsError(f"role {role!r} is a superuser: grants cannot restrict it")
    return GrantTarget(
        schema=schema,
        owner=owner,
        relations=tuple(r for r in READABLE if r in existing),
        sequences=tuple(str(s) for s in sequences),
        actions_sequence=actions_sequence,
        has_cancel=bool(has_cancel),
    )


def grant_sql(target: GrantTarget, readers: Sequence[str], submitters: Sequence[str]) -> str:
    """The statements, in one transaction. A role named both ways gets the submitter's grants."""
    schema = quote_ident(target.schema)
    relations = ", ".join(f"{schema}.{r}" for r in target.relations)  # our own plain names
    sequences = ", ".join(target.sequences)  # pg_get_serial_sequence quotes what needs it
    columns = ", ".join(SUBMIT_COLUMNS)
    owner = quote_ident(target.owner)
    lines = [
        f"-- tasksync: grants on schema {target.schema}, owned by {target.owner} (the daemon's "
        "role, which alone migrates it)",
        "-- Idempotent and exact: each role's privileges on these objects are replaced.",
        "BEGIN;",
    ]
    submitting = list(dict.fromkeys(submitters))
    reading = [r for r in dict.fromkeys(readers) if r not in submitting]
    for role, submits in [(r, False) for r in reading] + [(r, True) for r in submitting]:
        who = quote_ident(role)
        what = (
            "submitter: a reader, plus INSERT of a request into actions"
            if submits
            else ("reader: SELECT on every table and view, nothing else")
        )
        cancel = f"{schema}.tasksync_cancel(bigint)" if target.has_cancel else None
        lines += [
            f"-- {what}",
            f"REVOKE ALL ON TABLE {relations} FROM {who};",
            *([f"REVOKE ALL ON SEQUENCE {sequences} FROM {who};"] if sequences else []),
            *([f"REVOKE ALL ON FUNCTION {cancel} FROM {who};"] if cancel else []),
            f"GRANT USAGE ON SCHEMA {schema} TO {who};",
            f"GRANT SELECT ON TABLE {relations} TO {who};",
            # tables and views a later revision creates (as the owner) are readable too
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
            f"REVOKE ALL ON TABLES FROM {who};",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
            f"GRANT SELECT ON TABLES TO {who};",
        ]
        if submits:
            lines += [
                f"GRANT INSERT ({columns}) ON TABLE {schema}.actions TO {who};",
                f"GRANT USAGE ON SEQUENCE {target.actions_sequence} TO {who};",
                # cancel its own pending actions, and nothing else (see the migration 0002)
                *([f"GRANT EXECUTE ON FUNCTION {cancel} TO {who};"] if cancel else []),
            ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def build_grants(url: str, readers: Sequence[str], submitters: Sequence[str]) -> str:
    """Connect to the database at `url`, look up the target, return the SQL. Runs its own
    event loop, so call it outside any running loop."""
    import asyncio

    from worker.store.engine import async_url, create_engine

    if async_url(url).get_backend_name() != "postgresql":
        raise GrantsUnsupported(
            "grants: SQLite has no database roles; who may read or queue is decided by the "
            "database file's permissions (see the README, Security)"
        )

    async def look() -> GrantTarget:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await find_target(conn, [*readers, *submitters])
        finally:
            await engine.dispose()

    return grant_sql(asyncio.run(look()), readers, submitters)
