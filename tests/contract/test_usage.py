"""Contract: bad usage exits 2 with one line on stderr naming what is wrong, never a traceback.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.contract import (
    js,
    make_workspace,
    parallel,
    query,
    tasksync,
)
from tests.support.contract_sim import (
    CREATOR_ID,
)


def test_bad_usage_exits_2_with_one_line_naming_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "tasksync.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "u.db"}"\n')
    long = {"title": "t" * 129, "description": "d" * 20001, "attachment": "a" * 256}
    process = ["enqueue", "aicc", "ccqG0000014iXvGKONQO", "process"]
    cases: list[tuple[list[str], list[str]]] = [
        # (argv, words the one stderr line must contain — case-insensitive)
        (["enqueue", "nosuch", "t1", "comment", "--comment", "x"], ["nosuch"]),
        (["enqueue", "secmaster", "t1", "nosuch"], ["nosuch"]),
        (
            ["enqueue", "secmaster", "t1", "comment", "--comment", "x", "--nosuch", "1"],
            ["--nosuch"],
        ),
        (["enqueue", "secmaster", "t1", "comment"], ["comment"]),
        (["enqueue", "secmaster", "t1", "delete-comment"], ["comment"]),
        (["enqueue", "secmaster", "t1", "add-attachment"], ["attachment"]),
        ([*process, "--description", "d"], ["title"]),
        ([*process, "--title", "t"], ["description"]),
        ([*process, "--title", long["title"], "--description", "d"], ["title"]),
        ([*process, "--title", "t", "--description", long["description"]], ["description"]),
        (
            [*process, "--title", "t", "--description", "d", "--attachment", long["attachment"]],
            ["attachment"],
        ),
        (["enqueue", "koodrive", "1534087020903704704", "comment", "--comment", "x"], ["koodrive"]),
        (["track", "nosuch", "x"], ["nosuch"]),
        (["sync", "nosuch"], ["nosuch"]),
        (["sync", "--nosuch"], ["--nosuch"]),
        (["discover", "nosuch"], ["nosuch"]),
        (["show", "nosuch", "x"], ["nosuch"]),
        (["actions", "--status", "nosuch"], ["nosuch"]),
        (["nosuch"], ["nosuch"]),
        (["cancel", "abc"], ["abc"]),
    ]

    def check(argv: list[str], words: list[str]) -> str | None:
        r = tasksync("--config", str(config), *argv, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        problem = None
        if r.returncode != 2:
            problem = f"exit {r.returncode}"
        elif len(lines) != 1:
            problem = f"{len(lines)} stderr lines"
        elif not all(w.lower() in lines[0].lower() for w in words):
            problem = f"message does not name {words}"
        elif r.stdout.strip():
            problem = "printed on stdout"
        return None if problem is None else f"{argv[:5]}: {problem}: {r.stderr.strip()[:200]!r}"

    problems = [p for p in parallel([lambda a=a, w=w: check(a, w) for a, w in cases]) if p]
    assert not problems, "\n".join(problems)
    # nothing was queued by any refused enqueue
    if (tmp_path / "u.db").exists():
        assert (
            query(f"sqlite:///{tmp_path / 'u.db'}", "SELECT count(*) AS n FROM actions")[0]["n"]
            == 0
        )


def test_field_limits_are_inclusive_and_defaults_apply(tmp_path: Path) -> None:
    """≤128 / ≤20000 / ≤255 accept the limit itself; --type defaults to the literal `Iternal`;
    --creator-id defaults to the configured creator_id; enqueue prints the id alone."""
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ws = make_workspace(
        tmp_path,
        db,
        '[systems.aicc]\nbase_url = "https://aicc.example.com"\nclient_id = "c"\n'
        'client_secret = "s"\ncreator_id = "10gg00000148QvgpaLAm"\n',
    )
    first = ws.ok(
        "enqueue",
        "aicc",
        "ccqG0000014iXvGKONQO",
        "process",
        "--title",
        "t" * 128,
        "--description",
        "d" * 20000,
        "--attachment",
        "a" * 255,
    )
    assert first.stdout.strip().isdigit() and first.stdout == first.stdout.strip() + "\n"
    second = ws.ok(
        "enqueue",
        "aicc",
        "ccqG0000014iXvGKONQO",
        "process",
        "--title",
        "t2",
        "--description",
        "d2",
        "--type",
        "Other",
        "--creator-id",
        "10gg0000000000000001",
    )
    params = {r["id"]: js(r["params"]) for r in ws.q("SELECT id, params FROM actions ORDER BY id")}
    a, b = params[int(first.stdout)], params[int(second.stdout)]
    assert a["title"] == "t" * 128 and len(a["description"]) == 20000
    assert a["attachment"] == "a" * 255
    assert a["type"] == "Iternal"
    # the default creator id is either stored now or resolved at apply time; when stored it must
    # be the configured one
    assert a.get("creator_id", CREATOR_ID) == CREATOR_ID
    assert b["type"] == "Other" and b["creator_id"] == "10gg0000000000000001"


# `enqueue aicc ... process --type ''` is exit 2: processInfo.type is mandatory upstream
def test_empty_type_is_refused(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, f"sqlite:///{tmp_path / 'e.db'}", "")
    r = ws.run(
        "enqueue",
        "aicc",
        "ccqG0000014iXvGKONQO",
        "process",
        "--title",
        "t",
        "--description",
        "d",
        "--type",
        "",
    )
    assert r.returncode == 2, r.stdout
