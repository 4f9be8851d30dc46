"""Room ids cannot be probed over the side-port: every route answers a room the caller may not
read exactly as it answers a room that does not exist, status and body. The routes are taken
from the running application's route table, so a route added later is walked too; its body is
the example its OpenAPI operation declares. Also: input the storage could not hold is refused
up front, on each backend."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from aiohttp import web

from nanomsg.openapi import build_openapi
from tests.integration.conftest import Server, User

MISSING_ROOM = 2**62  # an id no test database reaches


def _room_routes(srv: Server) -> list[tuple[str, str]]:
    """(method, canonical path) of every route that takes a room id."""
    app = srv.app.http_app
    assert isinstance(app, web.Application)
    routes = []
    for route in app.router.routes():
        info = route.get_info()
        path = info.get("formatter") or info.get("path") or ""
        if "{id}" in path:
            routes.append((route.method, path))
    assert routes, "the route table has no room route"
    return sorted(routes)


def _example_body(document: dict[str, Any], method: str, path: str) -> Any:
    operation = document["paths"][path][method.lower()]
    if "requestBody" not in operation:
        return None
    media = operation["requestBody"]["content"]["application/json"]
    assert "example" in media, f"{method} {path}: declare an example body in openapi.py"
    return media["example"]


def _fill(path: str, room_id: int, subject: str) -> str:
    filled = path.replace("{id}", str(room_id)).replace("{uuid}", subject).replace("{seq}", "1")
    assert not re.search(r"{\w+}", filled), f"no probe value for a parameter of {path}"
    return filled


async def _answers(
    srv: Server, caller: User, room_id: int, subject: str
) -> dict[tuple[str, str], tuple[int, Any]]:
    document = build_openapi(room_create_level=srv.app.config.room_create_level)
    answers: dict[tuple[str, str], tuple[int, Any]] = {}
    for method, path in _room_routes(srv):
        url = _fill(path, room_id, subject)
        if method == "HEAD":  # aiohttp's twin of a GET route: no body, but its length shows
            headers = {"Authorization": f"Bearer {caller.token}"}
            async with srv.http.head(srv.http_url + url, headers=headers) as resp:
                answers[(method, path)] = (resp.status, resp.headers.get("Content-Length"))
            continue
        body = _example_body(document, method, path)
        answers[(method, path)] = await srv.call(method, url, caller, body)
    return answers


@pytest.mark.asyncio
async def test_every_room_route_answers_an_unreadable_room_like_a_missing_one(
    server: Server,
) -> None:
    owner = server.user(level=500)
    foreign = await server.create_room(owner)
    deleted = await server.create_room(owner)
    for room_id in (foreign, deleted):  # seq 1 exists there: routes naming it probe it
        status, _ = await server.call("POST", f"/rooms/{room_id}/messages", owner, {"content": "x"})
        assert status == 200
    status, _ = await server.call("DELETE", f"/rooms/{deleted}", owner)
    assert status == 200
    # A colleague below the owning entity's rule (level 100) and below level_admin: the room
    # holds a rule for its entity, but not one it may see.
    junior = server.user(entity=owner.entity, level=50)
    outsider = server.user(level=1000)
    for caller in (outsider, junior):
        missing = await _answers(server, caller, MISSING_ROOM, owner.user)
        for route, answer in missing.items():
            assert answer[0] == 404, (route, answer)  # the probe got past input checks
        for room_id in (foreign, deleted):
            probed = await _answers(server, caller, room_id, owner.user)
            assert probed == missing
    # Nothing the probes sent changed the room.
    status, data = await server.call("GET", f"/rooms/{foreign}", owner)
    assert status == 200 and data["content"]["access"] == "rwa"


@pytest.mark.asyncio
async def test_invitation_for_a_hidden_entity_rule_answers_like_a_missing_room(
    server: Server,
) -> None:
    owner = server.user()
    partner = str(uuid.uuid4())
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, partner, "rw", kind="entity", level=60, invite=True)
    below = server.user(entity=partner, level=40)
    body = {"accepted": True, "use_parent_entity": True}
    hidden = await server.call("PUT", f"/rooms/{room_id}/invitation", below, body)
    missing = await server.call("PUT", f"/rooms/{MISSING_ROOM}/invitation", below, body)
    assert hidden == missing
    assert hidden[1]["meta"]["reason"] == "no such room"


@pytest.mark.asyncio
async def test_invitee_without_the_named_rule_hears_no_such_invitation(server: Server) -> None:
    """A caller holding a rule in the room (listed by GET /rooms) knows the room: asking for
    a rule it does not hold there is "no such invitation", not "no such room"."""
    owner, guest = server.user(), server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, guest.user, "rw", invite=True)
    body = {"accepted": True, "use_parent_entity": True}
    status, data = await server.call("PUT", f"/rooms/{room_id}/invitation", guest, body)
    assert (status, data["meta"]["reason"]) == (404, "no such invitation")


@pytest.mark.asyncio
async def test_userUUID_alias_with_kind_entity_is_refused_with_a_reason(server: Server) -> None:
    owner, member = server.user(), server.user()
    room_id = await server.create_room(owner)
    path = f"/rooms/{room_id}/members"
    body = {"userUUID": member.entity, "kind": "entity", "permissions": "b"}
    status, data = await server.call("PUT", path, owner, body)
    assert status == 400
    assert data["meta"]["reason"] == "field 'userUUID' names a user: give an entity as entity_UUID"
    # The same rule named the documented way is taken.
    body = {"entity_UUID": member.entity, "kind": "entity", "permissions": "b"}
    assert (await server.call("PUT", path, owner, body))[0] == 201


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["nul\u0000inside", "\u0000", "c1\u0085control"])
async def test_room_name_with_a_nul_or_control_character_is_400_on_every_backend(
    server: Server, name: str
) -> None:
    owner = server.user()
    status, data = await server.call("POST", "/rooms", owner, {"name": name, "level_admin": 1})
    assert status == 400
    assert data["meta"]["reason"] == "field 'name' must not contain control characters"
    status, data = await server.call("GET", "/rooms/all", owner)
    assert (status, data["content"]) == (200, [])


@pytest.mark.asyncio
async def test_undeclared_method_on_rooms_all_is_405_allowing_get(server: Server) -> None:
    owner = server.user()
    await server.create_room(owner)
    for method in ("DELETE", "PUT", "POST"):
        async with server.http.request(
            method,
            f"{server.http_url}/rooms/all",
            headers={"Authorization": f"Bearer {owner.token}"},
        ) as resp:
            assert resp.status == 405, method
            assert set(resp.headers["Allow"].split(",")) <= {"GET", "HEAD"}
