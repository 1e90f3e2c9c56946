"""Local simulators of the three upstream APIs (AICC, SecMaster with IAM, KooDrive) on one
loopback port, with real authentication checks and first-class fault injection.

Used by `tasksync sandbox` (serve), `tasksync demo`, the tests and the benchmarks.
"""

from worker.sandbox.app import RequestLog
from worker.sandbox.auth import CREDENTIALS, Credentials
from worker.sandbox.faults import FAULTS, Fault, FaultInjector, FaultSpec
from worker.sandbox.server import Sandbox, serve
from worker.sandbox.state import MUTATION_KINDS, Effect

__all__ = [
    "CREDENTIALS",
    "FAULTS",
    "MUTATION_KINDS",
    "Credentials",
    "Effect",
    "Fault",
    "FaultInjector",
    "FaultSpec",
    "RequestLog",
    "Sandbox",
    "serve",
]
