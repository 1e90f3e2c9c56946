"""`Sandbox`: the simulators on a loopback port, as an async context manager; `serve()` for the CLI.

Everything runs on the caller's event loop: state changes are plain synchronous calls between
awaits, so tests may read and change `sb.state` freely without locks.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import orjson
from aiohttp import web

from worker.model import SYSTEMS, System
from worker.sandbox.app import RequestLog, Simulator
from worker.sandbox.auth import CREDENTIALS, Authenticator, Credentials, TokenStore
from worker.sandbox.faults import FaultInjector, FaultSpec
from worker.sandbox.gateway import Gateway, parse_throttle
from worker.sandbox.state import Effect, Origin, SandboxState

HOST = "127.0.0.1"  # loopback only: the sandbox's credentials are public


class Sandbox:
    """The three simulated APIs on one loopback port.

    ```
    async with Sandbox(seed=1, tasks_per_system=30, faults="500=0.1") as sb:
        sb.base_url, sb.config_toml(), sb.task_ids("aicc"), sb.effects, sb.requests.detail
    ```

    - seed: ids, payloads, fault draws and random mutations all derive from it.
    - faults: a FaultSpec or its string form; change it later with `set_faults`.
    - port: 0 picks a free one (`sb.port` once entered). Always bound to 127.0.0.1.
    - token_lifetime / iam_token_lifetime: seconds an AICC / IAM token lives.
    - mutate_every: change `mutate_count` random tasks every so many seconds ("by others").
    - cache_bytes: budget of rendered bodies kept (LRU); 0 renders on every request.
    - throttle: gateway policies per system, e.g. "aicc=40/1s,koodrive=600/1m" (429 APIGW.0308
      once a fixed window's limit is spent); change them later with `set_throttle`.
    - aksk_lockout: seconds an AK/SK stays locked after 5 failed signatures in a row
      (SecMaster locks for 300); None (default) never locks.
    """

    def __init__(
        self,
        *,
        seed: int = 1,
        tasks_per_system: int = 30,
        faults: FaultSpec | str | None = None,
        port: int = 0,
        credentials: Credentials = CREDENTIALS,
        token_lifetime: float = 7200.0,
        iam_token_lifetime: float = 86400.0,
        mutate_every: float | None = None,
        mutate_count: int = 1,
        cache_bytes: int = 256 * 1024 * 1024,
        aksk_lockout: float | None = None,
        throttle: str | None = None,
    ) -> None:
        if mutate_every is not None and mutate_every <= 0:
            raise ValueError("mutate_every must be a positive number of seconds")
        self.seed = seed
        self.credentials = credentials
        self.state = SandboxState(
            seed_value=seed,
            tasks_per_system=tasks_per_system,
            credentials=credentials,
            cache_bytes=cache_bytes,
        )
        self.faults = FaultInjector(_spec(faults), seed)
        self.aicc_tokens = TokenStore("0000000000", token_lifetime)
        self.iam_tokens = TokenStore("MII", iam_token_lifetime)
        self.auth = Authenticator(
            credentials, self.aicc_tokens, self.iam_tokens, aksk_lockout=aksk_lockout
        )
        self.requests = RequestLog()
        self.gateway = Gateway(parse_throttle(throttle or ""))
        self.simulator = Simulator(self.state, self.faults, self.auth, self.requests, self.gateway)
        self.mutate_every = mutate_every
        self.mutate_count = mutate_count
        self._requested_port = port
        self._port: int | None = None
        self._stack: AsyncExitStack | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        async with AsyncExitStack() as stack:
            # access_log=None: formatting a log line per request would cost more than the
            # request; a short shutdown timeout so a "slow" fault cannot hold up a test's exit.
            runner = web.AppRunner(self.simulator.app(), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, HOST, self._requested_port, backlog=1024)
            await site.start()
            self._port = int(runner.addresses[0][1])
            if self.mutate_every is not None:
                group = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(group.cancel_scope.cancel)  # runs first on exit: stop the loop
                group.start_soon(self._mutation_loop, self.mutate_every)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _mutation_loop(self, every: float) -> None:
        while True:
            await anyio.sleep(every)
            self.state.mutate_random(self.mutate_count)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the sandbox is not running (use `async with Sandbox(...)`)")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # --- faults and tokens ----------------------------------------------------------------

    def set_faults(self, spec: FaultSpec | str | None) -> None:
        """Change the faults from now on (None or "": none). Counters keep counting."""
        self.faults.spec = _spec(spec)

    def set_throttle(self, spec: str | None) -> None:
        """Gateway policies from now on, e.g. "aicc=40/1s,koodrive=600/1m" (None: none)."""
        self.gateway.policies = parse_throttle(spec or "")

    def expire_tokens(self) -> None:
        """Every AICC and IAM token issued so far stops working (early expiry)."""
        self.aicc_tokens.revoke_all()
        self.iam_tokens.revoke_all()

    # --- tasks ----------------------------------------------------------------------------

    def task_ids(self, system: System) -> list[str]:
        return self.state.task_ids(system)

    def add_task(self, system: System, task_id: str | None = None, status: Any = None) -> str:
        return self.state.add_task(system, task_id, status)

    def mutate(self, system: System, task_id: str, kind: str, **params: Any) -> Effect:
        return self.state.mutate(system, task_id, kind, **params)

    def mutate_random(self, count: int = 1) -> list[Effect]:
        return self.state.mutate_random(count)

    def payload(self, system: System, task_id: str) -> dict[str, Any]:
        """The task as a client stores it: AICC `result`, SecMaster `data`, KooDrive the body."""
        state = self.state
        if system == "aicc":
            aicc = state.aicc.get(task_id)
            if aicc is not None:
                result: dict[str, Any] = orjson.loads(state.aicc_body(aicc))["result"]
                return result
        elif system == "secmaster":
            task = state.secmaster.get(task_id)
            if task is not None:
                data: dict[str, Any] = orjson.loads(state.secmaster_data(task))
                return data
        else:
            koodrive = state.koodrive.get(task_id)
            if koodrive is not None:
                body: dict[str, Any] = orjson.loads(state.koodrive_body(koodrive))
                return body
        raise KeyError(f"{system} task {task_id} does not exist")

    @property
    def effects(self) -> list[Effect]:
        return self.state.effects

    def applied(
        self, system: System | None = None, task_id: str | None = None, origin: Origin = "api"
    ) -> list[Effect]:
        """Effects in order, filtered (by default the clients' own writes only)."""
        return [
            e
            for e in self.state.effects
            if e.origin == origin
            and (system is None or e.system == system)
            and (task_id is None or e.task_id == task_id)
        ]

    # --- configuration --------------------------------------------------------------------

    def config_toml(
        self,
        *,
        systems: Iterable[System] = SYSTEMS,
        secmaster_auth: Literal["aksk", "iam", "token"] = "aksk",
        koodrive_auth: Literal["token", "app"] = "token",
    ) -> str:
        """A tasksync configuration for this sandbox (systems only: no [database] section)."""
        c, url = self.credentials, self.base_url
        sections: dict[str, dict[str, str]] = {
            "aicc": {
                "base_url": url,
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "creator_id": c.creator_id,
            },
            "secmaster": {
                "base_url": url,
                "project_id": c.project_id,
                "workspace_id": c.workspace_id,
            }
            | {
                "aksk": {"ak": c.ak, "sk": c.sk},
                "iam": {
                    "iam_url": url,
                    "username": c.username,
                    "password": c.password,
                    "domain": c.domain,
                    "region": c.region,
                },
                "token": {"token": c.secmaster_token},
            }[secmaster_auth],
            "koodrive": {"base_url": url}
            | (
                {"token": c.koodrive_token}
                if koodrive_auth == "token"
                else {"app_id": c.app_id, "app_secret": c.app_secret, "user_id": c.koodrive_user_id}
            ),
        }
        lines = [
            f"# tasksync configuration for the sandbox at {url}",
            "# (generated; these are the sandbox's fixed, public credentials)",
        ]
        for system in systems:
            lines += ["", f"[systems.{system}]"]
            # JSON string literals are valid TOML basic strings for this ASCII content.
            lines += [f"{key} = {json.dumps(value)}" for key, value in sections[system].items()]
        return "\n".join(lines) + "\n"


def _spec(value: FaultSpec | str | None) -> FaultSpec:
    if value is None:
        return FaultSpec()
    return FaultSpec.parse(value) if isinstance(value, str) else value


def write_private(path: str, text: str) -> None:
    """Write atomically with mode 600: the file holds credentials, and a reader polling for it
    must never see half of it."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def serve(
    port: int = 0,
    faults: str | None = None,
    write_config: str | None = None,
    seed_tasks: int = 20,
    mutate_every: float | None = None,
    seed: int = 1,
    throttle: str | None = None,
) -> int:
    """Run the sandbox in the foreground until SIGTERM or SIGINT; the exit status.

    Once listening: the configuration goes to `write_config` (or stdout), then one line
    `sandbox listening on http://127.0.0.1:PORT` to stderr. Raises ValueError for a bad
    argument (a fault spec, a task count) before listening; returns 1 when it cannot listen.
    """
    sandbox = Sandbox(
        seed=seed,
        tasks_per_system=seed_tasks,
        faults=_spec(faults),
        port=port,
        mutate_every=mutate_every,
        throttle=throttle,
    )
    # The seeded tasks live as long as the process: keep the cyclic GC from walking them all
    # (85 ms per full collection at 100k tasks per system). This process is the sandbox's own.
    gc.freeze()
    try:
        anyio.run(_serve, sandbox, write_config)
    except ConfigWriteError as exc:
        print(
            f"tasksync sandbox: cannot write the configuration to {write_config}: {exc}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"tasksync sandbox: cannot serve on {HOST}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


class ConfigWriteError(Exception):
    """--write-config could not be written (the file, not the socket, is the problem)."""


async def _serve(sandbox: Sandbox, write_config: str | None) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with sandbox:
            if write_config:
                try:
                    write_private(write_config, sandbox.config_toml())
                except OSError as exc:
                    raise ConfigWriteError(exc.strerror or str(exc)) from None
            else:
                sys.stdout.write(sandbox.config_toml())
                sys.stdout.flush()
            print(f"sandbox listening on {sandbox.base_url}", file=sys.stderr, flush=True)
            async for _ in signals:
                break
