"""Several workers on one PostgreSQL: no task fetched twice, no comment applied twice.

    .venv/bin/python bench/bench_scaleout.py [--tasks 18000] [--actions 3000] [--workers 1,2,3]

For each worker count K: a fresh database with N due tasks and A queued SecMaster comments (on
distinct tasks), then K `tasksync sync` processes started together (plain `sync`: they split
the *due* tasks), then K `tasksync apply` processes together. The sandbox counts every detail
read and every write that landed: a task fetched twice or a comment applied twice is reported,
not assumed away. Wall time is from the first start to the last exit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import (
    SandboxProcess,
    analyze,
    checked,
    counts,
    database,
    execute_many,
    prepare,
    sandbox,
    save,
    scalar,
    start_process,
    table,
    tasksync,
    wait_process,
    write_config,
)

CONCURRENCY = 64


def together(config: Path, k: int, *args: str) -> tuple[float, list[float]]:
    started = time.perf_counter()
    procs = [start_process(tasksync(config, *args)) for _ in range(k)]
    runs = [checked(wait_process(p, started), f"tasksync {' '.join(args)}") for p in procs]
    return time.perf_counter() - started, [r.max_rss_mb for r in runs]


def run(
    sb: SandboxProcess, workdir: Path, *, n: int, actions: int, workers: list[int]
) -> dict[str, Any]:
    tasks = sb.pairs(n)
    n = len(tasks)
    comment_tasks = sb.ids["secmaster"][:actions]
    out: dict[str, Any] = {"tasks": n, "actions": len(comment_tasks), "runs": []}
    for k in workers:
        with database("postgresql", "tasksync_bench_scaleout", workdir) as db:
            prepare(db, tasks)
            analyze(db)
            execute_many(
                db.url,
                "INSERT INTO actions (system, task_id, kind, params) "
                "VALUES ('secmaster', :task_id, 'comment', :params)",
                [
                    {"task_id": t, "params": json.dumps({"comment": f"scale-{k}-{i}"})}
                    for i, t in enumerate(comment_tasks)
                ],
            )
            config = write_config(workdir, sb, db, CONCURRENCY)
            sb.call("reset")
            sync_s, sync_rss = together(config, k, "sync", "--quiet")
            reads = sb.call("stats")
            rows = counts(db.url)
            per_worker = [
                int(r)
                for r in (
                    scalar(db.url, "SELECT string_agg(polled::text, ',') FROM sync_runs") or ""
                ).split(",")
                if r
            ]
            sb.call("reset")
            apply_s, _ = together(config, k, "apply")
            writes = sb.call("stats")
            succeeded = int(
                scalar(db.url, "SELECT count(*) FROM actions WHERE status = 'succeeded'")
            )
            out["runs"].append(
                {
                    "workers": k,
                    "sync_s": sync_s,
                    "sync_tasks_per_s": n / sync_s,
                    "sync_peak_rss_mb": max(sync_rss),
                    "polled_per_worker": per_worker,
                    "detail_reads": reads["detail_reads"],
                    "distinct_tasks_read": reads["distinct_tasks_read"],
                    "tasks_fetched_twice": reads["tasks_read_twice"],
                    "snapshots": rows["snapshots"],
                    "apply_s": apply_s,
                    "actions_per_s": len(comment_tasks) / apply_s,
                    "actions_succeeded": succeeded,
                    "writes_landed": writes["writes"],
                    "actions_applied_twice": writes["writes_applied_twice"],
                }
            )
    return out


def report(result: dict[str, Any]) -> str:
    return table(
        (
            "workers",
            "sync wall s",
            "tasks/s",
            "polled per worker",
            "fetched twice",
            "snapshots",
            "apply wall s",
            "actions/s",
            "applied twice",
        ),
        [
            (
                r["workers"],
                r["sync_s"],
                r["sync_tasks_per_s"],
                " + ".join(str(p) for p in r["polled_per_worker"]),
                r["tasks_fetched_twice"],
                f"{r['snapshots']} / {result['tasks']}",
                r["apply_s"],
                r["actions_per_s"],
                r["actions_applied_twice"],
            )
            for r in result["runs"]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=18_000)
    parser.add_argument("--actions", type=int, default=3000)
    parser.add_argument("--workers", default="1,2,3")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with sandbox(-(-max(args.tasks, 3 * args.actions) // 3)) as (sb, workdir):
        result = run(sb, workdir, n=args.tasks, actions=args.actions, workers=workers)
    print(report(result))
    print(f"\nJSON: {save('scaleout', result)}")


if __name__ == "__main__":
    main()
