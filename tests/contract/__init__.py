"""Black-box contract suite: the real `tasksync` command against docs/interface.md.

Every check runs `python -m worker ...` in a subprocess, against either our own independent
simulator (tests/support/contract_sim.py, written from docs/upstream.md only) or the in-process
sandbox, and reads the result back through the documented tables with plain SQL. Nothing here
imports the product except `worker.sandbox.Sandbox` (a simulator): the code is a black box.

A deviation from the contract is pinned as an `xfail(strict=True, reason="BUG: ...")` test: it
fails while the bug is there and turns the suite red (XPASS) the day it is fixed; the marker is
then removed and the test stays in test_regressions.py.
"""
