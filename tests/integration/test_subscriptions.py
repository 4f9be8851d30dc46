"""Several rooms per connection over a real WebSocket, on both backends: subscribe,
unsubscribe, the cap, commands naming a room, per-room revocation and resume."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Client, Server, ServerFactory, User

pytestmark = pytest.mark.asyncio


def status(word: str, room_id: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "status", "data": word}
    if room_id is not None:
        frame["room_id"] = room_id
    return frame


async def subscribe(client: Client, room_id: int, **extra: Any) -> None:
    reply = await client.ask({"type": "subscribe", "room_id": room_id, **extra})
    assert reply == status("SUBSCRIBED", room_id), reply


async def rooms_of(server: Server, owner: User, count: int) -> list[int]:
    return [await server.create_room(owner) for _ in range(count)]


async def test_a_connection_subscribed_to_three_rooms_gets_each_rooms_messages_with_its_room_id(
    server: Server,
) -> None:
    owner = server.user()
    rooms = await rooms_of(server, owner, 3)
    reader = await server.login(owner)
    for room_id in rooms:
        await subscribe(reader, room_id)
    senders = [await server.join(owner, room_id) for room_id in rooms]
    for n, (room_id, sender) in enumerate(zip(rooms, senders, strict=True)):
        echo = await sender.ask({"type": "message", "content": f"to {n}"})
        assert echo["data"]["room_id"] == room_id
        got = await reader.recv()
        assert got["type"] == "message"
        assert (got["data"]["room_id"], got["data"]["content"]) == (room_id, f"to {n}")
    assert await reader.silent(0.2)


async def test_unsubscribe_stops_one_rooms_messages_and_keeps_the_others(server: Server) -> None:
    owner = server.user()
    first, second = await rooms_of(server, owner, 2)
    reader = await server.login(owner)
    await subscribe(reader, first)
    await subscribe(reader, second)
    assert await reader.ask({"type": "unsubscribe", "room_id": first}) == status(
        "UNSUBSCRIBED", first
    )
    sender = await server.login(owner)
    await sender.ask({"type": "message", "room_id": first, "content": "gone"})
    await sender.ask({"type": "message", "room_id": second, "content": "kept"})
    got = await reader.recv()
    assert (got["data"]["room_id"], got["data"]["content"]) == (second, "kept")
    assert await reader.silent(0.2)


async def test_one_room_past_max_subscriptions_is_toomany(server_factory: ServerFactory) -> None:
    server = await server_factory(max_subscriptions=2)
    owner = server.user()
    rooms = await rooms_of(server, owner, 3)
    client = await server.login(owner)
    await subscribe(client, rooms[0])
    await subscribe(client, rooms[1])
    assert await client.ask({"type": "subscribe", "room_id": rooms[2]}) == status(
        "TOOMANY", rooms[2]
    )
    # Making room lets it in; the connection is still usable.
    await client.ask({"type": "unsubscribe", "room_id": rooms[0]})
    await subscribe(client, rooms[2])


async def test_posting_to_a_room_not_held_is_acknowledged_by_its_own_echo_once(
    server: Server,
) -> None:
    owner = server.user()
    selected, other = await rooms_of(server, owner, 2)
    watcher = await server.join(owner, other)
    sender = await server.join(owner, selected)
    echo = await sender.ask(
        {"type": "message", "room_id": other, "content": "aside", "client_id": "c-1"}
    )
    assert echo["type"] == "message"
    assert (echo["data"]["room_id"], echo["data"]["content"]) == (other, "aside")
    assert await watcher.recv() == echo  # the room gets the same frame
    assert await sender.silent(0.2)  # once, and nothing of the other room after it
    # The idempotent resend answers the sender alone, with the stored message.
    again = await sender.ask(
        {"type": "message", "room_id": other, "content": "aside", "client_id": "c-1"}
    )
    assert again == echo
    assert await watcher.silent(0.2)
    # Commands without room_id still act on the selected room.
    mine = await sender.ask({"type": "message", "content": "home"})
    assert mine["data"]["room_id"] == selected


async def test_posting_to_a_room_without_write_is_notauthorized_and_missing_rooms_alike(
    server: Server,
) -> None:
    owner, reader = server.user(), server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, reader.user, "r")
    client = await server.login(reader)
    refused = await client.ask({"type": "message", "room_id": room_id, "content": "x"})
    assert refused == status("NOTAUTHORIZED")
    missing = await client.ask({"type": "message", "room_id": 10**12, "content": "x"})
    assert missing == refused
    # Subscribed read-only: the same answer, and the subscription stays.
    await subscribe(client, room_id)
    assert await client.ask({"type": "message", "room_id": room_id, "content": "x"}) == refused
    other = await server.join(owner, room_id)
    await other.ask({"type": "message", "content": "still here"})
    assert (await client.recv())["data"]["content"] == "still here"


async def test_history_of_a_room_not_held_needs_read_only(server: Server) -> None:
    owner, reader, stranger = server.user(), server.user(), server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, reader.user, "r")
    writer = await server.join(owner, room_id)
    for n in range(3):
        await writer.ask({"type": "message", "content": f"m{n}"})
    client = await server.login(reader)
    await client.send({"type": "get_past_messages", "room_id": room_id, "limit": 2})
    frames = [await client.recv() for _ in range(3)]
    assert [f["data"]["content"] for f in frames[:2]] == ["m1", "m2"]
    assert all(f["data"]["history"] and f["data"]["room_id"] == room_id for f in frames[:2])
    assert frames[2] == {"type": "status", "data": "HISTORYEND", "count": 2}
    outsider = await server.login(stranger)
    forbidden = await outsider.ask({"type": "get_past_messages", "room_id": room_id})
    missing = await outsider.ask({"type": "get_past_messages", "room_id": 10**12})
    assert forbidden == missing == status("NOTAUTHORIZED")


async def test_revoking_one_room_names_it_and_keeps_the_others(server: Server) -> None:
    owner, member = server.user(), server.user()
    kept, lost = await rooms_of(server, owner, 2)
    for room_id in (kept, lost):
        await server.grant(owner, room_id, member.user, "rw")
    client = await server.join(member, kept)  # selected
    await subscribe(client, lost)
    await server.grant(owner, lost, member.user, "b")
    assert await client.recv() == status("NOTAUTHORIZED", lost)
    writer = await server.login(owner)
    await writer.ask({"type": "message", "room_id": lost, "content": "not for you"})
    await writer.ask({"type": "message", "room_id": kept, "content": "for you"})
    got = await client.recv()
    assert (got["data"]["room_id"], got["data"]["content"]) == (kept, "for you")
    assert await client.silent(0.2)
    # The selected room is untouched: commands without room_id still go there.
    echo = await client.ask({"type": "message", "content": "mine"})
    assert echo["data"]["room_id"] == kept


async def test_subscribe_with_since_replays_what_was_missed_then_goes_live(server: Server) -> None:
    owner = server.user()
    room_id = await server.create_room(owner)
    writer = await server.join(owner, room_id)
    for n in range(4):
        await writer.ask({"type": "message", "content": f"m{n}"})
    client = await server.login(owner)
    await client.send({"type": "subscribe", "room_id": room_id, "since": 2})
    assert await client.recv() == status("SUBSCRIBED", room_id)
    replay = [await client.recv() for _ in range(2)]
    assert [(f["data"]["seq"], f["data"]["history"]) for f in replay] == [(3, True), (4, True)]
    assert await client.recv() == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room_id,
        "count": 2,
        "complete": True,
    }
    await writer.ask({"type": "message", "content": "live"})
    live = await client.recv()
    assert (live["data"]["seq"], "history" in live["data"]) == (5, False)


async def test_select_room_leaves_its_previous_room_but_keeps_subscribed_ones(
    server: Server,
) -> None:
    owner = server.user()
    subscribed, selected, third = await rooms_of(server, owner, 3)
    client = await server.login(owner)
    await subscribe(client, subscribed)
    assert await client.ask({"type": "select_room", "room_id": selected}) == status("CONNECTED")
    assert await client.ask({"type": "select_room", "room_id": third}) == status("CONNECTED")
    writer = await server.login(owner)
    for room_id in (selected, subscribed, third):
        await writer.ask({"type": "message", "room_id": room_id, "content": str(room_id)})
    got = [await client.recv() for _ in range(2)]
    assert [f["data"]["room_id"] for f in got] == [subscribed, third]
    assert await client.silent(0.2)


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ({"type": "subscribe"}, "room_id is required"),
        ({"type": "subscribe", "room_id": "7"}, "room_id must be a positive integer"),
        ({"type": "subscribe", "room_id": 0}, "room_id must be a positive integer"),
        ({"type": "subscribe", "room_id": True}, "room_id must be a positive integer"),
        ({"type": "subscribe", "room_id": 7, "since": -1}, "since must be an integer seq >= 0"),
        ({"type": "unsubscribe", "room_id": [7]}, "room_id must be a positive integer"),
        ({"type": "unsubscribe"}, "room_id is required"),
        ({"type": "message", "room_id": 1.5, "content": "x"}, "room_id must be a positive integer"),
        ({"type": "get_past_messages", "room_id": "x"}, "room_id must be a positive integer"),
    ],
)
async def test_bad_room_ids_get_badargs_naming_the_field(
    server: Server, command: dict[str, Any], reason: str
) -> None:
    client = await server.login(server.user())
    assert await client.ask(command) == {"type": "status", "data": "BADARGS", "reason": reason}
    assert await client.ask({"type": "unsubscribe", "room_id": 5}) == status("UNSUBSCRIBED", 5)


async def test_an_unknown_room_is_answered_like_a_forbidden_one(server: Server) -> None:
    owner, stranger = server.user(), server.user()
    room_id = await server.create_room(owner)
    client = await server.login(stranger)
    forbidden = await client.ask({"type": "subscribe", "room_id": room_id})
    assert forbidden == status("NOTAUTHORIZED", room_id)
    missing_id = room_id + 10**9
    missing = await client.ask({"type": "subscribe", "room_id": missing_id})
    assert missing == status("NOTAUTHORIZED", missing_id)
    # Unsubscribing a room not held is answered as done: the client's wish holds.
    assert await client.ask({"type": "unsubscribe", "room_id": room_id}) == status(
        "UNSUBSCRIBED", room_id
    )


async def test_an_old_client_that_only_selects_sees_no_new_frames(server: Server) -> None:
    owner = server.user()
    first, second = await rooms_of(server, owner, 2)
    client = await server.join(owner, first)
    assert await client.ask({"type": "select_room", "room_id": second}) == status("CONNECTED")
    writer = await server.login(owner)
    await writer.ask({"type": "message", "room_id": first, "content": "old room"})
    await writer.ask({"type": "message", "room_id": second, "content": "new room"})
    got = await client.recv()
    assert got["data"]["content"] == "new room"
    assert await client.silent(0.2)
