"""Bench-only sandbox launcher: the simulators in their own process, steered over stdin/stdout.

    python bench/sandbox_proc.py --tasks-per-system N --config FILE --ids FILE

Once listening it writes a tasksync configuration (systems only) to FILE, the task ids of every
system (JSON) to the ids file, and prints one JSON line `{"ready": true, "base_url": ...}`.
Then it reads one JSON command per line on stdin and answers one JSON line on stdout:

- `{"cmd": "mutate", "count": K, "among": N}`: change K *distinct* random tasks among the first
  N (in the interleaved order of bench/common.py's `pairs`: the tracked ones) as another user
  would; answers the changed tasks, so the benchmark knows exactly how many snapshots to expect.
- `{"cmd": "stats"}`: detail reads (total, distinct tasks, tasks read more than once), requests
  per route, refused credentials, and the clients' writes since the last reset (total and how
  many landed more than once, judged by (system, task, kind, params)).
- `{"cmd": "reset"}`: zero the counters above.
- `{"cmd": "throttle", "spec": "aicc=40/1s,..."}`: the gateway's limits from now on ("" for none);
  `stats` then also has the gateway's admitted and refused (429) requests per system.
- `{"cmd": "quit"}` (or end of stdin): stop.

The sandbox runs without faults (and without throttling until told). Kept in bench/: the product's sandbox needs no control API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections import Counter
from typing import Any

import orjson

from worker.model import SYSTEMS
from worker.sandbox import Sandbox
from worker.sandbox.server import write_private
from worker.sandbox.state import MUTATION_KINDS


def interleaved(sb: Sandbox) -> list[tuple[str, str]]:
    """Every task, the systems interleaved: the order of bench/common.py's `pairs`."""
    ids = {system: sb.task_ids(system) for system in SYSTEMS}
    longest = max(len(v) for v in ids.values())
    return [(s, ids[s][i]) for i in range(longest) for s in SYSTEMS if i < len(ids[s])]


def mutate_distinct(
    sb: Sandbox, count: int, rng: random.Random, among: int | None
) -> list[list[str]]:
    """Change `count` distinct tasks among the first `among` (the tracked ones); tasks that
    cannot change any more are skipped."""
    pool = interleaved(sb)[:among]
    rng.shuffle(pool)
    changed: list[list[str]] = []
    for system, task_id in pool:
        if len(changed) >= count:
            break
        kinds = list(MUTATION_KINDS[system])
        rng.shuffle(kinds)
        for kind in kinds:
            try:
                sb.mutate(system, task_id, kind)  # type: ignore[arg-type]
            except ValueError:
                continue
            changed.append([system, task_id])
            break
    return changed


def stats(sb: Sandbox, effects_from: int) -> dict[str, Any]:
    detail = sb.requests.detail
    writes = [e for e in sb.effects[effects_from:] if e.origin == "api"]
    # A write is judged by what the client sent (an added comment gets a new id each time).
    by_request = Counter(
        (e.system, e.task_id, e.kind, str(e.params.get("comment", e.params.get("title", ""))))
        for e in writes
    )
    return {
        "detail_reads": sum(detail.values()),
        "distinct_tasks_read": len(detail),
        "tasks_read_twice": sum(1 for n in detail.values() if n > 1),
        "routes": dict(sb.requests.routes),
        "auth_failures": dict(sb.requests.auth_failures),
        "writes": len(writes),
        "distinct_writes": len(by_request),
        "writes_applied_twice": sum(1 for n in by_request.values() if n > 1),
        "gateway_admitted": dict(sb.gateway.admitted),
        "gateway_refused": dict(sb.gateway.refused),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks-per-system", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    rng = random.Random(f"bench:{args.seed}")
    async with Sandbox(seed=args.seed, tasks_per_system=args.tasks_per_system) as sb:
        write_private(args.config, sb.config_toml())
        with open(args.ids, "wb") as fh:
            fh.write(orjson.dumps({s: sb.task_ids(s) for s in SYSTEMS}))
        effects_from = 0

        def reply(value: dict[str, Any]) -> None:
            sys.stdout.write(json.dumps(value) + "\n")
            sys.stdout.flush()

        reply({"ready": True, "base_url": sb.base_url})
        while line := await reader.readline():
            command = json.loads(line)
            name = command.get("cmd")
            if name == "mutate":
                among = command.get("among")
                changed = mutate_distinct(sb, int(command["count"]), rng, among)
                reply({"changed": changed})
            elif name == "stats":
                reply(stats(sb, effects_from))
            elif name == "throttle":
                sb.set_throttle(str(command.get("spec") or ""))
                reply({"ok": True})
            elif name == "reset":
                sb.gateway.admitted.clear()
                sb.gateway.refused.clear()
                sb.requests.detail.clear()
                sb.requests.routes.clear()
                sb.requests.auth_failures.clear()
                effects_from = len(sb.effects)
                reply({"ok": True})
            elif name == "quit":
                reply({"ok": True})
                break
            else:
                reply({"error": f"unknown command {name!r}"})


if __name__ == "__main__":
    asyncio.run(main())
