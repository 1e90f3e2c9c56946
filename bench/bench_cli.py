"""The command line as a user meets it: wall time of short commands, and what `sync` and
`apply` import.

    .venv/bin/python bench/bench_cli.py [--runs 5] [--import-runs 3] [--db sqlite --db postgresql]

Per database, a small one (12 tasks per system, synced once; made outside the timing):

- wall time, whole process from start to exit, of `status`, `show`, `track` (a task not yet
  tracked each time), `enqueue` (a SecMaster comment) and `actions`; for reference also
  `--help` (start-up and argument parsing only), `apply` (the comment just queued) and
  `sync --all`. The commands run round-robin `runs` times after one untimed warm-up round, so
  a noisy moment touches all of them alike; the median of each is reported.
- `python -X importtime` of `sync --all` and `apply` (stdout is a file, not a terminal, as
  under cron or systemd): the total import time (the cumulative µs of every top-level import,
  the interpreter's own start-up included), the costliest top-level imports, and which modules
  the command imported although it does not use them: Alembic (the schema is already current),
  `worker.sandbox`, `rich` (stdout is not a terminal), the PostgreSQL driver and dialect
  (`asyncpg`, `sqlalchemy.dialects.postgresql`) for a SQLite URL, `aiosqlite` for a PostgreSQL
  URL. Median of `import_runs` runs (each `apply` has one comment queued before it).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    SandboxProcess,
    analyze,
    checked,
    database,
    median,
    prepare,
    run_process,
    sandbox,
    save,
    sync_all,
    table,
    tasksync,
    write_config,
)

CONCURRENCY = 64
PER_SYSTEM = 12  # a small database: 36 tasks
TOP_IMPORTS = 6

# Modules a command must not import, by database kind (a module counts with its submodules).
UNUSED = ("alembic", "worker.sandbox", "rich")
UNUSED_BY_KIND = {
    "sqlite": ("asyncpg", "sqlalchemy.dialects.postgresql"),
    "postgresql": ("aiosqlite",),
}

# (name, has the wall-time goal, argv after `tasksync --config FILE`, given the run's index)
Command = tuple[str, bool, Callable[[int], list[str]]]

_IMPORT_LINE = re.compile(r"^import time:\s*(\d+) \|\s*(\d+) \| ( *)(\S+)\s*$")


def enqueue(sb: SandboxProcess, kind: str, i: int) -> list[str]:
    """A SecMaster comment on one of the tracked tasks, a new text each time."""
    task = sb.ids["secmaster"][i % PER_SYSTEM]
    return ["enqueue", "secmaster", task, "comment", "--comment", f"bench-cli-{kind}-{i}"]


def commands(sb: SandboxProcess, kind: str) -> list[Command]:
    shown = sb.ids["secmaster"][0]
    fresh = sb.ids["koodrive"][PER_SYSTEM:]  # tracked by `track`, one per run

    return [
        ("--help", False, lambda i: ["--help"]),
        ("status", True, lambda i: ["status"]),
        ("show", True, lambda i: ["show", "secmaster", shown]),
        ("track", True, lambda i: ["track", "koodrive", fresh[i]]),
        ("enqueue", True, lambda i: enqueue(sb, kind, i)),
        ("actions", True, lambda i: ["actions"]),
        ("apply", False, lambda i: ["apply"]),
        ("sync --all", False, lambda i: ["sync", "--all"]),
    ]


def parse_importtime(stderr: str) -> dict[str, int]:
    """Every imported module with its cumulative µs; top-level ones under their own name,
    the others prefixed with a space (so both the top-level list and the full set are here)."""
    out: dict[str, int] = {}
    for line in stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match is None:
            continue
        cumulative, indent, name = int(match.group(2)), match.group(3), match.group(4)
        out[name if not indent else " " + name] = cumulative
    return out


def imports(config: Path, argv: list[str], kind: str) -> dict[str, Any]:
    """One `python -X importtime` run of a command: total, top-level imports, unused ones."""
    run = checked(
        run_process([PYTHON, "-X", "importtime", "-m", "worker", "--config", str(config), *argv]),
        f"tasksync {' '.join(argv)}",
    )
    modules = parse_importtime(run.stderr)
    top = {name: us for name, us in modules.items() if not name.startswith(" ")}
    names = {name.strip() for name in modules}
    unused = [
        m
        for m in (*UNUSED, *UNUSED_BY_KIND[kind])
        if any(n == m or n.startswith(m + ".") for n in names)
    ]
    return {
        "seconds": run.seconds,
        "total_us": sum(top.values()),
        "modules": len(names),
        "top": sorted(top.items(), key=lambda kv: -kv[1])[:TOP_IMPORTS],
        "unused": unused,
    }


def median_imports(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median total (its top list), every run's unused modules."""
    ordered = sorted(samples, key=lambda s: s["total_us"])
    mid = ordered[(len(ordered) - 1) // 2]
    unused = sorted({m for s in samples for m in s["unused"]})
    return {
        "total_us": median([s["total_us"] for s in samples]),
        "totals_us": [s["total_us"] for s in samples],
        "modules": mid["modules"],
        "top": mid["top"],
        "unused": unused,
        "samples": samples,
    }


def one_database(
    sb: SandboxProcess, workdir: Path, kind: str, runs: int, import_runs: int
) -> dict[str, Any]:
    tasks = sb.pairs(3 * PER_SYSTEM)
    with database(kind, "tasksync_bench_cli", workdir) as db:
        prepare(db, tasks)
        analyze(db)
        config = write_config(workdir, sb, db, CONCURRENCY)
        sync_all(config)  # snapshots to show
        cmds = commands(sb, kind)
        walls: dict[str, list[float]] = {name: [] for name, _, _ in cmds}
        for i in range(runs + 1):  # round 0 warms caches, untimed
            for name, _, argv in cmds:
                run = checked(run_process(tasksync(config, *argv(i))), f"tasksync {name}")
                if i:
                    walls[name].append(run.seconds)
        queued = runs + 1
        sync_imports, apply_imports = [], []
        for _ in range(import_runs):
            sync_imports.append(imports(config, ["sync", "--all"], kind))
            checked(run_process(tasksync(config, *enqueue(sb, kind, queued))), "tasksync enqueue")
            queued += 1
            apply_imports.append(imports(config, ["apply"], kind))
    return {
        "commands": {
            name: {"goal": goal, "median_s": median(walls[name]), "samples_s": walls[name]}
            for name, goal, _ in cmds
        },
        "imports": {"sync": median_imports(sync_imports), "apply": median_imports(apply_imports)},
    }


def run(
    sb: SandboxProcess,
    workdir: Path,
    *,
    runs: int = 5,
    import_runs: int = 3,
    dbs: tuple[str, ...] = ("sqlite", "postgresql"),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tasks": 3 * PER_SYSTEM,
        "runs": runs,
        "import_runs": import_runs,
        "databases": {},
    }
    for kind in dbs:
        out["databases"][kind] = one_database(sb, workdir, kind, runs, import_runs)
    return out


def goal_commands(result: dict[str, Any], kind: str) -> dict[str, float]:
    """Median wall seconds of the commands that carry the wall-time goal."""
    return {
        name: r["median_s"]
        for name, r in result["databases"][kind]["commands"].items()
        if r["goal"]
    }


def report(result: dict[str, Any]) -> str:
    kinds = list(result["databases"])
    names = list(result["databases"][kinds[0]]["commands"]) if kinds else []
    wall_rows = []
    for name in names:
        row: list[Any] = [
            name
            + ("" if result["databases"][kinds[0]]["commands"][name]["goal"] else " (reference)")
        ]
        for kind in kinds:
            r = result["databases"][kind]["commands"][name]
            row.append(f"{r['median_s']:.2f} ({min(r['samples_s']):.2f}–{max(r['samples_s']):.2f})")
        wall_rows.append(row)
    walls = table(
        (
            f"command ({result['tasks']} tasks, median of {result['runs']})",
            *(f"{k} wall s (min–max)" for k in kinds),
        ),
        wall_rows,
    )
    import_rows = []
    for kind in kinds:
        for command, r in result["databases"][kind]["imports"].items():
            import_rows.append(
                (
                    kind,
                    command,
                    f"{r['total_us'] / 1000:.0f}",
                    r["modules"],
                    ", ".join(f"{name} {us / 1000:.0f}" for name, us in r["top"]),
                    ", ".join(r["unused"]) or "none",
                )
            )
    imported = table(
        (
            "database",
            "command",
            f"import ms (median of {result['import_runs']})",
            "modules",
            "costliest top-level imports (cumulative ms)",
            "imported, not used",
        ),
        import_rows,
    )
    return walls + "\n\n" + imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds of every command")
    parser.add_argument("--import-runs", type=int, default=3, help="-X importtime runs")
    parser.add_argument("--db", action="append", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    with sandbox(PER_SYSTEM + args.runs + 1) as (sb, workdir):
        result = run(
            sb,
            workdir,
            runs=args.runs,
            import_runs=args.import_runs,
            dbs=tuple(args.db or ("sqlite", "postgresql")),
        )
    print(report(result))
    print(f"\nJSON: {save('cli', result)}")


if __name__ == "__main__":
    main()
