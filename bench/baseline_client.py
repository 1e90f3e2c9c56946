"""The baseline: a bare aiohttp client, run as its own process like `tasksync` is.

    python bench/baseline_client.py fetch --config SANDBOX.toml --tasks TASKS.json --concurrency 64
    python bench/baseline_client.py comment --config SANDBOX.toml --tasks TASKS.json --concurrency 64

`fetch` GETs the detail of every (system, task_id) in TASKS.json and parses each answer with
orjson, storing nothing. `comment` sends SecMaster UpdateTask ADD_COMMENT PUTs. Requests carry
the credentials the sandbox demands, built exactly as tasksync builds them: an AICC token from
the token endpoint (once), SecMaster AK/SK signatures (worker.upstreams.signing, per request),
the KooDrive bearer token. One session, `concurrency` workers pulling from one queue: the least a
client can do. Prints one JSON line: requests, ok, failures, seconds (the request loop only).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tomllib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from worker.upstreams.signing import sign_sdk

AICC_TASK = "/service/AICC__Case/1.0.0/openapi/task/"
AICC_TOKEN = "/baas/auth/v1.0/oauth2/token"
KOODRIVE_TASK = "/koodrive/ose/v1/task/"


class Client:
    def __init__(self, config: dict[str, Any], session: aiohttp.ClientSession) -> None:
        self.systems = config["systems"]
        self.session = session
        self.aicc_token = ""
        sm = self.systems.get("secmaster")
        if sm is not None:
            self.sm_tasks = (
                f"{sm['base_url']}/v1/{quote(sm['project_id'], safe='')}/workspaces/"
                f"{quote(sm['workspace_id'], safe='')}/soc/tasks/"
            )

    async def login(self) -> None:
        aicc = self.systems.get("aicc")
        if aicc is None:
            return
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": aicc["client_id"],
                "client_secret": aicc["client_secret"],
            }
        )
        async with self.session.post(
            aicc["base_url"] + AICC_TOKEN,
            data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            self.aicc_token = orjson.loads(await response.read())["access_token"]

    def request(
        self, mode: str, system: str, task_id: str, text: str
    ) -> tuple[str, str, dict[str, str], bytes | None]:
        """(method, url, headers, body) of one request."""
        quoted = quote(task_id, safe="")
        if system == "aicc":
            url = self.systems["aicc"]["base_url"] + AICC_TASK + quoted
            return "GET", url, {"access-token": self.aicc_token}, None
        if system == "koodrive":
            kd = self.systems["koodrive"]
            headers = {"Authorization": f"Bearer {kd['token']}"}
            return "GET", kd["base_url"] + KOODRIVE_TASK + quoted, headers, None
        sm = self.systems["secmaster"]
        url = self.sm_tasks + quoted
        method, body = "GET", b""
        headers = {"Content-Type": "application/json", "X-Project-Id": sm["project_id"]}
        if mode == "comment":
            method, body = "PUT", orjson.dumps({"action": "ADD_COMMENT", "comment": text})
        return method, url, sign_sdk(method, url, headers, body, sm["ak"], sm["sk"]), body or None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.config, "rb") as fh:
        config = tomllib.load(fh)
    with open(args.tasks, "rb") as fh:
        tasks: list[list[str]] = orjson.loads(fh.read())
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=args.force_close)
    ok = failures = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(config, session)
        await client.login()
        work: Iterator[list[str]] = iter(tasks)

        async def worker() -> None:
            nonlocal ok, failures
            for task in work:
                system, task_id = task[0], task[1]
                text = task[2] if len(task) > 2 else ""
                method, url, headers, body = client.request(args.mode, system, task_id, text)
                async with session.request(method, url, headers=headers, data=body) as response:
                    data = orjson.loads(await response.read())
                    if response.status == 200 and isinstance(data, dict):
                        ok += 1
                    else:
                        failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - started
    return {"requests": len(tasks), "ok": ok, "failures": failures, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fetch", "comment"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--tasks", required=True, help="JSON list of [system, task_id(, text)]")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--force-close", action="store_true", help="a new connection per request")
    args = parser.parse_args()
    sys.stdout.write(orjson.dumps(asyncio.run(run(args))).decode() + "\n")


if __name__ == "__main__":
    main()
