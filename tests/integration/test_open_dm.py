"""The ``open_dm`` command over a real WebSocket, on both backends: the same rules as
``POST /dm`` (one room whoever asks first, BADARGS for oneself or a non-UUID, a cross-entity
DM pending for the other side), and a connection that authenticates settles the DMs waiting
for its user, as an HTTP request does."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.asyncio

CONNECTED = {"type": "status", "data": "CONNECTED"}
NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}


def dm(room_id: int) -> dict[str, Any]:
    return {"type": "status", "data": "DM", "room_id": room_id}


async def test_open_dm_answers_the_same_room_to_both_sides_and_it_carries_messages(
    server: Server,
) -> None:
    alice = server.user()
    bob = server.user(entity=alice.entity)
    a = await server.login(alice)
    first = await a.ask({"type": "open_dm", "user": bob.user.upper()})
    assert first["data"] == "DM" and isinstance(first["room_id"], int), first
    room_id = first["room_id"]
    assert await a.ask({"type": "open_dm", "user": bob.user}) == dm(room_id)  # however often
    b = await server.login(bob)
    assert await b.ask({"type": "open_dm", "user": alice.user}) == dm(room_id)
    assert await b.ask({"type": "select_room", "room_id": room_id}) == CONNECTED
    assert await a.ask({"type": "select_room", "room_id": room_id}) == CONNECTED
    echo = await a.ask({"type": "message", "content": "hello bob"})
    assert echo["type"] == "message"
    assert (await b.recv())["data"]["content"] == "hello bob"
    status, data = await server.call("POST", "/dm", bob, {"user": alice.user})
    assert status == 200 and data["content"]["room"]["id"] == room_id  # same as over HTTP


async def test_open_dm_with_oneself_or_a_bad_user_is_badargs_with_the_reason(
    server: Server,
) -> None:
    me = server.user()
    client = await server.login(me)
    for command, reason in (
        ({"type": "open_dm", "user": me.user}, "a DM needs another user than the caller"),
        ({"type": "open_dm", "user": me.user.upper()}, "a DM needs another user than the caller"),
        ({"type": "open_dm", "user": "bob"}, "user must be a UUID"),
        ({"type": "open_dm", "user": 7}, "user must be a UUID"),
        ({"type": "open_dm"}, "user is required"),
    ):
        reply = await client.ask(command)
        assert reply == {"type": "status", "data": "BADARGS", "reason": reason}, command
    # The connection is still usable afterwards.
    other = server.user(entity=me.entity)
    assert (await client.ask({"type": "open_dm", "user": other.user}))["data"] == "DM"


async def test_open_dm_before_authentication_asks_for_the_token(server: Server) -> None:
    client = await server.connect()
    assert await client.recv() == {"type": "query", "data": "START?"}
    reply = await client.ask({"type": "open_dm", "user": server.user().user})
    assert reply == {"type": "query", "data": "TOKEN?"}


async def test_cross_entity_dm_opened_over_the_websocket_is_pending_for_the_other_side(
    server: Server,
) -> None:
    alice, mallory = server.user(), server.user()  # two entities
    a = await server.login(alice)
    room_id = (await a.ask({"type": "open_dm", "user": mallory.user}))["room_id"]
    assert await a.ask({"type": "select_room", "room_id": room_id}) == CONNECTED
    m = await server.login(mallory)
    assert await m.ask({"type": "select_room", "room_id": room_id}) == NOTAUTHORIZED
    status, data = await server.call(
        "PUT", f"/rooms/{room_id}/invitation", mallory, {"accepted": True}
    )
    assert status == 200, data
    assert await m.ask({"type": "select_room", "room_id": room_id}) == CONNECTED


async def test_a_connection_authenticating_settles_a_same_entity_dm_waiting_for_its_user(
    server: Server,
) -> None:
    alice = server.user()
    bob = server.user(entity=alice.entity)
    status, data = await server.call("POST", "/dm", alice, {"user": bob.user})
    assert status == 200, data
    room_id = data["content"]["room"]["id"]
    # Bob never made an HTTP request: his WebSocket login alone makes the DM readable.
    b = await server.login(bob)
    assert await b.ask({"type": "select_room", "room_id": room_id}) == CONNECTED


async def test_a_connection_authenticating_keeps_a_cross_entity_dm_pending(
    server: Server,
) -> None:
    alice, mallory = server.user(), server.user()
    status, data = await server.call("POST", "/dm", alice, {"user": mallory.user})
    assert status == 200, data
    room_id = data["content"]["room"]["id"]
    m = await server.login(mallory)
    assert await m.ask({"type": "select_room", "room_id": room_id}) == NOTAUTHORIZED
