"""Poll throughput and CPU per task of `tasksync sync --all` against a bare aiohttp client.

    .venv/bin/python bench/bench_poll.py [--tasks 18000] [--reps 3] [--db sqlite --db postgresql]

For each database (SQLite, PostgreSQL): N tracked tasks (mixed across the three systems; 18,000
is 6,000 per system), then

- first:     the first full cycle (every task new: N snapshots and their history written). A
             first cycle happens once per database, so each repetition runs on a fresh copy of
             the tracked database (made outside the timing: a PostgreSQL TEMPLATE copy, a
             SQLite backup), every one a real first cycle;
- unchanged: the same N again on the last of those databases, nothing changed upstream (must
             write 0 snapshots, 0 events), repeated on that one database;
- churn:     K = N/10 distinct tasks changed in the sandbox first (must write exactly K
             snapshots); once.

Runs alternate: baseline, tasksync, baseline, tasksync, ... (the bare client fetching the same
URLs with the same concurrency and credentials, parsing the JSON, storing nothing), so both see
the same machine. Both are whole processes timed from start to exit; `ratio` is the median
baseline time / the median tasksync time (1.0 = parity). `cycle ratio` compares the request
loop alone with the cycle as recorded in sync_runs (no start-up on either side). CPU per task is
user + system time of each whole process (median) divided by the tasks it polled; `CPU factor`
is tasksync's over the baseline's (1.0 = the same CPU per task).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import (
    Database,
    SandboxProcess,
    analyze,
    baseline,
    clone_database,
    counts,
    database,
    last_cycle_seconds,
    median,
    prepare,
    sandbox,
    save,
    sync_all,
    table,
    write_config,
)

CONCURRENCY = 64


def pair(
    workdir: Path, sb: SandboxProcess, config: Path, url: str, tasks: list[tuple[str, str]]
) -> dict[str, Any]:
    """One baseline run, then one tasksync cycle; rows written by the cycle."""
    b = baseline(workdir, sb, "fetch", tasks, CONCURRENCY)
    if b.failures:
        raise RuntimeError(f"baseline: {b.failures} failed requests")
    before = counts(url)
    t = sync_all(config)
    after = counts(url)
    [cycle] = last_cycle_seconds(url)
    return {
        "baseline_s": b.seconds,
        "baseline_loop_s": b.loop_seconds,
        "baseline_cpu_s": b.cpu_seconds,
        "baseline_requests": b.ok + b.failures,
        "tasksync_s": t.seconds,
        "tasksync_cycle_s": cycle,
        "tasksync_cpu_s": t.cpu_seconds,
        "tasksync_rss_mb": t.max_rss_mb,
        "polled": t.polled,
        "changed": t.changed,
        "failed": t.failed,
        "snapshots_written": after["snapshots"] - before["snapshots"],
        "events_written": after["events"] - before["events"],
    }


def summarize(n: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each side over the alternated repetitions."""
    b = median([s["baseline_s"] for s in samples])
    t = median([s["tasksync_s"] for s in samples])
    loop = median([s["baseline_loop_s"] for s in samples])
    cycle = median([s["tasksync_cycle_s"] for s in samples])
    # CPU seconds of each whole process per task it handled: steadier than wall time on a
    # shared machine (the PostgreSQL server's own CPU is not in it)
    t_cpu = median([s["tasksync_cpu_s"] / max(1, s["polled"]) for s in samples]) * 1e6
    b_cpu = median([s["baseline_cpu_s"] / max(1, s["baseline_requests"]) for s in samples]) * 1e6
    return {
        "tasks": n,
        "reps": len(samples),
        "baseline_s": b,
        "tasksync_s": t,
        "tasksync_per_s": n / t,
        "baseline_per_s": n / b,
        "ratio": b / t,
        "cycle_ratio": loop / cycle,
        "tasksync_cpu_us_per_task": t_cpu,
        "baseline_cpu_us_per_task": b_cpu,
        "cpu_factor": t_cpu / b_cpu,
        "tasksync_rss_mb": max(s["tasksync_rss_mb"] for s in samples),
        "polled": min(s["polled"] for s in samples),
        "snapshots_written": samples[-1]["snapshots_written"],
        "events_written": samples[-1]["events_written"],
        # every repetition is checked, not only the last
        "snapshots_per_rep": [s["snapshots_written"] for s in samples],
        "events_per_rep": [s["events_written"] for s in samples],
        "failed": max(s["failed"] for s in samples),
        "samples": samples,
    }


def first_cycles(
    sb: SandboxProcess,
    workdir: Path,
    template: Database,
    tasks: list[tuple[str, str]],
    reps: int,
) -> tuple[list[dict[str, Any]], Database, Path]:
    """`reps` alternated pairs, each tasksync run the first cycle of a fresh copy of `template`.
    Returns the samples and the last copy (kept: the unchanged cycle runs on it)."""
    samples: list[dict[str, Any]] = []
    db: Database | None = None
    config: Path | None = None
    try:
        for i in range(reps):
            if db is not None:
                db.drop()
            db = clone_database(template, f"{template.name}_first{i}", workdir)
            config = write_config(workdir, sb, db, CONCURRENCY)
            samples.append(pair(workdir, sb, config, db.url, tasks))
    except BaseException:
        if db is not None:
            db.drop()
        raise
    assert db is not None and config is not None
    return samples, db, config


def run(
    sb: SandboxProcess,
    workdir: Path,
    *,
    n: int,
    reps: int = 3,
    dbs: tuple[str, ...] = ("sqlite", "postgresql"),
) -> dict[str, Any]:
    tasks = sb.pairs(n)
    n = len(tasks)
    baseline(workdir, sb, "fetch", tasks, CONCURRENCY)  # warm the sandbox's render cache
    out: dict[str, Any] = {"tasks": n, "concurrency": CONCURRENCY, "reps": reps, "databases": {}}
    for kind in dbs:
        with database(kind, "tasksync_bench_poll", workdir) as template:
            prepare(template, tasks)
            analyze(template)
            samples, db, config = first_cycles(sb, workdir, template, tasks, reps)
            try:
                first = summarize(n, samples)
                first["expected_snapshots"] = n
                unchanged = summarize(
                    n, [pair(workdir, sb, config, db.url, tasks) for _ in range(reps)]
                )
                unchanged["expected_snapshots"] = 0
                changed = sb.call("mutate", count=max(1, n // 10), among=n)["changed"]
                churn = summarize(n, [pair(workdir, sb, config, db.url, tasks)])
                churn["expected_snapshots"] = len(changed)
            finally:
                db.drop()
            out["databases"][kind] = {"first": first, "unchanged": unchanged, "churn": churn}
    return out


def report(result: dict[str, Any]) -> str:
    rows = []
    for kind, phases in result["databases"].items():
        for phase, r in phases.items():
            rows.append(
                (
                    kind,
                    phase,
                    r["reps"],
                    r["tasks"],
                    f"{r['tasksync_s']:.2f} / {r['baseline_s']:.2f}",
                    f"{r['ratio']:.2f}",
                    f"{r['cycle_ratio']:.2f}",
                    f"{r['tasksync_cpu_us_per_task']:.0f} / {r['baseline_cpu_us_per_task']:.0f}",
                    f"{r['cpu_factor']:.2f}",
                    r["tasksync_rss_mb"],
                    f"{r['snapshots_written']} / {r['expected_snapshots']}",
                    r["events_written"],
                    r["failed"],
                )
            )
    return table(
        (
            "database",
            "cycle",
            "runs",
            "tasks",
            "median s (tasksync / baseline)",
            "ratio",
            "cycle ratio",
            "CPU µs/task (tasksync / baseline)",
            "CPU factor",
            "peak RSS MB",
            "snapshots (got / expected)",
            "events",
            "failed",
        ),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=18_000)
    parser.add_argument("--reps", type=int, default=3, help="alternated pairs per cycle kind")
    parser.add_argument("--db", action="append", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    with sandbox(-(-args.tasks // 3)) as (sb, workdir):
        result = run(
            sb,
            workdir,
            n=args.tasks,
            reps=args.reps,
            dbs=tuple(args.db or ("sqlite", "postgresql")),
        )
    print(report(result))
    print(f"\nJSON: {save('poll', result)}")


if __name__ == "__main__":
    main()
