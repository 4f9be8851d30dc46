"""The per-user event stream over a real WebSocket and real HTTP, on both backends: every
authenticated connection gets ``user_event`` frames about its own user without subscribing:
``room_added`` / ``room_removed`` when a user rule starts or stops granting read, ``invited``
for an invitation (a pending rule, a DM across entities), and ``read`` on the user's other
connections when a mark moves (not on the connection that read)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Client, Server, User

pytestmark = pytest.mark.asyncio


def event(name: str, room_id: int, **extra: Any) -> dict[str, Any]:
    return {"type": "user_event", "data": {"event": name, "room_id": room_id, **extra}}


async def login(server: Server, user: User, user_events: bool = True) -> Client:
    """Connect and authenticate asking for (or not) the user event stream."""
    client = await server.connect()
    assert await client.recv() == {"type": "query", "data": "START?"}
    token = {"type": "token", "content": user.token, "user_events": user_events}
    assert await client.ask(token) == {"type": "status", "data": "READY"}
    return client


async def next_user_event(client: Client) -> dict[str, Any]:
    """The next user_event frame (other frames, such as a DM answer, are skipped; bounded)."""
    for _ in range(20):
        frame = await client.recv()
        if frame.get("type") == "user_event":
            return frame
    raise AssertionError("no user_event frame")


async def test_a_user_gets_room_added_when_granted_and_room_removed_when_revoked(
    server: Server,
) -> None:
    owner, bob = server.user(), server.user()
    room_id = await server.create_room(owner)
    b = await login(server, bob)
    await server.grant(owner, room_id, bob.user, "rw")
    assert await b.recv() == event("room_added", room_id)
    # A change that keeps read access says nothing.
    await server.grant(owner, room_id, bob.user, "r")
    assert await b.silent(0.3)
    status, data = await server.call("DELETE", f"/rooms/{room_id}/members/{bob.user}", owner)
    assert status == 200, data
    assert await b.recv() == event("room_removed", room_id)


async def test_a_ban_and_a_room_deleted_are_room_removed(server: Server) -> None:
    owner, bob, carol = server.user(), server.user(), server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, bob.user, "rw")
    await server.grant(owner, room_id, carol.user, "rw")
    b = await login(server, bob)
    c = await login(server, carol)
    await server.grant(owner, room_id, bob.user, "b")
    assert await b.recv() == event("room_removed", room_id)
    status, data = await server.call("DELETE", f"/rooms/{room_id}", owner)
    assert status == 200, data
    assert await c.recv() == event("room_removed", room_id)
    assert await b.silent(0.3)  # already removed for bob: nothing more


async def test_an_invitation_is_invited_and_accepting_it_is_room_added(server: Server) -> None:
    owner, bob = server.user(), server.user()
    room_id = await server.create_room(owner)
    b = await login(server, bob)
    await server.grant(owner, room_id, bob.user, "rw", invite=True)
    assert await b.recv() == event("invited", room_id)
    status, data = await server.call("PUT", f"/rooms/{room_id}/invitation", bob, {"accepted": True})
    assert status == 200, data
    assert await b.recv() == event("room_added", room_id)


async def test_entity_rules_tell_no_user(server: Server) -> None:
    owner, bob = server.user(), server.user()
    room_id = await server.create_room(owner)
    b = await login(server, bob)
    await server.grant(owner, room_id, bob.entity, "rw", kind="entity")
    assert await b.silent(0.3)


async def test_a_dm_opened_is_room_added_within_an_entity_and_invited_across(
    server: Server,
) -> None:
    alice = server.user()
    bob = server.user(entity=alice.entity)
    mallory = server.user()  # another entity
    b = await login(server, bob)
    m = await login(server, mallory)
    a = await login(server, alice)
    same = (await a.ask({"type": "open_dm", "user": bob.user}))["room_id"]
    assert await next_user_event(b) == event("room_added", same)
    # The DM is readable for bob's live connection at once.
    assert await b.ask({"type": "select_room", "room_id": same}) == {
        "type": "status",
        "data": "CONNECTED",
    }
    status, data = await server.call("POST", "/dm", alice, {"user": mallory.user})
    assert status == 200, data
    across = data["content"]["room"]["id"]
    assert await next_user_event(m) == event("invited", across)


async def test_read_goes_to_the_users_other_connections_not_the_one_that_read(
    server: Server,
) -> None:
    owner = server.user()
    room_id = await server.create_room(owner)
    first = await login(server, owner)
    assert (await first.ask({"type": "select_room", "room_id": room_id}))["data"] == "CONNECTED"
    for text in ("a", "b"):
        assert (await first.ask({"type": "message", "content": text}))["type"] == "message"
    second = await login(server, owner)  # another device of the same user, no room held
    assert await first.ask({"type": "read", "seq": 2}) == {
        "type": "status",
        "data": "READMARK",
        "room_id": room_id,
        "seq": 2,
    }
    assert await second.recv() == event("read", room_id, seq=2)
    assert await first.silent(0.3)
    # A mark that does not move tells nobody.
    await first.ask({"type": "read", "seq": 1})
    assert await second.silent(0.3)
    # Over HTTP, every connection of the user hears of it.
    status, data = await server.call("POST", f"/rooms/{room_id}/read", owner, {"seq": 2})
    assert status == 200, data
    assert await second.recv() == event("read", room_id, seq=2)
    assert await first.recv() == event("read", room_id, seq=2)


async def test_another_users_connection_gets_none_of_my_user_events(server: Server) -> None:
    owner, bob, eve = server.user(), server.user(), server.user()
    room_id = await server.create_room(owner)
    e = await login(server, eve)
    await server.grant(owner, room_id, bob.user, "rw")
    assert await e.silent(0.3)


async def test_a_connection_that_did_not_ask_for_user_events_gets_none(server: Server) -> None:
    owner, bob = server.user(), server.user()
    room_id = await server.create_room(owner)
    plain = await server.login(bob)  # a client of the original protocol
    unasked = await login(server, bob, user_events=False)
    asked = await login(server, bob)
    await server.grant(owner, room_id, bob.user, "rw")
    assert await asked.recv() == event("room_added", room_id)
    assert await plain.silent(0.3) and await unasked.silent(0.1)
