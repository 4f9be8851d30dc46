"""Edit and delete over a real WebSocket, on both backends: the room's ``edited`` and
``deleted`` frames take their place in the seq stream between messages, the rules (author
only for edit, author or room admin for delete), and resume and history bringing them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Client, Server, User

pytestmark = pytest.mark.asyncio

NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}


async def room_with_member(server: Server) -> tuple[int, User, User]:
    """A room of ``owner`` (an owner-entity admin) where ``member`` may read and write."""
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


async def test_an_edit_reaches_every_subscriber_in_seq_order_between_messages(
    server: Server,
) -> None:
    room_id, owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    watcher = await server.join(owner, room_id)
    first = await say(author, "hello")
    assert (await watcher.recv())["data"]["seq"] == first
    edited = await author.ask({"type": "edit", "seq": first, "content": "hello!"})
    assert edited["type"] == "edited"
    data = edited["data"]
    assert (data["seq"], data["seq_edited"], data["content"], data["room_id"]) == (
        first + 1,
        first,
        "hello!",
        room_id,
    )
    assert data["emitter"] == member.user and "edited_at" in data
    second = await say(author, "after")
    assert second == first + 2
    got = [await watcher.recv(), await watcher.recv()]
    assert [(f["type"], f["data"]["seq"]) for f in got] == [
        ("edited", first + 1),
        ("message", second),
    ]
    assert got[0] == edited
    assert await watcher.silent(0.2)


async def test_the_author_and_a_room_admin_delete_and_the_room_gets_deleted(
    server: Server,
) -> None:
    room_id, owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    admin = await server.join(owner, room_id)
    own = await say(author, "mine")
    other = await say(author, "also mine")
    await admin.recv(), await admin.recv()
    by_author = await author.ask({"type": "delete", "seq": own})
    assert by_author["type"] == "deleted"
    assert set(by_author["data"]) == {"room_id", "seq", "seq_deleted", "deleted_by", "deleted_at"}
    assert (by_author["data"]["seq_deleted"], by_author["data"]["deleted_by"]) == (
        own,
        member.user,
    )
    assert await admin.recv() == by_author
    by_admin = await admin.ask({"type": "delete", "seq": other, "room_id": room_id})
    assert (by_admin["type"], by_admin["data"]["deleted_by"]) == ("deleted", owner.user)
    assert by_admin["data"]["seq"] == by_author["data"]["seq"] + 1
    assert await author.recv() == by_admin


async def test_edit_or_delete_of_anothers_message_is_notauthorized(server: Server) -> None:
    room_id, owner, member = await room_with_member(server)
    author = await server.join(owner, room_id)
    other = await server.join(member, room_id)
    seq = await say(author, "the owner's")
    await other.recv()
    assert await other.ask({"type": "edit", "seq": seq, "content": "x"}) == NOTAUTHORIZED
    assert await other.ask({"type": "delete", "seq": seq}) == NOTAUTHORIZED
    # Even a room admin edits only their own messages.
    theirs = await say(other, "the member's")
    await author.recv()
    assert await author.ask({"type": "edit", "seq": theirs, "content": "x"}) == NOTAUTHORIZED
    assert await author.silent(0.2) and await other.silent(0.1)


async def test_an_unknown_seq_is_badargs_and_a_deleted_message_is_notauthorized(
    server: Server,
) -> None:
    room_id, _owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    reply = await author.ask({"type": "edit", "seq": 99, "content": "x"})
    assert (reply["data"], reply["reason"]) == ("BADARGS", "no message has seq 99")
    reply = await author.ask({"type": "delete", "seq": 99})
    assert reply["data"] == "BADARGS"
    seq = await say(author, "soon gone")
    assert (await author.ask({"type": "delete", "seq": seq}))["type"] == "deleted"
    assert await author.ask({"type": "edit", "seq": seq, "content": "x"}) == NOTAUTHORIZED
    assert await author.ask({"type": "delete", "seq": seq}) == NOTAUTHORIZED


async def test_bad_edit_and_delete_commands_get_a_precise_badargs(server: Server) -> None:
    room_id, _owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    for command, reason in [
        ({"type": "edit", "content": "x"}, "seq is required"),
        ({"type": "edit", "seq": "1", "content": "x"}, "seq must be a positive integer"),
        ({"type": "edit", "seq": 1}, "content must be a string"),
        ({"type": "edit", "seq": 1, "content": ""}, "content must not be empty"),
        ({"type": "delete", "seq": True}, "seq must be a positive integer"),
        ({"type": "delete", "seq": 1, "room_id": -1}, "room_id must be a positive integer"),
    ]:
        assert await author.ask(command) == {
            "type": "status",
            "data": "BADARGS",
            "reason": reason,
        }, command


async def test_a_room_not_writable_or_not_held_answers_like_a_send(server: Server) -> None:
    room_id, owner, member = await room_with_member(server)
    reader = server.user()
    await server.grant(owner, room_id, reader.user, "r")
    author = await server.join(owner, room_id)
    seq = await say(author, "x")
    ro = await server.join(reader, room_id)
    assert await ro.ask({"type": "delete", "seq": seq}) == NOTAUTHORIZED
    stranger = await server.login(server.user())
    assert await stranger.ask({"type": "delete", "seq": seq, "room_id": room_id}) == NOTAUTHORIZED
    # Not held but writable: the event frame is the acknowledgement.
    poster = await server.login(member)
    own = await poster.ask({"type": "message", "room_id": room_id, "content": "m"})
    ack = await poster.ask(
        {"type": "edit", "room_id": room_id, "seq": own["data"]["seq"], "content": "m2"}
    )
    assert (ack["type"], ack["data"]["content"]) == ("edited", "m2")
    assert await poster.silent(0.2)


async def test_a_resume_brings_the_edits_and_deletes_made_meanwhile(server: Server) -> None:
    room_id, owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    first = await say(author, "one")
    second = await say(author, "two")
    edit = await author.ask({"type": "edit", "seq": first, "content": "one!"})
    delete = await author.ask({"type": "delete", "seq": second})
    back = await server.login(owner)
    reply = await back.ask({"type": "select_room", "room_id": room_id, "since": second})
    assert reply == {"type": "status", "data": "CONNECTED"}
    replay = [await back.recv(), await back.recv()]
    assert replay == [
        {"type": "edited", "data": {**edit["data"], "history": True}},
        {"type": "deleted", "data": {**delete["data"], "history": True}},
    ]
    assert await back.recv() == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room_id,
        "count": 2,
        "complete": True,
    }
    # Live again: the next event follows without a gap.
    assert (await say(author, "three")) == delete["data"]["seq"] + 1
    assert (await back.recv())["data"]["seq"] == delete["data"]["seq"] + 1


async def test_history_shows_a_tombstone_and_the_edit_and_delete_events(server: Server) -> None:
    room_id, _owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    first = await say(author, "kept")
    second = await say(author, "secret")
    await author.ask({"type": "edit", "seq": first, "content": "kept!"})
    await author.ask({"type": "delete", "seq": second})
    await author.send({"type": "get_past_messages"})
    frames = [await author.recv() for _ in range(4)]
    end = await author.recv()
    assert end == {"type": "status", "data": "HISTORYEND", "count": 4}
    kinds = [(f["type"], f["data"]["seq"]) for f in frames]
    assert kinds == [("message", 1), ("message", 2), ("edited", 3), ("deleted", 4)]
    assert all(f["data"]["history"] is True for f in frames)
    assert frames[0]["data"]["content"] == "kept!" and "edited_at" in frames[0]["data"]
    tomb: dict[str, Any] = frames[1]["data"]
    assert (tomb["content"], tomb["deleted"], tomb["deleted_by"]) == ("", True, member.user)
    assert "secret" not in str(frames)


async def test_edits_and_deletes_are_pipelined_like_sends_and_acknowledged_in_order(
    server: Server,
) -> None:
    """A client may send edits and deletes without waiting for each answer, between sends:
    they go to the batching writer with the sends (no transaction of their own) and each is
    acknowledged, in command order, by its frame through the room, a refusal by its status."""
    room_id, owner, member = await room_with_member(server)
    author = await server.join(member, room_id)
    seqs = [await say(author, f"m{n}") for n in range(4)]
    live_elsewhere = await server.create_room(owner)  # not the member's; its rules kept here
    await server.join(owner, live_elsewhere)
    not_live = await server.create_room(owner)  # not the member's; its rules read from storage
    writer = server.app.writer
    stored_before = writer.messages
    commands: list[dict[str, Any]] = [
        {"type": "edit", "seq": seqs[0], "content": "m0!"},
        {"type": "edit", "seq": seqs[1], "content": "m1!"},
        {"type": "message", "content": "between"},
        {"type": "edit", "seq": 1, "content": "x", "room_id": live_elsewhere},  # refused now
        {"type": "delete", "seq": seqs[2]},
        {"type": "delete", "seq": seqs[2]},  # already deleted by the command before
        {"type": "delete", "seq": 1, "room_id": not_live},  # refused after a read
        {"type": "edit", "seq": seqs[0], "content": "m0!!"},
        {"type": "delete", "seq": seqs[3]},
    ]
    for command in commands:
        await author.send(command)
    got = [await author.recv() for _ in commands]
    last = seqs[-1]
    assert [(f["type"], f["data"] if f["type"] == "status" else f["data"]["seq"]) for f in got] == [
        ("edited", last + 1),
        ("edited", last + 2),
        ("message", last + 3),
        ("status", "NOTAUTHORIZED"),
        ("deleted", last + 4),
        ("status", "NOTAUTHORIZED"),
        ("status", "NOTAUTHORIZED"),
        ("edited", last + 5),
        ("deleted", last + 6),
    ]
    assert [got[n]["data"]["seq_edited"] for n in (0, 1, 7)] == [seqs[0], seqs[1], seqs[0]]
    assert got[7]["data"]["content"] == "m0!!"
    # Each command of its own room went through the writer, the refused delete included.
    assert writer.messages - stored_before == len(commands) - 2
    assert await author.silent(0.2)
