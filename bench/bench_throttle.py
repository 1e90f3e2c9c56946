"""Goodput against a throttling gateway, next to the same cycle unthrottled.

    .venv/bin/python bench/bench_throttle.py [--tasks 400] [--limit 40] [--reps 2]

Per run: N tasks per system (three systems), one `tasksync sync --all` on SQLite, with the
sandbox's gateway at LIMIT requests per second per system over fixed one-second windows (the
way Huawei's gateway counts), and no `rate_limit` configured. Reported:

- goodput ratio: tasks polled per second per system over the cycle, divided by LIMIT (what the
  gateway allows at most); goal ≥ 0.9;
- throttled share: 429s among every request the gateway saw (its own counters);
- the same cycle with `rate_limit` set just under the gateway (LIMIT - 2): the share must be 0;
- the same cycle with no gateway limit: what the rate control costs when nothing throttles.

The cycle time is the one tasksync recorded in sync_runs (no process start-up). Best of
`--reps`, since noise on a shared machine only ever adds time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import (
    SYSTEMS,
    SandboxProcess,
    database,
    last_cycle_seconds,
    prepare,
    sandbox,
    save,
    sync_all,
    table,
)

GOAL = 0.9


def one_run(
    sb: SandboxProcess, workdir: Path, n: int, spec: str, name: str, **system: Any
) -> dict[str, Any]:
    with database("sqlite", name, workdir) as db:
        prepare(db, sb.pairs())
        config = workdir / f"{name}.toml"
        body = sb.config_path.read_text()
        for key, value in system.items():
            for section in SYSTEMS:
                body = body.replace(
                    f"[systems.{section}]\n", f"[systems.{section}]\n{key} = {value}\n"
                )
        config.write_text(body + f'\n[database]\nurl = "{db.url}"\n\n[worker]\nconcurrency = 32\n')
        config.chmod(0o600)
        sb.call("throttle", spec=spec)
        sb.call("reset")
        run = sync_all(config)
        stats = sb.call("stats")
        [cycle] = last_cycle_seconds(db.url)
    refused = sum(stats["gateway_refused"].values())
    admitted = sum(stats["gateway_admitted"].values())
    return {
        "cycle_s": cycle,
        "wall_s": run.seconds,
        "polled": run.polled,
        "failed": run.failed,
        "refused": refused,
        "share_throttled": refused / max(1, refused + admitted),
        "per_system_per_s": run.polled / len(SYSTEMS) / cycle,
    }


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["cycle_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=400, help="tasks per system")
    parser.add_argument("--limit", type=int, default=40, help="gateway requests/s per system")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    n, limit = args.tasks, args.limit
    spec = ",".join(f"{s}={limit}/1s" for s in SYSTEMS)
    results: dict[str, list[dict[str, Any]]] = {"throttled": [], "rate_limit": [], "open": []}
    with sandbox(n) as (sb, workdir):
        for rep in range(args.reps):
            results["open"].append(one_run(sb, workdir, n, "", f"open{rep}"))
            results["throttled"].append(one_run(sb, workdir, n, spec, f"thr{rep}"))
            results["rate_limit"].append(
                one_run(sb, workdir, n, spec, f"rl{rep}", rate_limit=limit - 2)
            )
    picked = {k: best(v) for k, v in results.items()}
    throttled = picked["throttled"]
    goodput = throttled["per_system_per_s"] / limit
    rows = [
        (
            "gateway 40/s, no rate_limit",
            f"{throttled['cycle_s']:.2f}",
            f"{throttled['per_system_per_s']:.1f}",
            f"{goodput:.2f}",
            f"{throttled['share_throttled']:.1%}",
            throttled["failed"],
        ),
        (
            f"gateway {limit}/s, rate_limit {limit - 2}",
            f"{picked['rate_limit']['cycle_s']:.2f}",
            f"{picked['rate_limit']['per_system_per_s']:.1f}",
            f"{picked['rate_limit']['per_system_per_s'] / limit:.2f}",
            f"{picked['rate_limit']['share_throttled']:.1%}",
            picked["rate_limit"]["failed"],
        ),
        (
            "no gateway limit",
            f"{picked['open']['cycle_s']:.2f}",
            f"{picked['open']['per_system_per_s']:.1f}",
            "-",
            f"{picked['open']['share_throttled']:.1%}",
            picked["open"]["failed"],
        ),
    ]
    print(f"sync --all over {3 * n} tasks ({n} per system), SQLite, best of {args.reps}")
    print(
        table(
            ("run", "cycle s", "tasks/s per system", "goodput / limit", "429 share", "failed"),
            rows,
        )
    )
    print(f"goal: goodput ≥ {GOAL}: {'met' if goodput >= GOAL else 'NOT met'} ({goodput:.2f})")
    save(
        "throttle",
        {"tasks_per_system": n, "limit": limit, "goodput": goodput, "runs": results},
    )


if __name__ == "__main__":
    main()
