"""One use-case layer for both drivers, on each backend: the WebSocket driver and the HTTP
side-port decide with the same instance, which keeps the rules of rooms live on the process.
A rule changed through either side is seen at once by the next request on either side: a
ban over HTTP by the next HTTP post, a DM made readable (settled at login, accepted by asking
for it) by the next select, while another user watches the room and keeps its rules warm."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import Client, Server, User

pytestmark = pytest.mark.asyncio

CONNECTED = {"type": "status", "data": "CONNECTED"}


async def watch(server: Server, user: User, room_id: int) -> Client:
    """A WebSocket subscriber of the room: the room is live here, its rules kept by the hub."""
    client = await server.login(user)
    reply = await client.ask({"type": "subscribe", "room_id": room_id})
    assert reply == {"type": "status", "data": "SUBSCRIBED", "room_id": room_id}, reply
    return client


async def post(server: Server, user: User, room_id: int, content: str) -> tuple[int, Any]:
    return await server.call("POST", f"/rooms/{room_id}/messages", user, {"content": content})


async def test_both_drivers_hold_the_one_use_case_layer_the_app_built(server: Server) -> None:
    assert server.app.ws.usecases is server.app.usecases
    assert server.app.usecases.kept_rules is not None
    assert server.app.usecases.publisher is server.app.hub


async def test_a_ban_over_http_refuses_the_banned_users_next_http_post_at_once(
    server: Server,
) -> None:
    owner, member = server.user(), server.user()
    room = await server.create_room(owner)
    await server.grant(owner, room, member.user, "rw")
    watcher = await watch(server, owner, room)
    status, data = await post(server, member, room, "before the ban")
    assert status == 200, data  # decided on the kept rules: the room is live here
    assert (await watcher.recv())["data"]["content"] == "before the ban"

    await server.grant(owner, room, member.user, "b")
    status, data = await post(server, member, room, "after the ban")
    assert (status, data["meta"]["reason"]) == (404, "no such room")
    status, data = await server.call("PATCH", f"/rooms/{room}/messages/1", member, {"content": "x"})
    assert (status, data["meta"]["reason"]) == (404, "no such room")
    # A grant back is seen as fast.
    await server.grant(owner, room, member.user, "rw")
    status, data = await post(server, member, room, "after the pardon")
    assert status == 200, data
    frame = await watcher.recv()
    assert (frame["data"]["seq"], frame["data"]["content"]) == (2, "after the pardon")


async def test_a_dm_settled_at_login_is_selectable_at_once_while_its_opener_watches_it(
    server: Server,
) -> None:
    alice = server.user()
    bob = server.user(entity=alice.entity)
    status, data = await server.call("POST", "/dm", alice, {"user": bob.user})
    assert status == 200, data
    room_id = data["content"]["room"]["id"]
    await watch(server, alice, room_id)  # the DM is live here, with bob's rule still pending
    b = await server.login(bob)  # settles the DM: bob's rule is accepted
    assert await b.ask({"type": "select_room", "room_id": room_id}) == CONNECTED


async def test_a_dm_settled_by_an_http_post_accepts_that_post_while_its_opener_watches_it(
    server: Server,
) -> None:
    alice = server.user()
    bob = server.user(entity=alice.entity)
    status, data = await server.call("POST", "/dm", alice, {"user": bob.user})
    assert status == 200, data
    room_id = data["content"]["room"]["id"]
    watcher = await watch(server, alice, room_id)
    status, data = await post(server, bob, room_id, "first words")
    assert status == 200, data
    assert (await watcher.recv())["data"]["content"] == "first words"


async def test_a_cross_entity_dm_accepted_by_asking_for_it_is_selectable_at_once(
    server: Server,
) -> None:
    alice, mallory = server.user(), server.user()
    status, data = await server.call("POST", "/dm", alice, {"user": mallory.user})
    assert status == 200, data
    room_id = data["content"]["room"]["id"]
    await watch(server, alice, room_id)
    m = await server.login(mallory)
    reply = await m.ask({"type": "select_room", "room_id": room_id})
    assert reply["data"] == "NOTAUTHORIZED"  # a pending invitation grants nothing
    status, data = await server.call("POST", "/dm", mallory, {"user": alice.user})
    assert status == 200 and data["content"]["room"]["id"] == room_id, data
    assert await m.ask({"type": "select_room", "room_id": room_id}) == CONNECTED


async def test_a_ban_committed_while_a_select_reads_the_old_rules_is_not_kept_as_the_rules(
    server: Server,
) -> None:
    """A select reads the room's rules, a ban commits and is announced before that select
    joins (the room was not live here: no channel heard the notice). The rules the select
    read must not become the rules kept for the room: the banned user loses the room at once
    and their next HTTP post is refused, on either door."""
    owner, member = server.user(), server.user()
    room = await server.create_room(owner)
    await server.grant(owner, room, member.user, "rw")
    store = server.app.store
    real = store.room_access
    reading, release = asyncio.Event(), asyncio.Event()
    armed = [False]

    async def read_then_wait(room_id: int) -> Any:
        found = await real(room_id)
        if armed[0] and room_id == room:
            armed[0] = False
            reading.set()
            await release.wait()  # the rules as they were, returned after the ban
        return found

    store.room_access = read_then_wait  # type: ignore[method-assign]
    client = await server.login(member)
    armed[0] = True
    await client.send({"type": "select_room", "room_id": room})
    await asyncio.wait_for(reading.wait(), 5.0)
    await server.grant(owner, room, member.user, "b")  # committed and announced
    release.set()
    assert await client.recv() == {"type": "status", "data": "CONNECTED"}  # read before the ban
    assert await client.recv() == {"type": "status", "data": "NOTAUTHORIZED", "room_id": room}
    status, data = await post(server, member, room, "after the ban")
    assert (status, data["meta"]["reason"]) == (404, "no such room")
