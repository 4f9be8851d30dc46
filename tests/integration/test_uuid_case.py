"""One UUID in any case is one user: bans, rules and tokens over real HTTP and WebSocket, on
both backends.

Before UUIDs were brought to one lower-case form at the edge, a ban written with the victim's
UUID in upper case created a second rule that named nobody, and a token spelling its UUIDs in
upper case was another user.
"""

from __future__ import annotations

import uuid

import pytest

from tests.integration.conftest import Server, User

pytestmark = pytest.mark.asyncio

NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}
READY = {"type": "status", "data": "READY"}
LIVE_DEADLINE = 1.0


def shouted(user: User, server: Server) -> User:
    """The same user, with a token spelling both UUIDs in upper case."""
    token = server.make_token(user=user.user.upper(), entity=user.entity.upper(), level=user.level)
    return User(user.user.upper(), user.entity.upper(), user.level, token)


async def test_upper_case_user_ban_updates_the_rule_and_bans_live_and_new_selects(
    server: Server,
) -> None:
    owner = server.user()
    victim = server.user()
    room_id = await server.create_room(owner)
    assert await server.grant(owner, room_id, victim.user, "rw") == 201
    live = await server.join(victim, room_id)

    status = await server.grant(owner, room_id, victim.user.upper(), "b")

    assert status == 200  # the victim's own rule, updated: not a second rule for nobody
    assert await live.recv(timeout=LIVE_DEADLINE) == {**NOTAUTHORIZED, "room_id": room_id}
    fresh = await server.login(victim)
    assert await fresh.ask({"type": "select_room", "room_id": room_id}) == NOTAUTHORIZED
    code, members = await server.call("GET", f"/rooms/{room_id}/members", owner)
    assert code == 200
    subjects = [(m["kind"], m["entity_UUID"], m["permissions"]) for m in members["content"]]
    assert ("user", victim.user, "b") in subjects
    assert all(subject == subject.lower() for _, subject, _ in subjects)


async def test_upper_case_entity_ban_bans_every_member_of_that_entity(server: Server) -> None:
    owner = server.user()
    partner = str(uuid.uuid4())
    member = server.user(entity=partner, level=10)
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, partner, "rw", kind="entity")
    await server.join(member, room_id)

    status = await server.grant(owner, room_id, partner.upper(), "b", kind="entity")

    assert status == 200
    fresh = await server.login(member)
    assert await fresh.ask({"type": "select_room", "room_id": room_id}) == NOTAUTHORIZED


async def test_upper_case_member_path_deletes_the_lower_case_rule(server: Server) -> None:
    owner = server.user()
    member = server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, member.user, "rw")

    code, _ = await server.call(
        "DELETE", f"/rooms/{room_id}/members/{member.user.upper()}?kind=user", owner
    )

    assert code == 200
    fresh = await server.login(member)
    assert await fresh.ask({"type": "select_room", "room_id": room_id}) == NOTAUTHORIZED


async def test_token_with_upper_case_uuids_is_the_same_user_for_rules_and_resends(
    server: Server,
) -> None:
    owner = server.user()
    member = server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, member.user, "rw")
    first = await server.join(member, room_id)
    sent = await first.ask({"type": "message", "content": "once", "client_id": "c-1"})
    assert sent["data"]["emitter"] == member.user

    again = await server.join(shouted(member, server), room_id)  # its user rule applies
    resent = await again.ask({"type": "message", "content": "once", "client_id": "c-1"})

    assert resent["data"]["emitter"] == member.user
    assert (resent["data"]["id"], resent["data"]["seq"]) == (sent["data"]["id"], 1)
    code, body = await server.call("GET", f"/rooms/{room_id}/messages", owner)
    assert code == 200 and [m["seq"] for m in body["content"]] == [1]


async def test_refreshing_with_the_same_uuids_in_upper_case_keeps_the_connection(
    server: Server,
) -> None:
    member = server.user()
    client = await server.login(member)

    assert await client.ask({"type": "token", "content": shouted(member, server).token}) == READY
    assert await client.silent(0.2)


async def test_room_created_with_an_upper_case_token_is_owned_by_the_lower_case_entity(
    server: Server,
) -> None:
    owner = server.user()
    room_id = await server.create_room(shouted(owner, server))

    code, body = await server.call("GET", f"/rooms/{room_id}", owner)

    assert code == 200, body
    assert body["content"]["room"]["entity_owner"] == owner.entity
    assert body["content"]["access"] == "rwa"
