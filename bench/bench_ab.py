"""Two versions of tasksync side by side: `sync --all` of each on fresh copies, alternated.

    .venv/bin/python bench/bench_ab.py --rev main --rev . [--db sqlite] [--tasks 18000] [--pairs 5]

For measuring a change to tasksync itself (bench_poll.py measures tasksync against the bare
client). Each `--rev` is a git revision, checked out into a temporary worktree, or `.` for
this checkout's working tree with its uncommitted changes. Per revision a tracked database is
prepared once (migrated by that revision's own code); then each pair runs, for both revisions,
the first cycle on a fresh copy of its database and the unchanged cycle right after, the order
of the two revisions swapped from one pair to the next, so both see the same moments of a
shared machine. Reported per revision and cycle: the median wall time and CPU per task of the
whole process, every run's wall time, and the second revision's medians over the first's.

Each run imports its revision's `worker` through PYTHONPATH with `python -P`: without -P, a
process started in the checkout imports the checkout's `worker` whatever PYTHONPATH says (the
current directory comes first on sys.path), and both sides would be the same code.
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    ROOT,
    Database,
    SandboxProcess,
    analyze,
    checked,
    clone_database,
    median,
    new_database,
    run_process,
    sandbox,
    save,
    table,
    track,
    write_config,
)

CONCURRENCY = 64
CYCLES = ("first", "unchanged")


@contextmanager
def checkouts(revs: list[str], folder: Path) -> Iterator[list[Path]]:
    """A source tree per revision: this checkout for ".", else a detached git worktree."""
    made: list[Path] = []
    trees: list[Path] = []
    try:
        for i, rev in enumerate(revs):
            if rev == ".":
                trees.append(ROOT)
                continue
            tree = folder / f"rev{i}"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--quiet", "--detach", str(tree), rev],
                check=True,
            )
            made.append(tree)
            # The migrations ship as worker.migrations (pyproject.toml); in a source tree they
            # are the top-level migrations/, which the editable install maps for this checkout
            # only: without the link an older revision would migrate with this one's revisions.
            (tree / "worker" / "migrations").symlink_to(tree / "migrations")
            compileall.compile_dir(tree / "worker", quiet=1)  # as installed (common.py)
            trees.append(tree)
        yield trees
    finally:
        for tree in made:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )


def command(tree: Path, config: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return [PYTHON, "-P", "-m", "worker", "--config", str(config), *args], env


def prepare(tree: Path, sb: SandboxProcess, workdir: Path, kind: str, name: str) -> Database:
    """The tracked database of one revision, migrated by that revision's code."""
    db = new_database(kind, name, workdir)
    argv, env = command(tree, write_config(workdir, sb, db, CONCURRENCY), "migrate")
    checked(run_process(argv, env), f"migrate ({tree})")
    track(db.url, sb.pairs())
    analyze(db)
    return db


def cycle(tree: Path, config: Path) -> dict[str, float]:
    argv, env = command(tree, config, "sync", "--all")
    run = checked(run_process(argv, env), f"sync --all ({tree})")
    return {"wall_s": run.seconds, "cpu_s": run.cpu_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", action="append", required=True, help="git revision or '.'")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--tasks", type=int, default=18000, help="in all, a third per system")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    if len(args.rev) != 2:
        parser.error("give --rev exactly twice")
    runs: list[dict[str, list[dict[str, float]]]] = [{}, {}]  # per revision, per cycle
    with (
        tempfile.TemporaryDirectory(prefix="tasksync-ab-") as tmp,
        checkouts(args.rev, Path(tmp)) as trees,
        sandbox(args.tasks // 3) as (sb, workdir),
    ):
        templates = [prepare(t, sb, workdir, args.db, f"ab_rev{i}") for i, t in enumerate(trees)]
        try:
            for pair in range(args.pairs):
                for side in (0, 1) if pair % 2 == 0 else (1, 0):
                    db = clone_database(templates[side], f"ab_rev{side}_run", workdir)
                    try:
                        config = write_config(workdir, sb, db, CONCURRENCY)
                        for name in CYCLES:
                            runs[side].setdefault(name, []).append(cycle(trees[side], config))
                    finally:
                        db.drop()
        finally:
            for template in templates:
                template.drop()
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for name in CYCLES:
        medians = []
        for side in (0, 1):
            samples = runs[side][name]
            wall = median([s["wall_s"] for s in samples])
            cpu = median([s["cpu_s"] for s in samples]) / args.tasks * 1e6
            medians.append((wall, cpu))
            walls = ", ".join(f"{s['wall_s']:.2f}" for s in samples)
            rows.append([args.rev[side], name, len(samples), wall, cpu, walls])
            summary[f"{name}/{args.rev[side]}"] = {"wall_s": wall, "cpu_us_per_task": cpu}
        (wall_a, cpu_a), (wall_b, cpu_b) = medians
        rows.append(
            [f"{args.rev[1]} / {args.rev[0]}", name, "", wall_b / wall_a, cpu_b / cpu_a, ""]
        )
    print(
        table(
            ["revision", "cycle", "runs", "median wall s", "CPU µs/task", "each run's wall s"],
            rows,
        )
    )
    path = save(
        "ab",
        {
            "revs": args.rev,
            "db": args.db,
            "tasks": args.tasks,
            "runs": runs,
            **summary,
        },
    )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
