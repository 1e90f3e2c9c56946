"""Deterministic ids, times and texts for the simulated tasks, and the JSON template machinery.

A task keeps only a 64-bit derivation number `n` plus its small mutable state; everything static
(titles, people, dates, customer records) is derived from `n` when the payload is rendered. The
payloads are rendered by splicing pre-serialised JSON fragments into a pre-serialised template,
a few microseconds per task, so 100,000 tasks per system need neither much memory nor much CPU.
Field sets and sizes follow the examples in the vendors' documents (docs/sources.md).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson

# Payload times start here and spread over half a year (derived from each task's `n`).
BASE_EPOCH: Final = 1_735_689_600  # 2025-01-01T00:00:00Z
SPREAD_SECONDS: Final = 180 * 86400
VARIANTS: Final = 64  # texts and people repeat across tasks with this period

_ALNUM: Final = string.ascii_letters + string.digits
_MARKER: Final = re.compile(rb'"@@(\w+)@@"')


def j(value: object) -> bytes:
    """A value as a JSON fragment."""
    return orjson.dumps(value)


def dump(value: object) -> bytes:
    """JSON to keep: orjson hands back bytes with a 4 KiB buffer whatever their length, so
    anything stored (per task, 100k times) is copied to its exact size first."""
    return bytes(memoryview(orjson.dumps(value)))


def slot(name: str) -> str:
    """A placeholder in a template prototype, replaced by the fragment `values[name]`."""
    return f"@@{name}@@"


class Template:
    """A JSON document with holes: serialised once, then filled by byte splicing."""

    def __init__(self, prototype: object, *, sort_keys: bool = False) -> None:
        raw = orjson.dumps(prototype, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
        parts = _MARKER.split(raw)
        self._head = parts[0]
        self._holes = [
            (name.decode(), chunk) for name, chunk in zip(parts[1::2], parts[2::2], strict=True)
        ]

    def fill(self, values: Mapping[str, bytes]) -> Template:
        """A copy with the holes named in `values` filled in (the others stay open)."""
        head = self._head
        holes: list[tuple[str, bytes]] = []
        for name, chunk in self._holes:
            if name not in values:
                holes.append((name, chunk))
            elif holes:
                holes[-1] = (holes[-1][0], holes[-1][1] + values[name] + chunk)
            else:
                head += values[name] + chunk
        filled = Template.__new__(Template)
        filled._head, filled._holes = head, holes
        return filled

    def render(self, values: Mapping[str, bytes]) -> bytes:
        out = [self._head]
        for name, chunk in self._holes:
            out.append(values[name])
            out.append(chunk)
        return b"".join(out)


def pick(n: int, shift: int, options: Sequence[str]) -> str:
    return options[(n >> shift) % len(options)]


# --- ids ----------------------------------------------------------------------------------


def aicc_ids(seed: int, count: int) -> list[str]:
    """20-character ids in the style of `ccqG0000014iXvGKONQO`: prefix, counter, random tail."""
    rng = random.Random(f"aicc-ids:{seed}")
    return [f"ccqG{i:07d}" + "".join(rng.choices(_ALNUM, k=9)) for i in range(count)]


def secmaster_ids(seed: int, count: int) -> list[str]:
    """Version-1-looking UUIDs like `3e4c170e-7cc9-11f0-9216-fa163e209978`."""
    rng = random.Random(f"secmaster-ids:{seed}")
    return _unique(lambda: str(uuid.UUID(int=rng.getrandbits(128), version=1)), count)


def koodrive_ids(seed: int, count: int) -> list[str]:
    """19-digit decimal ids like `1534087020903704704`."""
    rng = random.Random(f"koodrive-ids:{seed}")
    return _unique(lambda: str(rng.randrange(10**18, 10**19)), count)


def _unique(make: Any, count: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        value = make()
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def random_alnum(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_ALNUM, k=length))


def derived_uuid(n: int, salt: int) -> str:
    """A stable uuid-shaped id for the `salt`-th sub-record of the task derived from `n`.

    Formatted by hand: uuid.UUID costs three times as much and this runs per render.
    """
    h = f"{(n * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9) % (1 << 128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def mix(v: int) -> int:
    """Spread a small variant number over 64 bits (splitmix64's finaliser)."""
    z = (v + 0x9E3779B97F4A7C15) % (1 << 64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % (1 << 64)
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % (1 << 64)
    return z ^ (z >> 31)


def tail(n: int, length: int) -> str:
    return "".join(_ALNUM[(n >> (6 * i)) % len(_ALNUM)] for i in range(length))


# --- times --------------------------------------------------------------------------------


def created_epoch(n: int) -> int:
    return BASE_EPOCH + n % SPREAD_SECONDS


def aicc_time(epoch: float) -> str:
    """AICC's zone-less `YYYY-MM-DD HH:mm:ss` (the sandbox's tenant zone is UTC)."""
    day, second = divmod(int(epoch), 86400)
    # %-formatting: measurably faster than an f-string with three format specs, and this is hot.
    return "%s %02d:%02d:%02d" % (_day(day), second // 3600, second // 60 % 60, second % 60)  # noqa: UP031


@functools.lru_cache(maxsize=4096)
def _day(day: int) -> str:
    # strftime costs ~3 µs; payloads render several dates, so the date part is memoised.
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


def parse_aicc_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def secmaster_time(epoch_ms: int) -> str:
    """SecMaster's odd `2025-08-19T14:53:42.424Z+0800` (a literal Z and an offset)."""
    local = epoch_ms + 8 * 3_600_000
    day, ms = divmod(local, 86_400_000)
    hour, ms = divmod(ms, 3_600_000)
    minute, ms = divmod(ms, 60_000)
    return f"{_day(day)}T{hour:02d}:{minute:02d}:{ms // 1000:02d}.{ms % 1000:03d}Z+0800"


# --- text corpora -------------------------------------------------------------------------

PEOPLE: Final = (
    ("10gg00000148QvgpaLAm", "liuhuqiong001"),
    ("10gg00000151WqRtZbNe", "zhangwei"),
    ("10gg00000163KpLmXcVd", "wangfang"),
    ("10gg00000172HtYuIoPa", "li.na"),
    ("10gg00000189BnMqWeRt", "chen.jie"),
)
CUSTOMERS: Final = ("客户1", "王先生", "李女士", "Acme Trading Co.", "张三", "Nordic Freight AB")
CITIES: Final = (("南京", "江苏"), ("深圳", "广东"), ("杭州", "浙江"), ("成都", "四川"))
ORGS: Final = ("公司", "华东分公司", "Acme Trading Co.", "深圳市某科技有限公司")
TITLES: Final = (
    "回访客户确认问题是否解决",
    "Follow up on delayed delivery",
    "核实用户账单异常",
    "Escalation: repeated login failures",
    "安排工程师上门检修",
    "Refund request needs approval",
)
DESCRIPTIONS: Final = (
    "客户反映宽带频繁掉线，已远程重启光猫，需要在24小时内回访确认问题是否解决，如未解决请派单上门。",
    "The customer reports that the parcel has been stuck at the regional hub for five days. "
    "Check with logistics, give the customer a new delivery estimate and record the answer.",
    "用户本月账单比上月高出三倍，疑似漫游计费错误。请核对详单并在工单中记录核查结果和处理意见。",
    "Three failed login attempts were followed by an account lock. Verify the caller's identity, "
    "unlock the account if appropriate, and advise on password hygiene.",
)
PRIORITIES: Final = ("Critical", "High", "Medium", "Low")
ORIGINS: Final = ("Voice", "Email", "Web", "Chat")

SECMASTER_NAMES: Final = (
    "审批剧本: 高危端口暴露自动封禁",
    "Approve playbook node: isolate compromised host",
    "流程发布审批: 告警自动通报",
    "Approve workflow publish: brute-force response",
)
SECMASTER_RELATED: Final = (
    "HSS告警处置",
    "WAF attack auto-block",
    "弱口令检测通报",
    "CFW IP block",
)
BUSINESS_TYPES: Final = (
    "PLAYBOOKNODEAPPROVE",
    "WORKFLOWNODEAPPROVE",
    "PLAYBOOKPUBLISH",
    "WORKFLOWPUBLISH",
)
SECMASTER_USERS: Final = (
    ("0b9d2c5e3a80d4f31f2bc0139b7a6e21", "secops-alice"),
    ("5f1e7d2c9b3a4e6f8a0b1c2d3e4f5a6b", "secops-bob"),
    ("c3a1e9f7d5b3a1c9e7f5d3b1a9c7e5f3", "soc-oncall"),
)
COMMENTS: Final = (
    "已确认为误报，建议放行。",
    "Checked the source IP against threat intel: known scanner, approve the block.",
    "需要业务方确认影响范围后再处理。",
    "Escalated to the network team; waiting for their go-ahead.",
)
