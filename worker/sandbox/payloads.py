"""The three systems' payloads, rendered from templates by splicing pre-serialised fragments.

A task's static content derives from its 64-bit number `n`: what repeats across tasks (texts,
people) comes from one of VARIANTS half-filled templates, what is unique (ids, dates) and what
changes (status, trace, comments) is spliced in per render, 10-20 µs per task. Field sets,
key order and sizes follow the vendors' examples (docs/sources.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final

from worker.sandbox.seed import (
    BUSINESS_TYPES,
    CITIES,
    COMMENTS,
    CUSTOMERS,
    DESCRIPTIONS,
    ORGS,
    ORIGINS,
    PEOPLE,
    PRIORITIES,
    SECMASTER_NAMES,
    SECMASTER_RELATED,
    SECMASTER_USERS,
    TITLES,
    VARIANTS,
    Template,
    aicc_time,
    created_epoch,
    derived_uuid,
    dump,
    j,
    mix,
    pick,
    secmaster_time,
    slot,
    tail,
)

# --- AICC ---------------------------------------------------------------------------------

_AICC_ADDRESS_NULLS: Final = (  # noqa: SIM905 (a word list)
    "addressLine1 addressLine2 addressLine3 addressLine4 addressLine5 "
    "addtionalAddress area block buildingNo country firstName label lastName "
    "middleName phoneNumber1 phoneNumber2 roomNo street title town zip"
).split()
_AICC_CUSTOMER_NULLS: Final = (  # noqa: SIM905 (a word list)
    "age birthDay cellPhone2 cellPhone3 channel customFied description email1 email2 "
    "fax firstName gender lastName level middleName name nickName phone phone1 "
    "phone2 phone3 picture remark status title website"
).split()
_AICC_ORG_NULLS: Final = (  # noqa: SIM905 (a word list)
    "email fax fixedPhone industry logo scale summary website"
).split()


def _aicc_prototype() -> dict[str, Any]:
    address: dict[str, Any] = dict.fromkeys(_AICC_ADDRESS_NULLS)
    address |= {
        "city": slot("city"),
        "province": slot("province"),
        "defaultBillingAddress": False,
        "defaultShippingAddress": False,
        "id": slot("address_id"),
        "subjectId": slot("contact_id"),
    }
    organization: dict[str, Any] = dict.fromkeys(_AICC_ORG_NULLS)
    organization |= {
        "description": slot("org_description"),
        "id": slot("org_id"),
        "organizationName": slot("org_name"),
    }
    customer: dict[str, Any] = dict.fromkeys(_AICC_CUSTOMER_NULLS)
    customer |= {
        "address": address,
        "bindAccount": [],
        "cellPhone1": slot("phone"),
        "createdDate": slot("customer_created"),
        "customerName": slot("customer_name"),
        "email": slot("email"),
        "id": slot("contact_id"),
        "lastModifiedDate": slot("customer_created"),
        "organization": organization,
        "organizationId": slot("org_id"),
    }
    case = {
        "attachment": "",
        "caseNo": slot("case_no"),
        "closedDate": None,
        "contactId": slot("contact_id"),
        "contactPhone": slot("phone"),
        "createdDate": slot("case_created"),
        "creatorId": slot("creator_id"),
        "description": slot("case_description"),
        "dueDate": slot("due_date"),
        "extternalNo": None,  # sic, as documented
        "id": slot("case_id"),
        "isUpgraded": False,
        "origin": slot("origin"),
        "ownerId": slot("owner_id"),
        "parentId": None,
        "priority": slot("priority"),
        "reason": None,
        "state": slot("case_state"),
        "status": "tttttt",
        "stayDate": None,
        "suspendAccumulatedTime": None,
        "suspendDate": None,
        "title": slot("case_title"),
        "type": "cvmC0000014ddysLTCZk",
    }
    task_info = {
        "attachment": "",
        "closedDate": slot("closed_date"),
        "contactId": slot("contact_id"),
        "createdDate": slot("created_date"),
        "creatorId": slot("creator_id"),
        "creatorName": slot("creator_name"),
        "description": slot("description"),
        "dueDate": slot("due_date"),
        "id": slot("task_id"),
        "ownerId": slot("owner_id"),
        "ownerName": slot("owner_name"),
        "priority": slot("priority"),
        "relateId": slot("case_id"),
        "status": slot("status"),
        "stayDate": None,
        "taskNo": slot("task_no"),
        "title": slot("title"),
        "type": "Case",
    }
    return {
        "resCode": "0",
        "resMsg": "成功",
        "result": {
            "caseInfos": [case],
            "customerInfo": {"customerInfo": customer},
            "taskInfo": task_info,
            "taskTrace": slot("trace"),
        },
    }


AICC_DETAIL: Final = Template(_aicc_prototype(), sort_keys=True)


def aicc_trace_entry(
    creator_id: str, creator_name: str, kind: str, title: str | None, description: str | None
) -> bytes:
    """One taskTrace entry (keys sorted like the documented example; entries have no id)."""
    return dump(
        {
            "creatorId": creator_id,
            "creatorName": creator_name,
            "description": description,
            "relatedId": None,
            "title": title,
            "type": kind,
        }
    )


def aicc_initial_trace(n: int, status: str) -> list[bytes]:
    """CreateTask by the creator; a task seeded past Pending also shows who moved it on."""
    variant = _aicc_variant(n % VARIANTS)
    trace = [variant.create_entry]
    if status != "Pending":
        trace.append(variant.accept_entry)
    return trace


class _AiccVariant:
    """What tasks of one variant share: picked texts and people, and the half-filled template."""

    def __init__(self, v: int) -> None:
        m = mix(v)
        self.owner_id, self.owner_name = PEOPLE[(m >> 8) % len(PEOPLE)]
        self.creator_id = PEOPLE[m % len(PEOPLE)][0]
        self.title = pick(m, 12, TITLES)
        self.priority = pick(m, 16, PRIORITIES)
        city, province = CITIES[(m >> 24) % len(CITIES)]
        org = pick(m, 48, ORGS)
        self.template = AICC_DETAIL.fill(
            {
                "title": j(self.title),
                "description": j(pick(m, 32, DESCRIPTIONS)),
                "priority": j(self.priority),
                "owner_id": j(self.owner_id),
                "owner_name": j(self.owner_name),
                "creator_id": j(self.creator_id),
                # the documented example repeats the creator's id as the creator's name
                "creator_name": j(self.creator_id),
                "case_title": j(pick(m, 36, TITLES)),
                "case_description": j(pick(m, 40, DESCRIPTIONS)),
                "origin": j(pick(m, 44, ORIGINS)),
                "customer_name": j(pick(m, 28, CUSTOMERS)),
                "city": j(city),
                "province": j(province),
                "org_name": j(org),
                "org_description": j(f"{org} — 重点客户，服务等级 SLA-{1 + m % 3}"),
            }
        )
        self.create_entry = aicc_trace_entry(
            self.creator_id, self.creator_id, "CreateTask", None, None
        )
        self.accept_entry = aicc_trace_entry(
            self.owner_id, self.owner_name, "StatusUpdate", "已受理", "客户问题已受理，正在处理中。"
        )


@functools.cache
def _aicc_variant(v: int) -> _AiccVariant:
    return _AiccVariant(v)


def aicc_summary(task_id: str, n: int, status: str) -> dict[str, Any]:
    """The fields shared by the detail and by one item of the task list."""
    variant = _aicc_variant(n % VARIANTS)
    created = created_epoch(n)
    return {
        "taskId": task_id,
        "taskNo": f"{n % 10**30:030d}",
        "title": variant.title,
        "status": status,
        "priority": variant.priority,
        "ownerId": variant.owner_id,
        "ownerName": variant.owner_name,
        "creatorId": variant.creator_id,
        "createdDate": aicc_time(created),
        "dueDate": aicc_time(created + _due_days(n) * 86400),
    }


def _due_days(n: int) -> int:
    return 1 + (n >> 20) % 14


def aicc_detail(
    task_id: str, n: int, status: str, trace: Sequence[bytes], closed: str | None
) -> bytes:
    """The full detail answer body (`resCode`, `resMsg`, `result`)."""
    created = created_epoch(n)
    values = {
        "task_id": j(task_id),
        "task_no": b'"%030d"' % (n % 10**30),
        "created_date": j(aicc_time(created)),
        "due_date": j(aicc_time(created + _due_days(n) * 86400)),
        "closed_date": j(closed),
        "status": j(status),
        "contact_id": b'"ciIy%016x"' % (n >> 1),
        "case_id": b'"c6m8%016x"' % (n >> 2),
        "case_no": b'"%030d"' % ((n >> 7) % 10**30),
        "case_created": j(aicc_time(created - 600)),
        "case_state": b'"Completed"' if status == "Completed" else b'"Processing"',
        "customer_created": j(aicc_time(created - 86400 * 30)),
        "phone": b'"150%08d"' % (n % 10**8),
        "email": b'"customer%d@example.com"' % (n % 100000),
        "address_id": b'"cw8O%016x"' % (n >> 3),
        "org_id": b'"cBbs%016x"' % (n >> 4),
        "trace": b"[" + b",".join(trace) + b"]",
    }
    return _aicc_variant(n % VARIANTS).template.render(values)


# --- SecMaster ----------------------------------------------------------------------------

SECMASTER_TASK: Final = Template(
    {
        "id": slot("id"),
        "aopengine_task_id": slot("id"),
        "name": slot("name"),
        "project_id": slot("project_id"),
        "description": slot("description"),
        "create_time": slot("create_time"),
        "creator_id": "",
        "creator_name": slot("creator_name"),
        "modifier_id": slot("modifier_id"),
        "modifier_name": slot("modifier_name"),
        "update_time": slot("update_time"),
        "approveuser_id": slot("approver_id"),
        "approveuser_name": slot("approver_name"),
        "approver": slot("approver_name"),
        "definition_key": slot("definition_key"),
        "notes": slot("notes"),
        "note": slot("notes"),
        "due_date": slot("due_date"),
        "action_id": slot("action_id"),
        "action_version_id": slot("action_version_id"),
        "action_instance_id": slot("action_instance_id"),
        "workspace_id": slot("workspace_id"),
        "view_parameters": slot("view_parameters"),
        "handle_parameters": "",
        "review_comments": "",
        "business_type": slot("business_type"),
        "related_object": slot("related_object"),
        "attachment_id_list": slot("attachments"),
        "comments": slot("comments"),
        "due_handle": slot("due_handle"),
        "status": slot("status"),
    }
)

Comment = tuple[str, str, str, str, int]  # id, message, user_id, user_name, time (epoch ms)


def secmaster_created_ms(n: int) -> int:
    return created_epoch(n) * 1000 + n % 1000


def secmaster_initial_comments(n: int) -> list[Comment]:
    created = secmaster_created_ms(n)
    out = []
    for k in range(n % 3):
        user_id, user_name = SECMASTER_USERS[(n >> (4 + k)) % len(SECMASTER_USERS)]
        message = COMMENTS[(n >> (8 + k)) % len(COMMENTS)]
        out.append(
            (derived_uuid(n, 100 + k), message, user_id, user_name, created + 60_000 * (k + 1))
        )
    return out


def secmaster_initial_attachments(n: int) -> list[str]:
    return [derived_uuid(n, 200 + k) for k in range((n >> 2) % 2)]


def secmaster_comment(comment: Comment) -> dict[str, Any]:
    cid, message, user_id, user_name, time_ms = comment
    return {
        "id": cid,
        "message": message,
        "user_id": user_id,
        "user_name": user_name,
        "time": time_ms,
    }


class _SecMasterVariant:
    def __init__(self, v: int, project_id: str, workspace_id: str) -> None:
        m = mix(v)
        approver_id, approver_name = SECMASTER_USERS[(m >> 16) % len(SECMASTER_USERS)]
        name = pick(m, 26, SECMASTER_NAMES)
        self.alert_name = pick(m, 22, SECMASTER_RELATED)
        self.severity = ("Low", "Medium", "High", "Fatal")[(m >> 20) % 4]
        self.business_type = pick(m, 12, BUSINESS_TYPES)
        self.template = SECMASTER_TASK.fill(
            {
                "name": j(name),
                "project_id": j(project_id),
                "description": j(
                    f"{name}。告警 {self.alert_name} (severity {self.severity}) "
                    "触发剧本节点，等待人工审批后继续执行。"
                ),
                "creator_name": j(approver_name),
                "approver_id": j(approver_id),
                "approver_name": j(approver_name),
                "definition_key": j(f"Activity_{tail(m >> 3, 7).lower()}"),
                "workspace_id": j(workspace_id),
                "business_type": j(self.business_type),
                "related_object": j(self.alert_name),
                "due_handle": j(pick(m, 30, ("CONTINUE", "INTERRUPT"))),
            }
        )


@functools.cache
def _secmaster_variant(v: int, project_id: str, workspace_id: str) -> _SecMasterVariant:
    return _SecMasterVariant(v, project_id, workspace_id)


def secmaster_business_type(n: int, project_id: str, workspace_id: str) -> str:
    return _secmaster_variant(n % VARIANTS, project_id, workspace_id).business_type


def secmaster_task(
    task_id: str,
    n: int,
    *,
    project_id: str,
    workspace_id: str,
    status: str,
    comments: Sequence[Comment],
    attachments: Sequence[str],
    updated_ms: int | None,
    modifier: tuple[str, str] | None,
) -> bytes:
    """One TaskInfo object (the `data` of ShowTask and UpdateTask, an item of ListTasks)."""
    variant = _secmaster_variant(n % VARIANTS, project_id, workspace_id)
    created = secmaster_created_ms(n)
    modifier_id, modifier_name = modifier or ("", "")
    view = (
        f'{{"alert_id":"{derived_uuid(n, 1)}","alert_name":"{variant.alert_name}",'
        f'"severity":"{variant.severity}","src_ip":"10.{(n >> 24) % 256}.{(n >> 32) % 256}.'
        f'{(n >> 40) % 256}","dest_port":{22 + (n >> 48) % 8000},'
        f'"asset":"ecs-prod-{n % 1000:03d}"}}'
    )
    values = {
        "id": j(task_id),
        "create_time": j(secmaster_time(created)),
        "modifier_id": j(modifier_id),
        "modifier_name": j(modifier_name),
        "update_time": j(secmaster_time(updated_ms if updated_ms is not None else created)),
        "notes": b'"%03d"' % (n % 1000),
        "due_date": j(secmaster_time(created + 15 * 86_400_000)),
        "action_id": j(derived_uuid(n, 2)),
        "action_version_id": j(derived_uuid(n, 3)),
        "action_instance_id": j(derived_uuid(n, 4)),
        "view_parameters": j(view),
        "attachments": j(list(attachments)),
        "comments": j([secmaster_comment(c) for c in comments]),
        "status": j(status),
    }
    return variant.template.render(values)


# --- KooDrive -----------------------------------------------------------------------------

KOODRIVE_NAMES: Final = (
    "lym0412normal",
    "archive-2024-q4",
    "offboard-user-data",
    "bulk-transfer-07",
)
KOODRIVE_FAILURES: Final = ("18000205", "18000101", "18000312")


def koodrive_task(
    task_id: str, n: int, *, tenant_id: str, user_id: str, status: int, result_code: str | None
) -> bytes:
    body: dict[str, Any] = {
        "taskId": task_id,
        "taskName": f"{pick(n, 4, KOODRIVE_NAMES)}-{n % 10000:04d}",
        "taskType": 0,
        "tenantId": tenant_id,
        "userId": user_id,
        "status": status,
    }
    if status == 3:
        body["resultCode"] = result_code or KOODRIVE_FAILURES[0]
    body["code"] = 0  # documented as a string, returned as a number
    body["msg"] = "Success."
    return dump(body)
