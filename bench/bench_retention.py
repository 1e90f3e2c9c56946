"""Issue 13: what retention costs and what it saves.

    .venv/bin/python bench/bench_retention.py [--tasks 10000] [--cycles 10] [--rows 1000000]
        [--db postgresql --db sqlite]

- **Size.** N tasks, a first cycle, then C cycles after 10 % of the tasks changed upstream; once
  without retention, once with `tasksync prune --vacuum` after every cycle under
  `snapshots = "1s"` (only each task's newest snapshot survives: the floor any retention
  reaches once its age has passed) and `sync_runs = "1s"`. Events are kept in both. Reported
  per 10,000 tasks.
- **Prune speed.** M old rows (half snapshots of tasks nobody tracks, half events) inserted with
  one set-based statement each, then one `tasksync prune` process, whole process timed: seconds
  per million rows (the prune as `prune_runs` records it; the process time, start-up
  included, beside it). Baseline: the naive operator's two `DELETE ... WHERE` statements over the
  same rows (one transaction each), timed the same way after a re-insert.
- **Delay beside a cycle.** N tasks synced once; M old rows inserted. An unchanged `sync --all`
  alone (its cycle as recorded in `sync_runs`), then the same with a `tasksync prune` started
  half a second before it, then with the naive DELETE started half a second before it. The goal:
  the prune delays the cycle by no more than one batch's delete (prune time / batches). On 2
  shared cores part of any delay is CPU the two processes compete for, not waiting on locks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    PYTHON,
    SandboxProcess,
    analyze,
    checked,
    database,
    database_bytes,
    last_cycle_seconds,
    prepare,
    run_process,
    sandbox,
    save,
    scalar,
    start_process,
    sync_all,
    table,
    tasksync,
    wait_process,
    write_config,
)

from worker.store.retention import SQLITE_PAUSE

CONCURRENCY = 64
BATCH = 2000  # retention.batch_size, the default


def _with_retention(config: Path, retention: dict[str, str]) -> Path:
    path = config.with_name(config.stem + "-retention.toml")
    lines = [config.read_text(), "[retention]"]
    lines += [f'{k} = "{v}"' for k, v in retention.items()]
    lines.append(f"batch_size = {BATCH}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def size(sb: SandboxProcess, workdir: Path, n: int, cycles: int, kind: str) -> dict[str, Any]:
    tasks = sb.pairs(n)
    out: dict[str, Any] = {"database": kind, "tasks": len(tasks), "cycles": cycles}
    for label, retention in (("without", None), ("with", {"snapshots": "1s", "sync_runs": "1s"})):
        with database(kind, f"tasksync_bench_ret_{label}", workdir) as db:
            prepare(db, tasks)
            analyze(db)
            config = write_config(workdir, sb, db, CONCURRENCY)
            pruning = _with_retention(config, retention) if retention else None
            sync_all(config)
            prune_seconds = 0.0
            for _ in range(cycles):
                sb.call("mutate", count=max(1, len(tasks) // 10), among=len(tasks))
                sync_all(config)
                if pruning is not None:
                    time.sleep(1.1)  # past the 1 s age
                    run = checked(
                        run_process(tasksync(pruning, "prune", "--vacuum")), "tasksync prune"
                    )
                    prune_seconds += run.seconds
            out[f"mb_per_10k_{label}"] = database_bytes(db) * 10_000 / len(tasks) / 1e6
            out[f"snapshots_{label}"] = int(scalar(db.url, "SELECT count(*) FROM task_snapshots"))
            if pruning is not None:
                out["prune_process_s_per_cycle"] = prune_seconds / cycles
    return out


def _bulk(url: str, rows: int, kind: str) -> None:
    """The same set-based insert as tests/test_retention.py: old rows nobody tracks."""
    half = rows // 2
    if kind == "postgresql":
        series, when, payload = (
            f"generate_series(1, {half}) AS g(n)",
            "now() - interval '400 days'",
            "'{}'::jsonb",
        )
    else:
        series = (
            f"(WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {half}) "
            "SELECT n FROM c) AS g"
        )
        when, payload = "datetime('now', '-400 days')", "'{}'"
    from common import query

    query(
        url,
        "INSERT INTO task_snapshots (system, task_id, seq, fetched_at, content_hash, status, "
        f"state, payload) SELECT 'aicc', 'bulk-' || (n / 10), n, {when}, 'h', 'x', 'done', "
        f"{payload} FROM {series}",
    )
    query(
        url,
        "INSERT INTO task_events (system, task_id, kind, dedup_key, observed_at, data) "
        f"SELECT 'aicc', 'bulk-' || (n / 10), 'trace', 'k' || n, {when}, {payload} FROM {series}",
    )
    if kind == "postgresql":
        query(url, "ANALYZE")


NAIVE = (
    "import sys\n"
    f"sys.path.insert(0, {str(BENCH)!r})\n"
    "from common import query\n"
    "url = sys.argv[1]\n"
    "query(url, \"DELETE FROM task_snapshots WHERE fetched_at < CURRENT_TIMESTAMP - INTERVAL '30 days'\")\n"
    "query(url, \"DELETE FROM task_events WHERE observed_at < CURRENT_TIMESTAMP - INTERVAL '30 days'\")\n"
)
NAIVE_SQLITE = NAIVE.replace(
    "CURRENT_TIMESTAMP - INTERVAL '30 days'", "datetime('now', '-30 days')"
)


def _naive_argv(url: str, kind: str) -> list[str]:
    return [PYTHON, "-c", NAIVE if kind == "postgresql" else NAIVE_SQLITE, url]


def _last_prune_seconds(url: str) -> float:
    from datetime import datetime

    from common import query

    [(started, finished)] = query(
        url, "SELECT started_at, finished_at FROM prune_runs ORDER BY id DESC LIMIT 1"
    )
    if isinstance(started, str):
        started, finished = datetime.fromisoformat(started), datetime.fromisoformat(finished)
    return float((finished - started).total_seconds())


def prune_speed(sb: SandboxProcess, workdir: Path, n: int, rows: int, kind: str) -> dict[str, Any]:
    tasks = sb.pairs(n)
    with database(kind, "tasksync_bench_ret_speed", workdir) as db:
        prepare(db, tasks)
        config = write_config(workdir, sb, db, CONCURRENCY)
        pruning = _with_retention(config, {"snapshots": "30d", "events": "30d"})
        sync_all(config)  # the first cycle stores everything; the ones measured change nothing
        analyze(db)
        alone = float("inf")
        for _ in range(2):  # best of two: noise on a shared machine only adds time
            sync_all(config)
            alone = min(alone, last_cycle_seconds(db.url)[0])

        _bulk(db.url, rows, kind)
        prune = checked(run_process(tasksync(pruning, "prune")), "tasksync prune")
        in_db = _last_prune_seconds(db.url)  # the prune itself, without process start-up
        _bulk(db.url, rows, kind)
        naive = checked(run_process(_naive_argv(db.url, kind)), "naive DELETE")

        _bulk(db.url, rows, kind)
        started = time.perf_counter()
        proc = start_process(tasksync(pruning, "prune"))
        time.sleep(0.5)
        sync_all(config)
        beside_prune = last_cycle_seconds(db.url)[0]
        checked(wait_process(proc, started), "tasksync prune")

        _bulk(db.url, rows, kind)
        started = time.perf_counter()
        proc = start_process(_naive_argv(db.url, kind))
        time.sleep(0.5)
        sync_all(config)
        beside_naive = last_cycle_seconds(db.url)[0]
        checked(wait_process(proc, started), "naive DELETE")
    batches = -(-rows // BATCH)
    # one batch's delete: on SQLite without the pause the pruner leaves between two batches
    pauses = (batches - 1) * SQLITE_PAUSE if kind == "sqlite" else 0.0
    one_batch = (in_db - pauses) / batches
    return {
        "database": kind,
        "tasks": len(tasks),
        "rows": rows,
        "prune_s": prune.seconds,
        "prune_in_db_s": in_db,
        "prune_s_per_million": in_db * 1e6 / rows,
        "naive_s": naive.seconds,
        "ratio": naive.seconds / prune.seconds,
        "one_batch_s": one_batch,
        "cycle_alone_s": alone,
        "cycle_beside_prune_s": beside_prune,
        "cycle_beside_naive_s": beside_naive,
        "delay_prune_s": beside_prune - alone,
        "delay_naive_s": beside_naive - alone,
        "delay_within_one_batch": beside_prune - alone <= one_batch,
    }


def run(
    sb: SandboxProcess,
    workdir: Path,
    *,
    tasks: int,
    cycles: int,
    rows: int,
    dbs: tuple[str, ...] = ("postgresql", "sqlite"),
) -> dict[str, Any]:
    return {
        "size": [size(sb, workdir, tasks, cycles, kind) for kind in dbs],
        "speed": [prune_speed(sb, workdir, tasks, rows, kind) for kind in dbs],
    }


def report(result: dict[str, Any]) -> str:
    size_table = table(
        (
            "database",
            "tasks",
            "cycles",
            "MB/10k without",
            "MB/10k with",
            "snapshots without / with",
            "prune s/cycle",
        ),
        [
            (
                r["database"],
                r["tasks"],
                r["cycles"],
                r["mb_per_10k_without"],
                r["mb_per_10k_with"],
                f"{r['snapshots_without']} / {r['snapshots_with']}",
                r["prune_process_s_per_cycle"],
            )
            for r in result["size"]
        ],
    )
    speed_table = table(
        (
            "database",
            "rows",
            "prune process s",
            "prune s",
            "s per million",
            "naive DELETE s",
            "ratio",
            "one batch s",
            "cycle alone s",
            "beside prune s",
            "beside naive s",
            "delay ≤ one batch",
        ),
        [
            (
                r["database"],
                r["rows"],
                r["prune_s"],
                r["prune_in_db_s"],
                r["prune_s_per_million"],
                r["naive_s"],
                r["ratio"],
                r["one_batch_s"],
                r["cycle_alone_s"],
                r["cycle_beside_prune_s"],
                r["cycle_beside_naive_s"],
                "yes" if r["delay_within_one_batch"] else "**no**",
            )
            for r in result["speed"]
        ],
    )
    return size_table + "\n\n" + speed_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", action="append", choices=("postgresql", "sqlite"))
    args = parser.parse_args()
    dbs = tuple(args.db or ("postgresql", "sqlite"))
    with sandbox(-(-args.tasks // 3)) as (sb, workdir):
        result = run(sb, workdir, tasks=args.tasks, cycles=args.cycles, rows=args.rows, dbs=dbs)
    print(report(result))
    print(f"\nJSON: {save('retention', result)}")


if __name__ == "__main__":
    main()
