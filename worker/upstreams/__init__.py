"""Clients of the three upstream systems, each behind the `Upstream` protocol in `base`.

`build_upstreams(settings)` is the one entry point the sync loop and the action runner use.
The client modules (and the HTTP transport with them) are imported only when it is called, so commands
that never talk to an upstream do not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.model import System
    from worker.upstreams.base import Upstream


def build_upstreams(settings: Settings) -> dict[System, Upstream]:
    """One client per configured system. Nothing is opened yet: sessions start at first use.
    Close every client with `await client.aclose()` when done."""
    from worker.upstreams.aicc import AiccClient
    from worker.upstreams.koodrive import KooDriveClient
    from worker.upstreams.secmaster import SecMasterClient
    from worker.upstreams.transport import Slots

    systems = settings.systems
    # Each system can use every slot of the global concurrency, never more.
    limit = settings.worker.concurrency
    # ...and all of them together `concurrency` requests in flight: a request waiting for its
    # system's rate or circuit holds no slot, so a throttled system never starves the others.
    shared = Slots(limit)
    clients: dict[System, Upstream] = {}
    # [retry] also spaces the tries of a failed discovery page
    paging = settings.retry.base_delay
    if systems.aicc is not None:
        clients["aicc"] = AiccClient(
            systems.aicc, connector_limit=limit, in_flight=shared, page_delay=paging
        )
    if systems.secmaster is not None:
        clients["secmaster"] = SecMasterClient(
            systems.secmaster, connector_limit=limit, in_flight=shared, page_delay=paging
        )
    if systems.koodrive is not None:
        clients["koodrive"] = KooDriveClient(
            systems.koodrive, connector_limit=limit, in_flight=shared
        )
    return clients
