"""Run every benchmark of issue 17's goals against one sandbox process and summarise them.

    .venv/bin/python bench/run_all.py                 # full size
    .venv/bin/python bench/run_all.py --scale 0.1     # a quick run
    .venv/bin/python bench/run_all.py --publish       # also write bench/RESULTS.md

Prints each benchmark's table, then a summary against the goals (goal, target, figure, met or
**not met**, per database); writes bench/results/*.json and bench/results/summary.md. Every
figure is measured in this run: nothing is hard-coded except the goals themselves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import bench_actions
import bench_cli
import bench_growth
import bench_poll
import bench_scaleout
import orjson
from common import BENCH, RESULTS, machine, sandbox, save, scaled, table

# The goals of issue 17: the only figures written here.
GOALS = {
    "first": 0.85,  # sync --all, first cycle: baseline time / tasksync time
    "unchanged": 0.9,  # the same, unchanged cycle
    "cpu_factor": 1.3,  # CPU per polled task, tasksync / bare client
    "cli_s": 0.4,  # wall seconds of status, show, track, enqueue, actions
    "actions": 0.5,  # apply: bare client on new connections time / tasksync time
    "rss_mb": 250.0,  # peak RSS of sync --all at the largest size
    "linear": 1.5,  # µs per task: the largest size within this factor of the smallest
}

Row = tuple[str, str, str, str]


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def poll_rows(poll: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    n = poll["tasks"]
    for kind, phases in poll["databases"].items():
        first, unchanged = phases["first"], phases["unchanged"]
        for label, r, goal, extra_ok, extra in (
            (
                "first cycle",
                first,
                GOALS["first"],
                all(x == n for x in first["snapshots_per_rep"]),
                f"{first['snapshots_written']} snapshots",
            ),
            (
                "unchanged cycle",
                unchanged,
                GOALS["unchanged"],
                not any(unchanged["snapshots_per_rep"]) and not any(unchanged["events_per_rep"]),
                f"{unchanged['snapshots_written']} snapshots, {unchanged['events_written']} events",
            ),
        ):
            complete = r["polled"] == n and r["failed"] == 0
            rows.append(
                (
                    f"1. sync --all, {n:,} tasks, {label}, {kind}",
                    f"ratio ≥ {goal}"
                    + (", 0 snapshots, 0 events" if label == "unchanged cycle" else ""),
                    f"{r['ratio']:.2f} ({r['tasksync_s']:.1f} s vs {r['baseline_s']:.1f} s, "
                    f"median of {r['reps']}; cycle only {r['cycle_ratio']:.2f}); {extra}"
                    + ("" if complete else f"; polled {r['polled']}, {r['failed']} failed"),
                    verdict(r["ratio"] >= goal and extra_ok and complete),
                )
            )
        for label, r in (("first cycle", first), ("unchanged cycle", unchanged)):
            rows.append(
                (
                    f"2. CPU per polled task, {label}, {kind}",
                    f"≤ {GOALS['cpu_factor']}× the bare client's",
                    f"{r['cpu_factor']:.2f}× ({r['tasksync_cpu_us_per_task']:,.0f} vs "
                    f"{r['baseline_cpu_us_per_task']:,.0f} µs per task)",
                    verdict(r["cpu_factor"] <= GOALS["cpu_factor"]),
                )
            )
    return rows


def cli_rows(cli: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for kind in cli["databases"]:
        walls = bench_cli.goal_commands(cli, kind)
        rows.append(
            (
                f"3. {', '.join(walls)}: wall, {cli['tasks']} tasks, {kind}",
                f"≤ {GOALS['cli_s']} s each",
                ", ".join(f"{name} {s:.2f}" for name, s in walls.items())
                + f" s (median of {cli['runs']})",
                verdict(max(walls.values()) <= GOALS["cli_s"]),
            )
        )
    for kind, r in cli["databases"].items():
        for command, imp in r["imports"].items():
            top = ", ".join(f"{name} {us / 1000:.0f}" for name, us in imp["top"][:3])
            rows.append(
                (
                    f"3. imports of {command}, {kind}",
                    "nothing it does not use",
                    f"{imp['total_us'] / 1000:.0f} ms of imports ({top} ms); unused: "
                    + (", ".join(imp["unused"]) or "none"),
                    verdict(not imp["unused"]),
                )
            )
    return rows


def action_rows(actions: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for kind, r in actions["databases"].items():
        once = (
            "each applied once"
            if r["exactly_once"]
            else f"NOT exactly once: succeeded {r['succeeded']} (worst run), landed "
            f"{r['writes_landed_per_run']}, {r['writes_applied_twice']} applied twice"
        )
        rows.append(
            (
                f"4. apply, {actions['actions']:,} comments, {kind}",
                f"ratio ≥ {GOALS['actions']} vs new connections, each applied once",
                f"{r['ratio_vs_new_connection']:.2f} ({r['tasksync_per_s']:,.0f} vs "
                f"{r['baseline_new_connection_per_s']:,.0f}/s, median of {len(r['samples'])}; "
                f"vs keep-alive {r['ratio']:.2f}); {once}",
                verdict(r["ratio_vs_new_connection"] >= GOALS["actions"] and r["exactly_once"]),
            )
        )
    return rows


def growth_rows(growth: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    rows_g = growth["growth"]
    peak = max(max(r["first_rss_mb"], r["unchanged_rss_mb"]) for r in rows_g)
    small, large = rows_g[0], rows_g[-1]
    rows.append(
        (
            f"5. peak RSS of sync --all at {large['tasks']:,} tasks, {large['database']}",
            f"≤ {GOALS['rss_mb']:.0f} MB, nearly flat",
            f"{peak:.0f} MB at {large['tasks']:,}; {small['first_rss_mb']:.0f} MB at "
            f"{small['tasks']:,} (+{large['first_rss_mb'] - small['first_rss_mb']:.0f} MB "
            f"for {large['tasks'] / small['tasks']:.0f}× the tasks)",
            verdict(peak <= GOALS["rss_mb"]),
        )
    )
    for phase in ("first", "unchanged"):
        per_task = [r[f"{phase}_us_per_task"] for r in rows_g]
        # the smallest size is mostly fixed cost; linear means flat from the second size on
        judged = per_task[1:] or per_task
        rows.append(
            (
                f"5. {phase} cycle time linear in N, {large['database']}",
                f"flat µs per task (within {GOALS['linear']}×)",
                " / ".join(f"{r['tasks']:,}: {r[f'{phase}_us_per_task']:.0f} µs" for r in rows_g),
                verdict(max(judged) <= GOALS["linear"] * min(judged)),
            )
        )
    return rows


def kept_rows(results: dict[str, Any]) -> list[Row]:
    """Earlier goals this work must not break."""
    rows: list[Row] = []
    poll = results.get("poll")
    if poll:
        for kind, phases in poll["databases"].items():
            churn = phases["churn"]
            rows.append(
                (
                    f"kept: 10 % changed, {kind}",
                    "snapshots = tasks changed",
                    f"{churn['snapshots_written']} snapshots for {churn['expected_snapshots']} "
                    "changed",
                    verdict(churn["snapshots_written"] == churn["expected_snapshots"]),
                )
            )
    growth = results.get("growth")
    if growth:
        for r in growth["size"]:
            rows.append(
                (
                    f"kept: database size, {r['database']}",
                    "snapshots only on change",
                    f"{r['mb_per_10k_tasks']:.1f} MB per 10,000 tasks after {r['cycles']} cycles "
                    f"({r['snapshots']} snapshots for {r['expected_snapshots']} expected)",
                    verdict(r["snapshots"] == r["expected_snapshots"]),
                )
            )
    scale = results.get("scaleout")
    if scale:
        for r in scale["runs"]:
            rows.append(
                (
                    f"kept: {r['workers']} workers on one PostgreSQL",
                    "0 fetched twice, 0 applied twice",
                    f"{r['tasks_fetched_twice']} fetched twice, {r['actions_applied_twice']} applied "
                    f"twice; sync {r['sync_s']:.1f} s, apply {r['apply_s']:.1f} s",
                    verdict(
                        r["tasks_fetched_twice"] == 0
                        and r["actions_applied_twice"] == 0
                        and r["distinct_tasks_read"] == scale["tasks"]
                    ),
                )
            )
    return rows


def goal_rows(results: dict[str, Any]) -> list[Row]:
    """(goal, target, measured, met?) for every goal of the issue that this run measured."""
    rows: list[Row] = []
    if results.get("poll"):
        rows += poll_rows(results["poll"])
    if results.get("cli"):
        rows += cli_rows(results["cli"])
    if results.get("actions"):
        rows += action_rows(results["actions"])
    if results.get("growth"):
        rows += growth_rows(results["growth"])
    return rows + kept_rows(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N (0.1: quick)")
    parser.add_argument(
        "--reps", type=int, default=3, help="alternated pairs per measurement (poll, actions)"
    )
    parser.add_argument(
        "--only", action="append", choices=("poll", "cli", "growth", "scaleout", "actions")
    )
    parser.add_argument("--publish", action="store_true", help="write bench/RESULTS.md")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: render the summary of the last run (bench/results/all.json)",
    )
    parser.add_argument(
        "--size-db",
        action="append",
        choices=("postgresql", "sqlite"),
        help="databases for the size-after-churn part (default: postgresql; 10 cycles each)",
    )
    args = parser.parse_args()
    if args.report_only:
        saved = orjson.loads((RESULTS / "all.json").read_bytes())
        render(saved["results"], saved["machine"], saved["scale"], saved["seconds"], args.publish)
        return
    only = set(args.only or ("poll", "cli", "growth", "scaleout", "actions"))
    args.size_db = args.size_db or ["postgresql"]
    s = args.scale
    poll_n = scaled(18_000, s)
    sizes = [scaled(1_000, s), scaled(10_000, s), scaled(100_000, s)]
    churn_n = scaled(10_000, s)
    action_n = scaled(5_000, s)
    scale_actions = scaled(1_000, s)
    biggest = max(poll_n, *sizes, churn_n, 3 * action_n)

    started = time.perf_counter()
    results: dict[str, Any] = {}
    with sandbox(-(-biggest // 3)) as (sb, workdir):
        # Actions run last: every PUT adds a comment to a sandbox task, which would make those
        # tasks' documents larger for the parts that poll them afterwards.
        steps: list[tuple[str, Any, Any]] = [
            ("poll", lambda: bench_poll.run(sb, workdir, n=poll_n, reps=args.reps), bench_poll),
            ("cli", lambda: bench_cli.run(sb, workdir), bench_cli),
            (
                "growth",
                lambda: bench_growth.run(
                    sb, workdir, sizes=sizes, churn_tasks=churn_n, dbs=tuple(args.size_db)
                ),
                bench_growth,
            ),
            (
                "scaleout",
                lambda: bench_scaleout.run(
                    sb, workdir, n=poll_n, actions=scale_actions, workers=[2, 3]
                ),
                bench_scaleout,
            ),
            (
                "actions",
                lambda: bench_actions.run(sb, workdir, n=action_n, reps=args.reps),
                bench_actions,
            ),
        ]
        for name, step, module in steps:
            if name not in only:
                continue
            t0 = time.perf_counter()
            results[name] = step()
            results[name]["seconds"] = time.perf_counter() - t0
            save(name, results[name])
            text = module.report(results[name])
            print(f"\n== {name} ({results[name]['seconds']:.0f} s)\n{text}", flush=True)
    total = time.perf_counter() - started
    save("all", {"scale": s, "seconds": total, "results": results})
    render(results, machine(), s, total, args.publish)


def render(
    results: dict[str, Any], info: dict[str, Any], s: float, total: float, publish_it: bool
) -> None:
    modules: dict[str, Any] = {
        "poll": bench_poll,
        "cli": bench_cli,
        "actions": bench_actions,
        "scaleout": bench_scaleout,
        "growth": bench_growth,
    }
    sections = [f"### {name}\n\n{modules[name].report(r)}\n" for name, r in results.items()]
    summary = table(("goal", "target", "measured", "met"), goal_rows(results))
    head = (
        f"Machine: {info['cpus']} CPUs, Python {info['python']}, {info['platform']}; "
        f"run {info['date']}; scale {s:g}; all benchmarks took {total:.0f} s."
    )
    markdown = f"{head}\n\n{summary}\n\n" + "\n".join(sections)
    print(f"\n== summary\n{head}\n\n{summary}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.md").write_text(markdown)
    if publish_it:
        publish(markdown)


def publish(markdown: str) -> Path:
    path = BENCH / "RESULTS.md"
    intro = (
        "# Benchmark results\n\n"
        "Written by `.venv/bin/python bench/run_all.py --publish` (see bench/README.md for what "
        "each figure means and how it is measured). Ratios are baseline time / tasksync time in "
        "the same run, medians of alternated runs: 1.0 is parity with a bare aiohttp client. "
        "The machine is shared with other work, so single runs swing; CPU per task (user + "
        "system time of each process) is the steadier comparison. Why a goal is not met is "
        "said in the README's Performance section.\n\n"
    )
    path.write_text(intro + markdown)
    return path


if __name__ == "__main__":
    main()
