"""Action throughput of `tasksync apply` against a bare client sending the same signed PUTs.

    .venv/bin/python bench/bench_actions.py [--actions 5000] [--reps 3] [--db sqlite --db postgresql]

N SecMaster comments on N distinct tasks are queued the documented way (a plain SQL INSERT into
`actions`), on tasks synced once before (so each action's baseline comes from the stored
snapshot, as in service). Then one `tasksync apply` process applies them all. The goal's
baseline is the bare client sending the same UpdateTask PUTs, AK/SK-signed the same way, at the
same concurrency, with a new connection per PUT, as tasksync's write session does on purpose
(force_close: a write never goes out on a pooled connection the server may have closed);
`ratio` = baseline time / tasksync time, each the median of `reps` alternated runs (baseline,
apply, baseline, apply, ...; fresh comments each time). A keep-alive baseline runs once per
database, for reference. The sandbox counts what landed in each run: every comment applied
exactly once (N succeeded, N landed, 0 twice) is checked, not assumed.
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
    median,
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
    reps: int = 3,
    dbs: tuple[str, ...] = ("sqlite", "postgresql"),
) -> dict[str, Any]:
    tasks = sb.ids["secmaster"][:n]
    n = len(tasks)
    pairs = [("secmaster", t) for t in tasks]
    out: dict[str, Any] = {"actions": n, "concurrency": CONCURRENCY, "reps": reps, "databases": {}}
    for kind in dbs:
        with database(kind, "tasksync_bench_actions", workdir) as db:
            prepare(db, pairs)
            analyze(db)
            config = write_config(workdir, sb, db, CONCURRENCY)
            sync_all(config)  # snapshots exist, as for tasks in service
            # the keep-alive baseline once, for reference, on its own comments (the sandbox
            # applies them too)
            b_keep = baseline(
                workdir,
                sb,
                "comment",
                [["secmaster", t, f"bare-{kind}-{i}"] for i, t in enumerate(tasks)],
                CONCURRENCY,
            )
            samples: list[dict[str, Any]] = []
            for rep in range(reps):  # alternated: new-connection baseline, then apply
                b_close = baseline(
                    workdir,
                    sb,
                    "comment",
                    [["secmaster", t, f"bare-close-{kind}-{rep}-{i}"] for i, t in enumerate(tasks)],
                    CONCURRENCY,
                    force_close=True,
                )
                before = int(scalar(db.url, "SELECT coalesce(max(id), 0) FROM actions"))
                queue_comments(db.url, tasks, f"tasksync-{kind}-{rep}")
                sb.call("reset")
                t = checked(run_process(tasksync(config, "apply")), "tasksync apply")
                landed = sb.call("stats")
                succeeded = int(  # this run's actions only
                    scalar(
                        db.url,
                        "SELECT count(*) FROM actions "
                        f"WHERE status = 'succeeded' AND id > {before}",
                    )
                )
                samples.append(
                    {
                        "baseline_new_connection_s": b_close.seconds,
                        "baseline_new_connection_cpu_s": b_close.cpu_seconds,
                        "baseline_failures": b_close.failures,
                        "tasksync_s": t.seconds,
                        "tasksync_cpu_s": t.cpu_seconds,
                        "tasksync_rss_mb": t.max_rss_mb,
                        "succeeded": succeeded,
                        "writes_landed": landed["writes"],
                        "writes_applied_twice": landed["writes_applied_twice"],
                        "summary": t.stdout.strip(),
                    }
                )
            t_s = median([s["tasksync_s"] for s in samples])
            close_s = median([s["baseline_new_connection_s"] for s in samples])
            out["databases"][kind] = {
                "tasksync_s": t_s,
                "tasksync_cpu_s": median([s["tasksync_cpu_s"] for s in samples]),
                "tasksync_rss_mb": max(s["tasksync_rss_mb"] for s in samples),
                "baseline_keepalive_s": b_keep.seconds,
                "baseline_keepalive_cpu_s": b_keep.cpu_seconds,
                "baseline_new_connection_s": close_s,
                "baseline_new_connection_cpu_s": median(
                    [s["baseline_new_connection_cpu_s"] for s in samples]
                ),
                "baseline_failures": b_keep.failures + sum(s["baseline_failures"] for s in samples),
                "tasksync_per_s": n / t_s,
                "baseline_keepalive_per_s": n / b_keep.seconds,
                "baseline_new_connection_per_s": n / close_s,
                "ratio": b_keep.seconds / t_s,
                "ratio_vs_new_connection": close_s / t_s,
                # every run's own count: each must be n, n and 0
                "succeeded": min(s["succeeded"] for s in samples),
                "writes_landed_per_run": [s["writes_landed"] for s in samples],
                "writes_landed": min(s["writes_landed"] for s in samples),
                "writes_landed_max": max(s["writes_landed"] for s in samples),
                "writes_applied_twice": max(s["writes_applied_twice"] for s in samples),
                "exactly_once": all(
                    s["succeeded"] == n
                    and s["writes_landed"] == n
                    and not s["writes_applied_twice"]
                    for s in samples
                ),
                "samples": samples,
            }
    return out


def report(result: dict[str, Any]) -> str:
    rows = [
        (
            kind,
            result["actions"],
            len(r["samples"]),
            r["tasksync_per_s"],
            r["baseline_new_connection_per_s"],
            f"{r['ratio_vs_new_connection']:.2f}",
            r["baseline_keepalive_per_s"],
            f"{r['ratio']:.2f}",
            ", ".join(
                f"{x['succeeded']} / {x['writes_landed']} / {x['writes_applied_twice']}"
                for x in r["samples"]
            ),
        )
        for kind, r in result["databases"].items()
    ]
    return table(
        (
            "database",
            "actions",
            "runs",
            "tasksync actions/s",
            "baseline PUTs/s (new connection)",
            "ratio",
            "baseline PUTs/s (keep-alive, once)",
            "ratio",
            "each run: succeeded / landed / twice",
        ),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3, help="alternated baseline / apply runs")
    parser.add_argument("--db", action="append", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    with sandbox(args.actions) as (sb, workdir):
        result = run(
            sb,
            workdir,
            n=args.actions,
            reps=args.reps,
            dbs=tuple(args.db or ("sqlite", "postgresql")),
        )
    print(report(result))
    print(f"\nJSON: {save('actions', result)}")


if __name__ == "__main__":
    main()
