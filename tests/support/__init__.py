"""Test support, one of each: import from here, never from another test file.

- cli.py          running the real `tasksync` command, and the environment it gets
- db.py           the test databases (SQLite and PostgreSQL) and plain-SQL readers
- web.py          small upstreams written in a test (an aiohttp.web app on a loopback port)
- sandbox.py      driving tasksync in-process against the built-in sandbox
- contract.py     the black-box contract suite's workspace, SQL readers and threaded sandbox
- contract_sim.py the contract suite's own simulator of the three APIs (shares no product code)
- chaos.py        the fault-injection run of tests/test_chaos.py
"""
