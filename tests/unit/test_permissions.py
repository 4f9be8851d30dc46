"""Permission matrix for nanomsg.permissions.evaluate, on Room/Rule records built by hand."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from nanomsg.models import Principal, Room, Rule
from nanomsg.permissions import Access, evaluate, is_valid_flags

OWNER = "11111111-1111-4111-8111-111111111111"  # the room's owner entity
OTHER = "22222222-2222-4222-8222-222222222222"  # some other entity
USER = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
STRANGER = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
LEVEL_ADMIN = 100
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

ROOM = Room(
    id=7,
    uuid="cccccccc-cccc-4ccc-8ccc-cccccccccccc",
    name="general",
    level_admin=LEVEL_ADMIN,
    type="group",
    entity_owner=OWNER,
    max_entity_rules=10,
    last_seq=0,
    created_at=T0,
    updated_at=T0,
)


def who(entity: str = OTHER, level: int = 10, user: str = USER) -> Principal:
    return Principal(user=user, entity=entity, level=level, exp=2_000_000_000, claims={})


def user_rule(perms: str, subject: str = USER, accepted: bool = True) -> Rule:
    return Rule(
        room_id=ROOM.id,
        subject=subject,
        kind="user",
        permissions=perms,
        level=0,
        accepted=accepted,
        created_at=T0,
        updated_at=T0,
    )


def entity_rule(perms: str, subject: str = OTHER, level: int = 0, accepted: bool = True) -> Rule:
    return Rule(
        room_id=ROOM.id,
        subject=subject,
        kind="entity",
        permissions=perms,
        level=level,
        accepted=accepted,
        created_at=T0,
        updated_at=T0,
    )


MATRIX = [
    # owner-entity admins
    pytest.param(who(OWNER, LEVEL_ADMIN), [], "rwa", id="owner-admin-at-level-admin-gets-rwa"),
    pytest.param(who(OWNER, 5000), [], "rwa", id="owner-admin-above-level-admin-gets-rwa"),
    pytest.param(
        who(OWNER, LEVEL_ADMIN), [user_rule("b")], "rwa", id="owner-admin-not-banned-by-user-rule"
    ),
    pytest.param(
        who(OWNER, LEVEL_ADMIN),
        [entity_rule("b", OWNER)],
        "rwa",
        id="owner-admin-not-banned-by-entity-rule",
    ),
    pytest.param(
        who(OWNER, LEVEL_ADMIN),
        [user_rule("rb"), entity_rule("wb", OWNER)],
        "rwa",
        id="owner-admin-not-banned-by-both-rules",
    ),
    # owner entity below level_admin: only what rules give
    pytest.param(who(OWNER, LEVEL_ADMIN - 1), [], "", id="owner-below-admin-no-rules-gets-nothing"),
    pytest.param(
        who(OWNER, LEVEL_ADMIN - 1), [user_rule("r")], "r", id="owner-below-admin-gets-rule-flags"
    ),
    pytest.param(
        who(OWNER, 50),
        [entity_rule("rw", OWNER, level=10)],
        "rw",
        id="owner-below-admin-gets-entity-rule-flags",
    ),
    pytest.param(
        who(OWNER, 50),
        [entity_rule("rw", OWNER), user_rule("b")],
        "",
        id="owner-below-admin-can-be-banned",
    ),
    # user rules
    pytest.param(who(), [user_rule("r")], "r", id="user-rule-r-read-only"),
    pytest.param(who(), [user_rule("w")], "w", id="user-rule-w-literal-write-without-read"),
    pytest.param(who(), [user_rule("rw")], "rw", id="user-rule-rw-read-write"),
    pytest.param(who(), [user_rule("a")], "rwa", id="user-rule-a-implies-r-and-w"),
    pytest.param(who(), [user_rule("")], "", id="user-rule-empty-flags-gives-nothing"),
    pytest.param(who(), [user_rule("rwa", STRANGER)], "", id="rule-for-another-user-ignored"),
    # entity rules
    pytest.param(
        who(OTHER, 10), [entity_rule("r", level=10)], "r", id="entity-rule-level-equal-admits"
    ),
    pytest.param(
        who(OTHER, 10), [entity_rule("rw", level=3)], "rw", id="entity-rule-level-below-admits"
    ),
    pytest.param(
        who(OTHER, 10), [entity_rule("rw", level=11)], "", id="entity-rule-level-above-refuses"
    ),
    pytest.param(who(OTHER, 10), [entity_rule("a")], "rwa", id="entity-rule-a-implies-r-and-w"),
    pytest.param(
        who(OTHER, 999), [entity_rule("rwa", OWNER)], "", id="entity-rule-for-other-entity-ignored"
    ),
    # pending rules
    pytest.param(who(), [user_rule("rwa", accepted=False)], "", id="pending-user-rule-no-grant"),
    pytest.param(
        who(), [entity_rule("rwa", accepted=False)], "", id="pending-entity-rule-no-grant"
    ),
    pytest.param(
        who(),
        [user_rule("b", accepted=False), entity_rule("rw")],
        "rw",
        id="pending-ban-does-not-ban",
    ),
    # bans
    pytest.param(who(), [user_rule("b"), entity_rule("rw")], "", id="user-ban-overrides-entity-rw"),
    pytest.param(who(), [user_rule("rwab")], "", id="ban-in-same-rule-as-grants-denies"),
    pytest.param(
        who(OTHER, 10), [entity_rule("b"), user_rule("rwa")], "", id="entity-ban-overrides-user-a"
    ),
    pytest.param(
        who(OTHER, 10),
        [entity_rule("b", level=11), user_rule("r")],
        "r",
        id="entity-ban-above-level-does-not-apply",
    ),
    pytest.param(
        who(), [user_rule("b", STRANGER), user_rule("r")], "r", id="ban-for-another-user-ignored"
    ),
    # unions
    pytest.param(who(), [user_rule("r"), entity_rule("w")], "rw", id="union-user-r-entity-w"),
    pytest.param(
        who(OTHER, 10),
        [entity_rule("r", level=0), entity_rule("w", level=5), entity_rule("a", level=50)],
        "rw",
        id="union-of-applicable-entity-rules-only",
    ),
]


@pytest.mark.parametrize(("principal", "rules", "expected"), MATRIX)
def test_permission_matrix(principal: Principal, rules: list[Rule], expected: str) -> None:
    access = evaluate(principal, ROOM, rules)
    assert access.flags == expected
    assert (access.read, access.write, access.admin) == (
        "r" in expected,
        "w" in expected,
        "a" in expected,
    )


def test_rules_may_be_any_iterable() -> None:
    access = evaluate(who(), ROOM, (r for r in [user_rule("r"), entity_rule("w")]))
    assert access.flags == "rw"


def test_reason_names_owner_entity_admin() -> None:
    assert evaluate(who(OWNER, LEVEL_ADMIN), ROOM, [user_rule("b")]).reason == "owner-entity admin"


def test_reason_names_ban() -> None:
    assert evaluate(who(), ROOM, [user_rule("rb")]).reason == "banned"


def test_reason_when_no_rule_admits() -> None:
    assert evaluate(who(), ROOM, []).reason == "no rule admits the caller"


def test_reason_lists_the_granted_flags() -> None:
    assert evaluate(who(), ROOM, [user_rule("w"), entity_rule("r")]).reason == "rules rw"


DELETED = replace(ROOM, deleted_at=T0)


@pytest.mark.parametrize(
    ("principal", "rules"),
    [
        pytest.param(who(OWNER, LEVEL_ADMIN), [], id="owner-admin"),
        pytest.param(who(), [user_rule("rwa")], id="user-rule-rwa"),
        pytest.param(who(OTHER, 10), [entity_rule("rwa")], id="entity-rule-rwa"),
    ],
)
@pytest.mark.parametrize(
    "room", [pytest.param(None, id="no-room"), pytest.param(DELETED, id="deleted")]
)
def test_missing_or_deleted_room_grants_nothing(
    room: Room | None, principal: Principal, rules: list[Rule]
) -> None:
    access = evaluate(principal, room, rules)
    assert access == Access(read=False, write=False, admin=False, reason="no such room")
    assert access.flags == ""


@pytest.mark.parametrize(
    ("read", "write", "admin", "flags"),
    [
        (False, False, False, ""),
        (True, False, False, "r"),
        (False, True, False, "w"),
        (False, False, True, "a"),
        (True, True, False, "rw"),
        (True, False, True, "ra"),
        (True, True, True, "rwa"),
    ],
)
def test_access_flags_string_is_r_w_a_in_order(
    read: bool, write: bool, admin: bool, flags: str
) -> None:
    assert Access(read=read, write=write, admin=admin, reason="x").flags == flags


@pytest.mark.parametrize("flags", ["", "r", "w", "b", "a", "rw", "rwba", "abwr", "wr"])
def test_valid_flags_accepted(flags: str) -> None:
    assert is_valid_flags(flags)


@pytest.mark.parametrize("flags", ["rwx", "rr", "R", "x", " r", "r,w", "rwbaa", "r\u0301"])
def test_invalid_flags_refused(flags: str) -> None:
    assert not is_valid_flags(flags)


def test_no_rank_in_the_owner_entity_reads_a_dm() -> None:
    dm = replace(ROOM, dm=True)
    top = who(OWNER, 1_000_000_000, user="99999999-9999-4999-8999-999999999999")
    assert evaluate(top, dm, []).flags == ""  # the same rank administers an ordinary room
    assert evaluate(top, ROOM, []).flags == "rwa"
    assert evaluate(who(OWNER, 1_000_000_000), dm, [user_rule("rw")]).flags == "rw"
