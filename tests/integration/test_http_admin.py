"""Room administration and paging for partner backends, over a real server on both backends:
``GET /rooms/{id}/members``, ``PATCH /rooms/{id}``, paged ``GET /rooms/{id}/messages`` and
``entity_level`` on ``POST /rooms``. Each good case has its permission and bad-input cases
next to it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.integration.conftest import Server, User

pytestmark = pytest.mark.asyncio

CONNECTED = {"type": "status", "data": "CONNECTED"}
NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}
LIVE_DEADLINE = 1.0


async def select(server: Server, user: User, room_id: int) -> dict[str, Any]:
    client = await server.login(user)
    return await client.ask({"type": "select_room", "room_id": room_id})


async def room_with_reader(server: Server) -> tuple[User, User, User, int]:
    """(admin, reader, outsider, room): the reader holds an accepted ``r`` user rule."""
    admin, reader, outsider = server.user(), server.user(), server.user()
    room_id = await server.create_room(admin)
    await server.grant(admin, room_id, reader.user, "r")
    return admin, reader, outsider, room_id


# -- GET /rooms/{id}/members ---------------------------------------------------------------------


async def test_members_lists_every_rule_with_its_status_for_admins(server: Server) -> None:
    admin = server.user()
    partner, invitee = str(uuid.uuid4()), server.user()
    room_id = await server.create_room(admin)
    await server.grant(admin, room_id, partner, "r", kind="entity", level=30)
    await server.grant(admin, room_id, invitee.user, "rw", invite=True)

    code, body = await server.call("GET", f"/rooms/{room_id}/members", admin)

    assert code == 200, body
    assert body["meta"] == {"code": 200, "message": "OK", "has_more": False}
    got = sorted(
        (m["kind"], m["entity_UUID"], m["permissions"], m["level"], m["status"], m["accepted"])
        for m in body["content"]
    )
    assert got == sorted(
        [
            ("user", admin.user, "rwa", 100, "accepted", True),
            ("entity", admin.entity, "rw", 100, "accepted", True),
            ("entity", partner, "r", 30, "accepted", True),
            ("user", invitee.user, "rw", 0, "pending", False),
        ]
    )
    assert [m["kind"] for m in body["content"]] == ["entity", "entity", "user", "user"]
    assert all(m["room_id"] == room_id for m in body["content"])


async def test_members_pages_with_limit_and_offset_and_says_whether_more_follow(
    server: Server,
) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)
    for _ in range(3):
        await server.grant(admin, room_id, str(uuid.uuid4()), "r")  # 5 rules in all

    pages: list[list[str]] = []
    offset: int | None = 0
    while offset is not None and len(pages) < 5:
        code, body = await server.call(
            "GET", f"/rooms/{room_id}/members?limit=2&offset={offset}", admin
        )
        assert code == 200, body
        pages.append([m["entity_UUID"] for m in body["content"]])
        assert body["meta"]["has_more"] == ("next_offset" in body["meta"])
        offset = body["meta"].get("next_offset")

    assert [len(page) for page in pages] == [2, 2, 1]
    assert len({subject for page in pages for subject in page}) == 5
    code, body = await server.call("GET", f"/rooms/{room_id}/members?offset=5", admin)
    assert (code, body["content"], body["meta"]["has_more"]) == (200, [], False)


async def test_members_is_403_for_readers_and_404_for_outsiders_and_missing_rooms(
    server: Server,
) -> None:
    _, reader, outsider, room_id = await room_with_reader(server)

    code, body = await server.call("GET", f"/rooms/{room_id}/members", reader)
    assert (code, body["meta"]["reason"], body["content"]) == (403, "admin permission required", {})
    hidden = await server.call("GET", f"/rooms/{room_id}/members", outsider)
    missing = await server.call("GET", f"/rooms/{2**62}/members", outsider)
    assert hidden == missing
    assert hidden[0] == 404 and hidden[1]["meta"]["reason"] == "no such room"
    code, _ = await server.call("GET", f"/rooms/{room_id}/members", None)
    assert code == 401


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=501", "limit=x", "offset=-1", "offset=1.5", "limit=1&limit=2", "kind=user"],
)
async def test_members_refuses_bad_paging_with_400(server: Server, query: str) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)

    code, body = await server.call("GET", f"/rooms/{room_id}/members?{query}", admin)

    assert code == 400 and body["meta"]["reason"], body


# -- PATCH /rooms/{id} ---------------------------------------------------------------------------


async def test_patch_room_renames_and_changes_level_admin_and_rule_limit(server: Server) -> None:
    admin = server.user()
    room_id = await server.create_room(admin, name="before", max_entity_rules=10)
    code, before = await server.call("GET", f"/rooms/{room_id}", admin)

    changes = {"name": "after", "level_admin": 300, "max_entity_rules": 5}
    code, body = await server.call("PATCH", f"/rooms/{room_id}", admin, changes)

    assert code == 200, body
    room = body["content"]["room"]
    assert {key: room[key] for key in changes} == changes
    assert room["uuid"] == before["content"]["room"]["uuid"]
    assert room["updatedAt"] >= before["content"]["room"]["updatedAt"]
    code, again = await server.call("GET", f"/rooms/{room_id}", admin)
    assert again["content"]["room"] == room
    code, body = await server.call("PATCH", f"/rooms/{room_id}", admin, {"name": "only"})
    assert (code, body["content"]["room"]["level_admin"]) == (200, 300)


async def test_patch_level_admin_revokes_a_live_owner_member_who_no_longer_qualifies(
    server: Server,
) -> None:
    creator = server.user(level=100)
    member = server.user(entity=creator.entity, level=60)  # below the entity rule's 100
    room_id = await server.create_room(creator, level_admin=50)
    live = await server.login(member)
    assert await live.ask({"type": "select_room", "room_id": room_id}) == CONNECTED

    code, body = await server.call("PATCH", f"/rooms/{room_id}", creator, {"level_admin": 100})

    assert code == 200, body
    assert await live.recv(timeout=LIVE_DEADLINE) == {**NOTAUTHORIZED, "room_id": room_id}
    assert await select(server, member, room_id) == NOTAUTHORIZED
    code, body = await server.call("PATCH", f"/rooms/{room_id}", member, {"level_admin": 0})
    assert code == 404  # no longer an admin, and no rule lets it read the room


async def test_patch_max_entity_rules_below_the_rules_held_is_409_and_changes_nothing(
    server: Server,
) -> None:
    admin = server.user()
    room_id = await server.create_room(admin, max_entity_rules=10)
    await server.grant(admin, room_id, str(uuid.uuid4()), "r")  # 3 rules with the creator's

    code, body = await server.call(
        "PATCH", f"/rooms/{room_id}", admin, {"name": "x", "max_entity_rules": 2}
    )

    assert code == 409, body
    assert body["content"] == {}
    assert body["meta"]["reason"] == (
        "max_entity_rules 2 is below the 3 rules the room holds; delete rules first"
    )
    code, body = await server.call("GET", f"/rooms/{room_id}", admin)
    assert (body["content"]["room"]["name"], body["content"]["room"]["max_entity_rules"]) == (
        "room",
        10,
    )
    code, body = await server.call("PATCH", f"/rooms/{room_id}", admin, {"max_entity_rules": 3})
    assert code == 200, body
    status, data = await server.call(
        "PUT",
        f"/rooms/{room_id}/members",
        admin,
        {"entity_UUID": str(uuid.uuid4()), "permissions": "r"},
    )
    assert (status, data["meta"]["reason"]) == (403, "TOO_MANY_RULES")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "at least one of name, level_admin, max_entity_rules is required"),
        ({"name": ""}, "field 'name' must not be empty"),
        ({"name": "   "}, "field 'name' must not be empty"),
        ({"name": "a\u0001b"}, "field 'name' must not contain control characters"),
        ({"name": "x" * 101}, "field 'name' must be at most 100 characters"),
        ({"name": None}, "field 'name' must be a string"),
        ({"level_admin": -1}, "field 'level_admin' must be between 0 and 1000"),
        ({"level_admin": 1001}, "field 'level_admin' must be between 0 and 1000"),
        ({"level_admin": "5"}, "field 'level_admin' must be an integer"),
        ({"level_admin": True}, "field 'level_admin' must be an integer"),
        ({"max_entity_rules": 1}, "field 'max_entity_rules' must be between 2 and 1000"),
        ({"max_entity_rules": None}, "field 'max_entity_rules' must be an integer"),
        ({"type": "user2user"}, "unknown field 'type'"),
        ({"name": "ok", "owner": "x"}, "unknown field 'owner'"),
    ],
)
async def test_patch_room_refuses_bad_fields_with_400_naming_the_field(
    server: Server, body: dict[str, Any], reason: str
) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)

    code, data = await server.call("PATCH", f"/rooms/{room_id}", admin, body)

    assert (code, data["meta"]["reason"]) == (400, reason)
    code, data = await server.call("GET", f"/rooms/{room_id}", admin)
    assert data["content"]["room"]["name"] == "room"


async def test_patch_room_is_403_for_readers_404_for_outsiders_and_missing_rooms(
    server: Server,
) -> None:
    admin, reader, outsider, room_id = await room_with_reader(server)

    code, body = await server.call("PATCH", f"/rooms/{room_id}", reader, {"name": "mine"})
    assert (code, body["meta"]["reason"]) == (403, "admin permission required")
    hidden = await server.call("PATCH", f"/rooms/{room_id}", outsider, {"name": "mine"})
    missing = await server.call("PATCH", f"/rooms/{2**62}", outsider, {"name": "mine"})
    assert hidden == missing and hidden[0] == 404
    code, body = await server.call("GET", f"/rooms/{room_id}", admin)
    assert body["content"]["room"]["name"] == "room"
    code, _ = await server.call("DELETE", f"/rooms/{room_id}", admin)
    code, body = await server.call("PATCH", f"/rooms/{room_id}", admin, {"name": "gone"})
    assert code == 404


# -- paged history -------------------------------------------------------------------------------


async def post(server: Server, user: User, room_id: int, count: int) -> list[dict[str, Any]]:
    client = await server.join(user, room_id)
    sent = []
    for i in range(count):
        echo = await client.ask({"type": "message", "content": f"m{i + 1}"})
        sent.append(echo["data"])
    return sent


async def history_pages(
    server: Server, user: User, room_id: int, query: str, cursor: str, start: str = ""
) -> list[list[int]]:
    """Follow ``cursor`` from page to page (the first page with ``start``); the seqs of each
    page."""
    pages: list[list[int]] = []
    extra = start
    while len(pages) < 10:
        code, body = await server.call("GET", f"/rooms/{room_id}/messages?{query}{extra}", user)
        assert code == 200, body
        assert isinstance(body["content"], list)  # the answer keeps its shape
        pages.append([m["seq"] for m in body["content"]])
        meta = body["meta"]
        assert meta["has_more"] == (cursor in meta), meta
        if not meta["has_more"]:
            assert not {"next_before", "next_after"} & set(meta)
            return pages
        extra = f"&{cursor.removeprefix('next_')}={meta[cursor]}"
    raise AssertionError(f"no last page: {pages}")


async def test_history_pages_backwards_with_next_before(server: Server) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)
    await post(server, admin, room_id, 7)

    pages = await history_pages(server, admin, room_id, "limit=3", "next_before")

    assert pages == [[5, 6, 7], [2, 3, 4], [1]]


async def test_history_pages_forwards_with_next_after(server: Server) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)
    await post(server, admin, room_id, 5)

    pages = await history_pages(server, admin, room_id, "limit=2", "next_after", "&after=0")

    assert pages == [[1, 2], [3, 4], [5]]


async def test_history_date_window_pages_within_the_window(server: Server) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)
    first = await post(server, admin, room_id, 3)
    await post(server, admin, room_id, 3)  # after the window
    window = f"dateFrom=2000-01-01&dateTo={first[-1]['created_at']}&limit=2"

    pages = await history_pages(server, admin, room_id, window, "next_after")

    assert pages == [[1, 2], [3]]
    code, body = await server.call("GET", f"/rooms/{room_id}/messages?dateTo=2000-01-01", admin)
    assert (code, body["content"], body["meta"]["has_more"]) == (200, [], False)


async def test_history_exactly_limit_messages_has_no_more(server: Server) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)
    await post(server, admin, room_id, 3)

    code, body = await server.call("GET", f"/rooms/{room_id}/messages?limit=3", admin)

    assert code == 200
    assert [m["seq"] for m in body["content"]] == [1, 2, 3]
    assert body["meta"] == {"code": 200, "message": "OK", "has_more": False}


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "before=-1", "after=1.5", "dateFrom=x", "cursor=3"]
)
async def test_history_paging_refuses_bad_input_with_400(server: Server, query: str) -> None:
    admin = server.user()
    room_id = await server.create_room(admin)

    code, body = await server.call("GET", f"/rooms/{room_id}/messages?{query}", admin)

    assert code == 400 and body["meta"]["reason"], body


# -- entity_level on POST /rooms -----------------------------------------------------------------


async def test_group_room_admits_its_organisation_from_level_100_by_default(
    server: Server,
) -> None:
    creator = server.user(level=100)
    room_id = await server.create_room(creator, level_admin=1000)

    assert await select(server, server.user(entity=creator.entity, level=99), room_id) == (
        NOTAUTHORIZED
    )
    assert await select(server, server.user(entity=creator.entity, level=100), room_id) == (
        CONNECTED
    )


async def test_entity_level_sets_the_lowest_level_of_the_organisation_admitted(
    server: Server,
) -> None:
    creator = server.user(level=100)
    room_id = await server.create_room(creator, level_admin=1000, entity_level=10)

    assert await select(server, server.user(entity=creator.entity, level=9), room_id) == (
        NOTAUTHORIZED
    )
    assert await select(server, server.user(entity=creator.entity, level=10), room_id) == (
        CONNECTED
    )
    code, body = await server.call("GET", f"/rooms/{room_id}/members", creator)
    assert code == 200
    entity_rules = [m for m in body["content"] if m["kind"] == "entity"]
    assert [(r["entity_UUID"], r["level"]) for r in entity_rules] == [(creator.entity, 10)]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"entity_level": -1}, "field 'entity_level' must be between 0 and 1000000"),
        ({"entity_level": 1_000_001}, "field 'entity_level' must be between 0 and 1000000"),
        ({"entity_level": "10"}, "field 'entity_level' must be an integer"),
        ({"entity_level": 1.5}, "field 'entity_level' must be an integer"),
        ({"entity_level": None}, "field 'entity_level' must be an integer"),
        (
            {"entity_level": 10, "type": "user2user"},
            "field 'entity_level' applies only to group rooms",
        ),
    ],
)
async def test_entity_level_refuses_bad_values_with_400_and_creates_nothing(
    server: Server, fields: dict[str, Any], reason: str
) -> None:
    creator = server.user(level=100)

    code, body = await server.call(
        "POST", "/rooms", creator, {"name": "r", "level_admin": 100, **fields}
    )

    assert (code, body["meta"]["reason"]) == (400, reason)
    code, body = await server.call("GET", "/rooms", creator)
    assert body["content"] == []


# -- the published contract ----------------------------------------------------------------------


async def test_openapi_documents_members_listing_patch_and_history_paging(server: Server) -> None:
    async with server.http.get(server.http_url + "/openapi.json") as resp:
        doc = await resp.json()
    paths = doc["paths"]
    assert {"get", "put"} <= set(paths["/rooms/{id}/members"])
    patch = paths["/rooms/{id}"]["patch"]
    assert set(patch["responses"]) >= {"200", "400", "403", "404", "409"}
    assert "entity_level" in doc["components"]["schemas"]["NewRoom"]["properties"]
    history = paths["/rooms/{id}/messages"]["get"]["responses"]["200"]
    meta = history["content"]["application/json"]["schema"]["properties"]["meta"]
    assert {"has_more", "next_before", "next_after"} <= set(meta["properties"])


def answer_schema(doc: dict[str, Any], path: str, method: str, status: str) -> Any:
    """A validator for one answer of the published document, its $refs resolved in it."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:nanomsg", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    answer = doc["paths"][path][method]["responses"][status]
    if "$ref" in answer:  # a shared error answer: "#/components/responses/E409"
        where = answer["$ref"].removeprefix("#")
    else:
        escaped = path.replace("~", "~0").replace("/", "~1")
        where = f"/paths/{escaped}/{method}/responses/{status}"
    schema = {"$ref": f"urn:nanomsg#{where}/content/application~1json/schema"}
    return Draft202012Validator(schema, registry=registry)


async def test_members_patch_and_paged_history_answers_match_the_published_schemas(
    server: Server,
) -> None:
    async with server.http.get(server.http_url + "/openapi.json") as resp:
        doc = await resp.json()
    admin = server.user()
    room_id = await server.create_room(admin, entity_level=5)
    await server.grant(admin, room_id, str(uuid.uuid4()), "rw", invite=True)
    await post(server, admin, room_id, 3)
    answers = [
        ("/rooms/{id}/members", "get", f"/rooms/{room_id}/members?limit=1", None),
        ("/rooms/{id}", "patch", f"/rooms/{room_id}", {"name": "n", "max_entity_rules": 3}),
        ("/rooms/{id}/messages", "get", f"/rooms/{room_id}/messages?limit=2", None),
        ("/rooms/{id}/messages", "get", f"/rooms/{room_id}/messages?after=0&limit=2", None),
    ]
    for path, method, url, body in answers:
        code, data = await server.call(method.upper(), url, admin, body)
        assert code == 200, data
        errors = list(answer_schema(doc, path, method, "200").iter_errors(data))
        assert errors == [], (url, [error.message for error in errors])
        assert data["meta"].get("has_more", True) is True  # each of these has a next page
    code, data = await server.call("PATCH", f"/rooms/{room_id}", admin, {"max_entity_rules": 2})
    assert code == 409
    assert not list(answer_schema(doc, "/rooms/{id}", "patch", "409").iter_errors(data))
