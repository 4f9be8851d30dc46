"""Resume: select_room with ``since`` replays what was missed, then goes live, gap- and
duplicate-free, on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import Client, Server, ServerFactory

pytestmark = pytest.mark.asyncio


async def send_many(client: Client, n: int, prefix: str) -> list[int]:
    """Send n messages one after another; return their seqs from the echoes."""
    seqs = []
    for i in range(n):
        echo = await client.ask({"type": "message", "content": f"{prefix}{i}"})
        seqs.append(echo["data"]["seq"])
    return seqs


async def read_until_resumed(client: Client) -> tuple[list[int], dict[str, Any]]:
    seqs = []
    while True:
        frame = await client.recv()
        if frame["type"] == "status":
            assert frame["data"] == "RESUMED", frame
            return seqs, frame
        seqs.append(frame["data"]["seq"])


async def test_reconnect_and_resume_gets_exactly_the_missed_messages(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    reader = await server.join(owner, room)
    await send_many(sender, 3, "before")
    seen = [(await reader.recv())["data"]["seq"] for _ in range(3)]
    await reader.close()  # a phone enters a tunnel
    await send_many(sender, 4, "missed")
    back = await server.login(owner)
    reply = await back.ask({"type": "select_room", "room_id": room, "since": seen[-1]})
    assert reply == {"type": "status", "data": "CONNECTED"}
    replayed, end = await read_until_resumed(back)
    assert replayed == [4, 5, 6, 7]
    assert end == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room,
        "count": 4,
        "complete": True,
    }
    live = await sender.ask({"type": "message", "content": "live"})
    assert (await back.recv())["data"]["seq"] == live["data"]["seq"] == 8
    assert await back.silent(0.2)


async def test_resume_with_nothing_missed_answers_resumed_zero(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    await send_many(sender, 2, "m")
    back = await server.login(owner)
    await back.ask({"type": "select_room", "room_id": room, "since": 2})
    assert await back.recv() == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room,
        "count": 0,
        "complete": True,
    }


async def test_resume_racing_with_live_traffic_has_no_gap_and_no_duplicate(
    server: Server,
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    senders = [await server.join(owner, room) for _ in range(3)]
    await send_many(senders[0], 10, "old")

    async def blast(client: Client, tag: str) -> None:
        for i in range(40):
            await client.send({"type": "message", "content": f"{tag}{i}"})
            await asyncio.sleep(0.002)

    traffic = [asyncio.create_task(blast(c, f"s{n}-")) for n, c in enumerate(senders)]
    await asyncio.sleep(0.05)  # traffic is flowing when the resume starts
    back = await server.login(owner)
    await back.send({"type": "select_room", "room_id": room, "since": 5})
    assert await back.recv() == {"type": "status", "data": "CONNECTED"}
    replayed, end = await read_until_resumed(back)
    await asyncio.gather(*traffic)
    total = 10 + 3 * 40
    live = [(await back.recv())["data"]["seq"] for _ in range(total - 5 - len(replayed))]
    assert replayed + live == list(range(6, total + 1))
    assert end["complete"] is True and end["count"] == len(replayed)
    assert await back.silent(0.2)


async def test_resume_beyond_the_cap_replays_the_latest_and_says_incomplete(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(resume_cap=5)
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    await send_many(sender, 12, "m")
    back = await server.login(owner)
    await back.ask({"type": "select_room", "room_id": room, "since": 2})
    replayed, end = await read_until_resumed(back)
    assert replayed == [8, 9, 10, 11, 12]
    assert end == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room,
        "count": 5,
        "complete": False,
    }
    # The client pages the older ones it still lacks (3..7) with get_past_messages.
    await back.send({"type": "get_past_messages", "before": 8, "limit": 5})
    paged = [(await back.recv())["data"]["seq"] for _ in range(5)]
    assert paged == [3, 4, 5, 6, 7]
    assert (await back.recv())["data"] == "HISTORYEND"


async def test_resume_with_a_bad_since_is_badargs(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.login(owner)
    reply = await client.ask({"type": "select_room", "room_id": room, "since": "x"})
    assert reply["data"] == "BADARGS" and "since" in reply["reason"]


async def test_resuming_the_room_already_selected_replays_before_resumed_and_nothing_after(
    server: Server,
) -> None:
    """The connection is the room's only reader on its process: resuming must not rebuild the
    room here from the position of the first select (which replayed nothing, then sent the
    missed messages late, as live)."""
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    assert await send_many(client, 5, "m") == [1, 2, 3, 4, 5]
    reply = await client.ask({"type": "select_room", "room_id": room, "since": 2})
    assert reply == {"type": "status", "data": "CONNECTED"}
    replayed, end = await read_until_resumed(client)
    assert replayed == [3, 4, 5]
    assert end == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room,
        "count": 3,
        "complete": True,
    }
    assert await client.silent(0.8)  # nothing late: no message of 1-5 comes again
    echo = await client.ask({"type": "message", "content": "six"})
    assert echo["data"]["seq"] == 6 and "history" not in echo["data"]
    assert await client.silent(0.8)


async def test_a_user_selecting_after_a_resume_gets_only_new_messages_as_live(
    server: Server,
) -> None:
    owner = server.user()
    mate = server.user(entity=owner.entity)
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    await send_many(client, 5, "m")
    await client.send({"type": "select_room", "room_id": room, "since": 2})
    assert await client.recv() == {"type": "status", "data": "CONNECTED"}
    await read_until_resumed(client)
    other = await server.join(mate, room)  # selected after seq 5: gets 6 on, nothing older
    echo = await client.ask({"type": "message", "content": "six"})
    assert echo["data"]["seq"] == 6
    assert (await other.recv())["data"]["seq"] == 6
    assert await other.silent(0.8)
    assert await client.silent(0.3)


async def test_resuming_the_selected_room_twice_delivers_each_message_once_in_order(
    server: Server,
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    sender = await server.join(owner, room)
    await send_many(sender, 3, "a")
    assert [(await client.recv())["data"]["seq"] for _ in range(3)] == [1, 2, 3]
    for since in (3, 3):
        await client.send({"type": "select_room", "room_id": room, "since": since})
        assert await client.recv() == {"type": "status", "data": "CONNECTED"}
        replayed, end = await read_until_resumed(client)
        assert replayed == [] and end["count"] == 0
    await send_many(sender, 2, "b")
    assert [(await client.recv())["data"]["seq"] for _ in range(2)] == [4, 5]
    assert await client.silent(0.5)
