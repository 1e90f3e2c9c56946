"""Issue 7, item 3: action throughput of `tasksync apply` against a bare client sending the PUTs.

    .venv/bin/python bench/bench_actions.py [--actions 5000] [--db postgresql]

N SecMaster comments on N distinct tasks are queued the documented way (a plain SQL INSERT into
`actions`), on tasks synced once before (so each action's baseline comes from the stored
snapshot, as in service). Then one `tasksync apply` process applies them all. The baseline is
the bare client sending the same UpdateTask PUTs, AK/SK-signed the same way, at the same
concurrency, on keep-alive connections; a second baseline opens a new connection per PUT, as
tasksync's write session does on purpose (force_close: a write never goes out on a pooled
connection the server may have closed). The sandbox counts what landed: every comment exactly
once is checked, not assumed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import (
    SandboxProcess,
    analyze,
    baseline,
    checked,
    database,
    execute_many,
    prepare,
    run_process,
    sandbox,
    save,
    scalar,
    sync_all,
    table,
    tasksync,
    write_config,
)

CONCURRENCY = 64


def queue_comments(url: str, tasks: list[str], tag: str) -> list[list[str]]:
    rows = [
        {
            "system": "secmaster",
            "task_id": t,
            "kind": "comment",
            "params": json.dumps({"comment": f"{tag}-{i}"}),
        }
        for i, t in enumerate(tasks)
    ]
    execute_many(
        url,
        "INSERT INTO actions (system, task_id, kind, params) VALUES (:system, :task_id, :kind, :params)",
        rows,
    )
    return [["secmaster", t, f"{tag}-{i}"] for i, t in enumerate(tasks)]


def run(
    sb: SandboxProcess,
    workdir: Path,
    *,
    n: int,
    dbs: tuple[str, ...] = ("postgresql",),
) -> dict[str, Any]:
    tasks = sb.ids["secmaster"][:n]
    n = len(tasks)
    pairs = [("secmaster", t) for t in tasks]
    out: dict[str, Any] = {"actions": n, "concurrency": CONCURRENCY, "databases": {}}
    for kind in dbs:
        with database(kind, "tasksync_bench_actions", workdir) as db:
            prepare(db, pairs)
            analyze(db)
            config = write_config(workdir, sb, db, CONCURRENCY)
            sync_all(config)  # snapshots exist, as for tasks in service
            # baselines first, on their own comments (the sandbox applies them too)
            b_keep = baseline(
                workdir,
                sb,
                "comment",
                [["secmaster", t, f"bare-{i}"] for i, t in enumerate(tasks)],
                CONCURRENCY,
            )
            b_close = baseline(
                workdir,
                sb,
                "comment",
                [["secmaster", t, f"bare-close-{i}"] for i, t in enumerate(tasks)],
                CONCURRENCY,
                force_close=True,
            )
            queue_comments(db.url, tasks, f"tasksync-{kind}")
            sb.call("reset")
            t = checked(run_process(tasksync(config, "apply")), "tasksync apply")
            landed = sb.call("stats")
            succeeded = int(
                scalar(db.url, "SELECT count(*) FROM actions WHERE status = 'succeeded'")
            )
            out["databases"][kind] = {
                "tasksync_s": t.seconds,
                "tasksync_cpu_s": t.cpu_seconds,
                "tasksync_rss_mb": t.max_rss_mb,
                "baseline_keepalive_s": b_keep.seconds,
                "baseline_keepalive_cpu_s": b_keep.cpu_seconds,
                "baseline_new_connection_s": b_close.seconds,
                "baseline_failures": b_keep.failures + b_close.failures,
                "tasksync_per_s": n / t.seconds,
                "baseline_keepalive_per_s": n / b_keep.seconds,
                "baseline_new_connection_per_s": n / b_close.seconds,
                "ratio": b_keep.seconds / t.seconds,
                "ratio_vs_new_connection": b_close.seconds / t.seconds,
                "succeeded": succeeded,
                "writes_landed": landed["writes"],
                "writes_applied_twice": landed["writes_applied_twice"],
                "summary": t.stdout.strip(),
            }
    return out


def report(result: dict[str, Any]) -> str:
    rows = [
        (
            kind,
            result["actions"],
            r["tasksync_per_s"],
            r["baseline_keepalive_per_s"],
            f"{r['ratio']:.2f}",
            r["baseline_new_connection_per_s"],
            f"{r['ratio_vs_new_connection']:.2f}",
            f"{r['succeeded']} / {r['writes_landed']} / {r['writes_applied_twice']}",
        )
        for kind, r in result["databases"].items()
    ]
    return table(
        (
            "database",
            "actions",
            "tasksync actions/s",
            "baseline PUTs/s (keep-alive)",
            "ratio",
            "baseline PUTs/s (new connection)",
            "ratio",
            "succeeded / landed / twice",
        ),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=5000)
    parser.add_argument("--db", action="append", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    with sandbox(args.actions) as (sb, workdir):
        result = run(sb, workdir, n=args.actions, dbs=tuple(args.db or ("postgresql",)))
    print(report(result))
    print(f"\nJSON: {save('actions', result)}")


if __name__ == "__main__":
    main()
