"""Read marks over a real WebSocket, on both backends: the ``read`` command answers the mark
held (never backwards, clamped), the room's other subscribers get coalesced ``read``
receipts (the reader's own connection does not), a mark moved over HTTP sends the same
receipts, and bad input gets a precise answer."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Client, Server, User
from tests.integration.test_faults import storage_outage

pytestmark = pytest.mark.asyncio

NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}


async def room_with_member(server: Server) -> tuple[int, User, User]:
    owner = server.user()
    member = server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, member.user, "rw")
    return room_id, owner, member


async def say(client: Client, content: str) -> int:
    echo = await client.ask({"type": "message", "content": content})
    assert echo["type"] == "message", echo
    seq: int = echo["data"]["seq"]
    return seq


def readmark(room_id: int, seq: int) -> dict[str, Any]:
    return {"type": "status", "data": "READMARK", "room_id": room_id, "seq": seq}


def receipt(room_id: int, user: str, seq: int) -> dict[str, Any]:
    return {"type": "read", "data": {"room_id": room_id, "user": user, "seq": seq}}


async def filled(server: Server, n: int) -> tuple[int, User, User, Client, Client]:
    """A room with ``n`` messages of the owner; the owner (watcher) and the member (reader)
    each connected to it, the watcher past the messages."""
    room_id, owner, member = await room_with_member(server)
    watcher = await server.join(owner, room_id)
    for i in range(n):
        await say(watcher, f"m{i}")
    reader = await server.join(member, room_id)
    return room_id, owner, member, watcher, reader


async def test_read_answers_the_mark_held_never_backwards_and_clamped(server: Server) -> None:
    room_id, _owner, _member, _watcher, reader = await filled(server, 3)
    assert await reader.ask({"type": "read", "seq": 2}) == readmark(room_id, 2)
    assert await reader.ask({"type": "read", "seq": 1}) == readmark(room_id, 2)  # not back
    assert await reader.ask({"type": "read", "seq": 99, "room_id": room_id}) == readmark(
        room_id, 3
    )  # clamped to the latest seq
    assert await reader.ask({"type": "read", "seq": 0}) == readmark(room_id, 3)


async def test_another_subscriber_gets_the_receipt_and_the_reader_does_not(
    server: Server,
) -> None:
    room_id, _owner, member, watcher, reader = await filled(server, 2)
    assert await reader.ask({"type": "read", "seq": 2}) == readmark(room_id, 2)
    assert await watcher.recv() == receipt(room_id, member.user, 2)
    assert await reader.silent(0.3)  # its own receipt is not sent back to it


async def test_a_burst_of_twenty_reads_gives_at_most_two_receipts_the_last_with_the_final_seq(
    server: Server,
) -> None:
    room_id, _owner, member, watcher, reader = await filled(server, 20)
    for seq in range(1, 21):
        await reader.send({"type": "read", "seq": seq})
    for seq in range(1, 21):
        assert await reader.recv() == readmark(room_id, seq)
    got = []
    for _ in range(3):  # bounded: the first, then the last when its second ends
        frame = await watcher.recv(timeout=3.0)
        got.append(frame)
        if frame["data"]["seq"] == 20:
            break
    assert got[-1] == receipt(room_id, member.user, 20)
    assert len(got) <= 2 and all(f["type"] == "read" for f in got)
    assert await watcher.silent(1.3)  # nothing more after the final mark


async def test_a_mark_moved_over_http_sends_the_same_receipt(server: Server) -> None:
    room_id, _owner, member, watcher, _reader = await filled(server, 2)
    status, body = await server.call("POST", f"/rooms/{room_id}/read", member, {"seq": 2})
    assert status == 200 and body["content"] == {"room_id": room_id, "seq": 2}
    assert await watcher.recv() == receipt(room_id, member.user, 2)


async def test_a_subscriber_of_another_room_gets_no_receipt(server: Server) -> None:
    room_id, owner, member = await room_with_member(server)
    other_room = await server.create_room(owner)
    elsewhere = await server.join(owner, other_room)
    reader = await server.join(member, room_id)
    await say(reader, "x")
    assert await reader.ask({"type": "read", "seq": 1}) == readmark(room_id, 1)
    assert await elsewhere.silent(0.3)


async def test_a_read_of_a_room_not_held_needs_only_read_access(server: Server) -> None:
    room_id, owner, member = await room_with_member(server)
    watcher = await server.join(owner, room_id)
    await say(watcher, "hello")
    reader = await server.login(member)  # selects nothing
    assert await reader.ask({"type": "read", "seq": 1, "room_id": room_id}) == readmark(room_id, 1)
    assert await watcher.recv() == receipt(room_id, member.user, 1)
    assert await reader.ask({"type": "read", "seq": 1}) == {
        "type": "query",
        "data": "SELECTROOM?",
    }


async def test_bad_read_commands_get_a_precise_answer(server: Server) -> None:
    room_id, owner, _member = await room_with_member(server)
    reader = await server.join(owner, room_id)
    for command, reason in [
        ({"type": "read"}, "seq is required"),
        ({"type": "read", "seq": "3"}, "seq must be an integer >= 0"),
        ({"type": "read", "seq": -1}, "seq must be an integer >= 0"),
        ({"type": "read", "seq": 1.5}, "seq must be an integer >= 0"),
        ({"type": "read", "seq": True}, "seq must be an integer >= 0"),
        ({"type": "read", "seq": 1, "room_id": "x"}, "room_id must be a positive integer"),
    ]:
        assert await reader.ask(command) == {
            "type": "status",
            "data": "BADARGS",
            "reason": reason,
        }, command
    stranger = await server.login(server.user())
    assert await stranger.ask({"type": "read", "seq": 1, "room_id": room_id}) == NOTAUTHORIZED
    assert await stranger.ask({"type": "read", "seq": 1, "room_id": 999999}) == NOTAUTHORIZED


async def test_receipts_wait_for_no_replay_and_never_break_the_seq_order(server: Server) -> None:
    room_id, owner, member = await room_with_member(server)
    writer = await server.join(owner, room_id)
    for i in range(3):
        await say(writer, f"m{i}")
    reader = await server.join(member, room_id)
    watcher = await server.login(owner)
    assert await watcher.ask({"type": "subscribe", "room_id": room_id, "since": 0}) == {
        "type": "status",
        "data": "SUBSCRIBED",
        "room_id": room_id,
    }
    frames = [await watcher.recv() for _ in range(4)]
    assert [f["data"].get("seq") for f in frames[:3]] == [1, 2, 3]
    assert frames[3]["data"] == "RESUMED"
    await reader.ask({"type": "read", "seq": 3})
    assert await writer.recv() == receipt(room_id, member.user, 3)
    await say(writer, "after")
    got = [await watcher.recv(), await watcher.recv()]
    kinds = sorted(f["type"] for f in got)
    assert kinds == ["message", "read"]
    message = next(f for f in got if f["type"] == "message")
    assert message["data"]["seq"] == 4


async def test_storage_down_answers_unavailable_and_sends_no_receipt(server: Server) -> None:
    room_id, _owner, member, watcher, reader = await filled(server, 1)
    async with storage_outage(server):
        await reader.send({"type": "read", "seq": 1})
        assert await reader.recv(timeout=10) == {"type": "status", "data": "UNAVAILABLE"}
    assert await watcher.silent(0.2)
    assert await reader.ask({"type": "read", "seq": 1}) == readmark(room_id, 1)
    assert await watcher.recv() == receipt(room_id, member.user, 1)
