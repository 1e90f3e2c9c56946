"""Shared plumbing of the benchmarks: the sandbox process, databases, timed child processes,
tables and JSON results. Nothing here is measured itself."""

from __future__ import annotations

import asyncio
import compileall
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = sys.executable

# Measure tasksync as installed. `pip install .` writes the package's bytecode; the editable
# install of a checkout does not, and with PYTHONDONTWRITEBYTECODE set (as on these machines)
# every child process would compile the package's ~50 modules from source again (~40 ms of CPU per
# process, on both sides: the bare client imports the signer from it). So compile once here.
compileall.compile_dir(ROOT / "worker", quiet=1)
PG_ADMIN = os.environ.get(
    "TASKSYNC_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SYSTEMS = ("aicc", "secmaster", "koodrive")

Pair = tuple[str, str]


# -- the sandbox in its own process ---------------------------------------------------------------


class SandboxProcess:
    """`bench/sandbox_proc.py` as a child process, steered line by line."""

    def __init__(self, tasks_per_system: int, workdir: Path) -> None:
        self.config_path = workdir / "sandbox.toml"
        self.ids_path = workdir / "ids.json"
        self.proc = subprocess.Popen(
            [
                PYTHON,
                str(BENCH / "sandbox_proc.py"),
                "--tasks-per-system",
                str(tasks_per_system),
                "--config",
                str(self.config_path),
                "--ids",
                str(self.ids_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"sandbox did not start: {ready}")
        self.base_url = str(ready["base_url"])
        self.ids: dict[str, list[str]] = orjson.loads(self.ids_path.read_bytes())

    def _read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.proc.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError("the sandbox process ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, cmd: str, **params: Any) -> dict[str, Any]:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"cmd": cmd, **params}) + "\n")
        stdin.flush()
        return self._read()

    def pairs(self, limit: int | None = None) -> list[Pair]:
        """Every task, the systems interleaved (so any prefix is mixed)."""
        out: list[Pair] = []
        longest = max(len(v) for v in self.ids.values())
        for i in range(longest):
            for system in SYSTEMS:
                ids = self.ids[system]
                if i < len(ids):
                    out.append((system, ids[i]))
        return out[:limit] if limit is not None else out

    def cpu_seconds(self) -> float:
        """CPU time the sandbox process has used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            with suppress(RuntimeError, BrokenPipeError):
                self.call("quit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def sandbox(tasks_per_system: int) -> Iterator[tuple[SandboxProcess, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="tasksync-bench-"))
    sb = SandboxProcess(tasks_per_system, workdir)
    try:
        yield sb, workdir
    finally:
        sb.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- databases --------------------------------------------------------------------------------------


@dataclass
class Database:
    kind: str  # "sqlite" or "postgresql"
    url: str
    name: str
    path: Path | None = None

    def drop(self) -> None:
        if self.path is not None:
            for suffix in ("", "-wal", "-shm", ".worker-lock"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
        else:
            asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def new_database(kind: str, name: str, workdir: Path) -> Database:
    if kind == "sqlite":
        path = workdir / f"{name}.db"
        return Database(kind, f"sqlite:///{path}", name, path)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN.rsplit("/", 1)[0]
    return Database(kind, f"{base}/{name}", name)


def clone_database(template: Database, name: str, workdir: Path) -> Database:
    """A copy of `template` (schema, rows and PostgreSQL planner statistics): a fresh database
    in the same state without tracking the tasks again. Nothing may be connected to it."""
    if template.path is not None:
        import sqlite3

        path = workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        src, dst = sqlite3.connect(template.path), sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return Database(template.kind, f"sqlite:///{path}", name, path)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template.name}"'))
    base = PG_ADMIN.rsplit("/", 1)[0]
    return Database(template.kind, f"{base}/{name}", name)


@contextmanager
def database(kind: str, name: str, workdir: Path) -> Iterator[Database]:
    db = new_database(kind, name, workdir)
    try:
        yield db
    finally:
        db.drop()


def prepare(db: Database, pairs: Sequence[Pair]) -> None:
    """Migrate and track `pairs` (setup, not measured)."""
    from worker.store.migrate import upgrade

    upgrade(db.url)
    track(db.url, pairs)


def track(url: str, pairs: Sequence[Pair]) -> None:
    """Track `pairs` in a migrated database (setup, not measured)."""
    asyncio.run(_track(url, pairs))


async def _track(url: str, pairs: Sequence[Pair]) -> None:
    from worker.store import Store

    store = Store.open(url)
    try:
        for start in range(0, len(pairs), 5000):
            await store.track_many(list(pairs[start : start + 5000]))
    finally:
        await store.aclose()


async def _query(url: str, sql: str, params: Sequence[dict[str, Any]] | None = None) -> list[Any]:
    import sqlalchemy as sa

    from worker.store.engine import create_engine

    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            if params is not None:
                await conn.execute(sa.text(sql), list(params))
                return []
            result = await conn.execute(sa.text(sql))
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


def query(url: str, sql: str) -> list[Any]:
    return asyncio.run(_query(url, sql))


def execute_many(url: str, sql: str, params: Sequence[dict[str, Any]]) -> None:
    asyncio.run(_query(url, sql, params))


def scalar(url: str, sql: str) -> Any:
    return query(url, sql)[0][0]


def counts(url: str) -> dict[str, int]:
    return {
        "snapshots": int(scalar(url, "SELECT count(*) FROM task_snapshots")),
        "events": int(scalar(url, "SELECT count(*) FROM task_events")),
    }


def last_cycle_seconds(url: str, runs: int = 1) -> list[float]:
    """Durations of the newest `runs` sync cycles as recorded in sync_runs."""
    rows = query(
        url,
        "SELECT started_at, finished_at FROM sync_runs WHERE kind = 'sync' "
        f"ORDER BY id DESC LIMIT {int(runs)}",
    )
    out = []
    for started, finished in rows:
        if isinstance(started, str):
            started, finished = datetime.fromisoformat(started), datetime.fromisoformat(finished)
        out.append((finished - started).total_seconds())
    return out


def database_bytes(db: Database) -> int:
    """On-disk size: the PostgreSQL database, or the SQLite file after a WAL checkpoint."""
    if db.path is not None:
        import sqlite3

        conn = sqlite3.connect(db.path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return db.path.stat().st_size
    return int(scalar(db.url, "SELECT pg_database_size(current_database())"))


# -- configuration and timed child processes --------------------------------------------------------


def write_config(
    workdir: Path, sb: SandboxProcess, db: Database, concurrency: int, **worker: Any
) -> Path:
    path = workdir / f"tasksync-{db.name}.toml"
    lines = [
        sb.config_path.read_text(),
        "[database]",
        f"url = {json.dumps(db.url)}",
        "",
        "[worker]",
    ]
    lines.append(f"concurrency = {concurrency}")
    lines += [f"{k} = {json.dumps(v)}" for k, v in worker.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds the sandbox credentials inline
    return path


@dataclass
class Run:
    seconds: float  # wall time, process start to exit
    max_rss_mb: float  # the process's own peak RSS
    cpu_seconds: float  # the process's user + system time
    rc: int
    stdout: str
    stderr: str


def run_process(argv: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Run a child to completion; its wall time and its own peak RSS (wait4's rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            seconds,
            usage.ru_maxrss / 1024,
            usage.ru_utime + usage.ru_stime,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def start_process(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def wait_process(proc: subprocess.Popen[bytes], started: float) -> Run:
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stdout is not None and proc.stderr is not None
    return Run(
        seconds,
        usage.ru_maxrss / 1024,
        usage.ru_utime + usage.ru_stime,
        proc.returncode,
        proc.stdout.read().decode(errors="replace"),
        proc.stderr.read().decode(errors="replace"),
    )


def tasksync(config: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "worker", "--config", str(config), *args]


def checked(run: Run, what: str) -> Run:
    if run.rc != 0:
        raise RuntimeError(f"{what} exited {run.rc}:\n{run.stdout}\n{run.stderr}")
    return run


@dataclass
class SyncRun(Run):
    polled: int = 0
    changed: int = 0
    failed: int = 0


def sync_all(config: Path, *extra: str) -> SyncRun:
    """`tasksync sync --all` (stdout is not a terminal: no progress bar), its summary parsed."""
    run = checked(run_process(tasksync(config, "sync", "--all", *extra)), "tasksync sync --all")
    match = re.search(r"polled (\d+) task\(s\): (\d+) changed, (\d+) failed", run.stdout)
    if match is None:
        raise RuntimeError(f"unexpected sync output: {run.stdout!r}")
    polled, changed, failed = (int(g) for g in match.groups())
    return SyncRun(**vars(run), polled=polled, changed=changed, failed=failed)


def analyze(db: Database) -> None:
    """Planner statistics, as autovacuum keeps them on a database in service (a freshly
    bulk-tracked table has none, and the claim query's plan then scans the whole table)."""
    if db.kind == "postgresql":
        query(db.url, "ANALYZE")


@dataclass
class Baseline:
    seconds: float  # process wall time
    loop_seconds: float  # the request loop alone
    cpu_seconds: float
    ok: int
    failures: int


def baseline(
    workdir: Path,
    sb: SandboxProcess,
    mode: str,
    tasks: Sequence[Sequence[str]],
    concurrency: int,
    *,
    force_close: bool = False,
) -> Baseline:
    path = workdir / "baseline-tasks.json"
    path.write_bytes(orjson.dumps([list(t) for t in tasks]))
    argv = [
        PYTHON,
        str(BENCH / "baseline_client.py"),
        mode,
        "--config",
        str(sb.config_path),
        "--tasks",
        str(path),
        "--concurrency",
        str(concurrency),
    ]
    if force_close:
        argv.append("--force-close")
    run = checked(run_process(argv), "baseline client")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return Baseline(
        run.seconds, result["seconds"], run.cpu_seconds, result["ok"], result["failures"]
    )


# -- output -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, sep, *body])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_bytes(orjson.dumps({"machine": machine(), **data}, option=orjson.OPT_INDENT_2))
    return path


def median(values: Sequence[float]) -> float:
    """The median of repeated runs: one slow outlier (the shared machine) moves it little, and
    unlike the best of N it does not reward a lucky run."""
    return float(statistics.median(values))


def scaled(n: int, scale: float, minimum: int = 30) -> int:
    return max(minimum, round(n * scale))
