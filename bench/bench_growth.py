"""Memory and cost of growth: peak RSS of `sync --all` as N grows, µs per task, database size.

    .venv/bin/python bench/bench_growth.py [--sizes 1000,10000,100000] [--churn-tasks 10000]

- For each N: track N tasks, then time the first full cycle (`sync --all`, every snapshot new)
  and a second, unchanged one, each a whole `tasksync` process; peak RSS is the tasksync
  process's own (wait4's rusage), not the sandbox's. Linear growth shows as a flat µs per task.
- Database size: N tasks, a first cycle, then 10 cycles each after 10 % of the tasks changed
  upstream (snapshots are stored only on change): the size on disk, per 10,000 tasks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import (
    SandboxProcess,
    analyze,
    counts,
    database,
    database_bytes,
    last_cycle_seconds,
    prepare,
    sandbox,
    save,
    sync_all,
    table,
    write_config,
)

CONCURRENCY = 64


def growth(sb: SandboxProcess, workdir: Path, sizes: list[int], kind: str) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        tasks = sb.pairs(n)
        with database(kind, "tasksync_bench_growth", workdir) as db:
            prepare(db, tasks)
            analyze(db)
            config = write_config(workdir, sb, db, CONCURRENCY)
            first = sync_all(config)
            [first_cycle] = last_cycle_seconds(db.url)
            second = sync_all(config)
            [second_cycle] = last_cycle_seconds(db.url)
            out.append(
                {
                    "database": kind,
                    "tasks": len(tasks),
                    "first_s": first.seconds,
                    "first_cycle_s": first_cycle,
                    "first_rss_mb": first.max_rss_mb,
                    "unchanged_s": second.seconds,
                    "unchanged_cycle_s": second_cycle,
                    "unchanged_rss_mb": second.max_rss_mb,
                    "first_us_per_task": first_cycle / len(tasks) * 1e6,
                    "unchanged_us_per_task": second_cycle / len(tasks) * 1e6,
                    "failed": first.failed + second.failed,
                }
            )
    return out


def size_after_churn(
    sb: SandboxProcess, workdir: Path, n: int, kind: str, cycles: int = 10
) -> dict[str, Any]:
    tasks = sb.pairs(n)
    with database(kind, "tasksync_bench_size", workdir) as db:
        prepare(db, tasks)
        analyze(db)
        empty = database_bytes(db)
        config = write_config(workdir, sb, db, CONCURRENCY)
        sync_all(config)
        after_first = database_bytes(db)
        changed = 0
        for _ in range(cycles):
            changed += len(
                sb.call("mutate", count=max(1, len(tasks) // 10), among=len(tasks))["changed"]
            )
            sync_all(config)
        total = database_bytes(db)
        rows = counts(db.url)
    per = 10_000 / len(tasks)
    return {
        "database": kind,
        "tasks": len(tasks),
        "cycles": cycles,
        "changes": changed,
        "snapshots": rows["snapshots"],
        "expected_snapshots": len(tasks) + changed,
        "events": rows["events"],
        "bytes_tracked_only": empty,
        "bytes_after_first_cycle": after_first,
        "bytes_after_churn": total,
        "mb_per_10k_tasks": total * per / 1e6,
        "mb_per_10k_tasks_above_tracking": (total - empty) * per / 1e6,
    }


def run(
    sb: SandboxProcess,
    workdir: Path,
    *,
    sizes: list[int],
    churn_tasks: int,
    dbs: tuple[str, ...] = ("postgresql", "sqlite"),
    growth_dbs: tuple[str, ...] = ("postgresql",),
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for kind in growth_dbs:
        rows += growth(sb, workdir, sizes, kind)
    sizes_out = [size_after_churn(sb, workdir, churn_tasks, kind) for kind in dbs]
    return {"concurrency": CONCURRENCY, "growth": rows, "size": sizes_out}


def report(result: dict[str, Any]) -> str:
    growth_table = table(
        (
            "database",
            "tasks",
            "first cycle s",
            "µs/task",
            "peak RSS MB",
            "unchanged cycle s",
            "µs/task",
            "peak RSS MB",
        ),
        [
            (
                r["database"],
                r["tasks"],
                r["first_cycle_s"],
                r["first_us_per_task"],
                r["first_rss_mb"],
                r["unchanged_cycle_s"],
                r["unchanged_us_per_task"],
                r["unchanged_rss_mb"],
            )
            for r in result["growth"]
        ],
    )
    size_table = table(
        (
            "database",
            "tasks",
            "cycles",
            "changes",
            "snapshots (got / expected)",
            "events",
            "MB per 10k tasks",
        ),
        [
            (
                r["database"],
                r["tasks"],
                r["cycles"],
                r["changes"],
                f"{r['snapshots']} / {r['expected_snapshots']}",
                r["events"],
                r["mb_per_10k_tasks"],
            )
            for r in result["size"]
        ],
    )
    return growth_table + "\n\n" + size_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--churn-tasks", type=int, default=10_000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with sandbox(-(-max(*sizes, args.churn_tasks) // 3)) as (sb, workdir):
        result = run(sb, workdir, sizes=sizes, churn_tasks=args.churn_tasks)
    print(report(result))
    print(f"\nJSON: {save('growth', result)}")


if __name__ == "__main__":
    main()
