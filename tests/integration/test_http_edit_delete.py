"""Edit and delete over HTTP, on both backends: ``PATCH`` and ``DELETE
/rooms/{id}/messages/{seq}`` run the WebSocket's use cases, answer the ``edited`` / ``deleted``
frame's ``data``, and the event reaches WebSocket subscribers in the room's seq order like one
made over the WebSocket; the same rules and refusals, in the side-port's words."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Client, Server, User

pytestmark = pytest.mark.asyncio

MISSING_ROOM = 2**62


def path(room_id: int | str, seq: int | str) -> str:
    return f"/rooms/{room_id}/messages/{seq}"


async def edit(
    server: Server, user: User, room_id: int | str, seq: int | str, content: Any
) -> tuple[int, dict[str, Any]]:
    return await server.call("PATCH", path(room_id, seq), user, {"content": content})


async def delete(
    server: Server, user: User, room_id: int | str, seq: int | str
) -> tuple[int, dict[str, Any]]:
    return await server.call("DELETE", path(room_id, seq), user)


async def room_with_member(server: Server) -> tuple[int, User, User]:
    """A room of ``owner`` (an owner-entity admin) where ``member`` may read and write."""
    owner, member = server.user(), server.user()
    room_id = await server.create_room(owner)
    await server.grant(owner, room_id, member.user, "rw")
    return room_id, owner, member


async def say(server: Server, user: User, room_id: int, content: str) -> int:
    status, data = await server.call(
        "POST", f"/rooms/{room_id}/messages", user, {"content": content}
    )
    assert status == 200, data
    seq: int = data["content"]["seq"]
    return seq


async def frame(client: Client) -> tuple[str, dict[str, Any]]:
    got = await client.recv()
    data: dict[str, Any] = got["data"]
    return got["type"], data


async def test_an_http_edit_reaches_websocket_subscribers_as_the_edited_frame_in_seq_order(
    server: Server,
) -> None:
    room, owner, member = await room_with_member(server)
    watcher = await server.join(owner, room)
    author = await server.join(member, room)
    first = await say(server, member, room, "helo")
    for client in (watcher, author):
        assert (await frame(client))[1]["seq"] == first

    status, data = await edit(server, member, room, first, "hello")
    assert status == 200, data
    answer = data["content"]
    assert (answer["seq"], answer["seq_edited"], answer["content"]) == (first + 1, first, "hello")
    assert (answer["room_id"], answer["emitter"]) == (room, member.user)
    assert "edited_at" in answer and "history" not in answer
    await author.send({"type": "message", "content": "after"})
    for client in (watcher, author):
        # The answer is the live frame's data, field for field, and the edit keeps its place.
        assert await frame(client) == ("edited", answer)
        kind, after = await frame(client)
        assert (kind, after["seq"], after["content"]) == ("message", first + 2, "after")
    status, data = await server.call("GET", f"/rooms/{room}/messages", owner)
    assert [(m["seq"], m["content"]) for m in data["content"]] == [
        (first, "hello"),
        (first + 2, "after"),
    ]


async def test_an_http_delete_by_the_author_reaches_subscribers_as_the_deleted_frame(
    server: Server,
) -> None:
    room, owner, member = await room_with_member(server)
    watcher = await server.join(owner, room)
    seq = await say(server, member, room, "oops")
    assert (await frame(watcher))[1]["seq"] == seq
    status, data = await delete(server, member, room, seq)
    assert status == 200, data
    answer = data["content"]
    assert answer == {
        "room_id": room,
        "seq": seq + 1,
        "seq_deleted": seq,
        "deleted_by": member.user,
        "deleted_at": answer["deleted_at"],
    }
    assert await frame(watcher) == ("deleted", answer)
    status, data = await server.call("GET", f"/rooms/{room}/messages", owner)
    assert [(m["seq"], m["content"], m.get("deleted")) for m in data["content"]] == [
        (seq, "", True)
    ]


async def test_a_room_admin_deletes_anothers_message_and_a_member_may_not(
    server: Server,
) -> None:
    room, owner, member = await room_with_member(server)
    other = server.user()
    await server.grant(owner, room, other.user, "rw")
    watcher = await server.join(other, room)
    seq = await say(server, member, room, "spam")
    assert (await frame(watcher))[1]["seq"] == seq
    status, data = await delete(server, other, room, seq)
    assert (status, data["meta"]["reason"]) == (403, "not the author of this message")
    status, data = await edit(server, other, room, seq, "mine now")
    assert (status, data["meta"]["reason"]) == (403, "not the author of this message")
    status, data = await edit(server, owner, room, seq, "admin edit")  # admins only delete
    assert (status, data["meta"]["reason"]) == (403, "not the author of this message")
    assert await watcher.silent(0.2)  # refusals take no seq and deliver nothing
    status, data = await delete(server, owner, room, seq)
    assert status == 200, data
    assert data["content"]["deleted_by"] == owner.user
    assert await frame(watcher) == ("deleted", data["content"])


async def test_a_deleted_message_can_be_neither_edited_nor_deleted_again(server: Server) -> None:
    room, owner, member = await room_with_member(server)
    seq = await say(server, member, room, "gone soon")
    assert (await delete(server, member, room, seq))[0] == 200
    for status, data in (
        await edit(server, member, room, seq, "back"),
        await delete(server, member, room, seq),
        await delete(server, owner, room, seq),
    ):
        assert (status, data["meta"]["reason"]) == (403, "the message was deleted")


async def test_a_seq_naming_no_message_is_404_no_such_message_in_a_readable_room(
    server: Server,
) -> None:
    """Unknown, and the seq of an edit event (the WebSocket's BADARGS): the seq is a path
    segment naming a resource, which is not there."""
    room, owner, member = await room_with_member(server)
    seq = await say(server, member, room, "text")
    status, data = await edit(server, member, room, seq, "text!")
    edit_seq = data["content"]["seq"]
    for target in (edit_seq, edit_seq + 1, 2**63 - 1):
        for status, data in (
            await edit(server, member, room, target, "x"),
            await delete(server, member, room, target),
        ):
            assert (status, data["meta"]["reason"]) == (404, "no such message"), target
    status, data = await server.call("GET", f"/rooms/{room}/messages", owner)
    assert [(m["seq"], m["content"]) for m in data["content"]] == [(seq, "text!")]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "content must be a string"),
        ({"content": None}, "content must be a string"),
        ({"content": 5}, "content must be a string"),
        ({"content": ["x"]}, "content must be a string"),
        ({"content": ""}, "content must not be empty"),
        ({"content": " \n\u3000"}, "content must not be empty"),
        ({"content": "a\u0000b"}, "content must not contain U+0000"),
        ({"content": "\ud800"}, "content must not contain a lone surrogate"),
        ({"content": "x" * 11}, "content must be at most 10 characters"),
        ({"content": "hi", "client_id": "k"}, "unknown field 'client_id'"),
        ({"content": "hi", "seq": 1}, "unknown field 'seq'"),
    ],
)
async def test_a_bad_edit_body_is_400_with_the_codec_reason_and_changes_nothing(
    server_factory: Any, body: dict[str, Any], reason: str
) -> None:
    server: Server = await server_factory(max_content=10)
    owner = server.user()
    room = await server.create_room(owner)
    seq = await say(server, owner, room, "kept")
    status, data = await server.call("PATCH", path(room, seq), owner, body)
    assert (status, data["meta"]["reason"]) == (400, reason)
    # What a post accepts, an edit accepts: max_content code points, controls but NUL.
    status, data = await edit(server, owner, room, seq, "\U0001f600\n\t\x85" + "x" * 6)
    assert status == 200, data
    assert data["content"]["seq"] == seq + 1  # the refused edit took no seq


@pytest.mark.parametrize("seq", ["0", "-1", "1.5", "abc", "1e3", "+1", "9223372036854775808"])
async def test_a_bad_seq_in_the_path_is_400(server: Server, seq: str) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    await say(server, owner, room, "kept")
    for status, data in (
        await edit(server, owner, room, seq, "x"),
        await delete(server, owner, room, seq),
    ):
        assert (status, data["meta"]["reason"]) == (400, "seq must be a positive integer")


async def test_an_edit_body_that_is_not_json_is_refused(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    seq = await say(server, owner, room, "kept")
    url = server.http_url + path(room, seq)
    auth = {"Authorization": f"Bearer {owner.token}"}
    for raw, content_type, status, reason in (
        (b"{", "application/json", 400, "invalid JSON"),
        (b'["x"]', "application/json", 400, "body must be a JSON object"),
        (b"content=x", "application/x-www-form-urlencoded", 415, None),
    ):
        headers = {**auth, "Content-Type": content_type}
        async with server.http.patch(url, data=raw, headers=headers) as resp:
            data = await resp.json()
            assert resp.status == status, raw
            assert reason is None or data["meta"]["reason"] == reason


async def test_no_write_right_is_403_and_a_room_not_readable_is_404_like_a_missing_one(
    server: Server,
) -> None:
    room, owner, member = await room_with_member(server)
    seq = await say(server, member, room, "mine")
    await server.grant(owner, room, member.user, "r")  # read only from now on
    for status, data in (
        await edit(server, member, room, seq, "still mine"),
        await delete(server, member, room, seq),
    ):
        assert (status, data["meta"]["reason"]) == (403, "write permission required")
    outsider = server.user(level=1000)
    deleted = await server.create_room(owner)
    await say(server, owner, deleted, "x")
    assert (await server.call("DELETE", f"/rooms/{deleted}", owner))[0] == 200
    missing = await edit(server, outsider, MISSING_ROOM, 1, "x")
    assert missing[0] == 404 and missing[1]["meta"]["reason"] == "no such room"
    assert await edit(server, outsider, room, seq, "x") == missing
    assert await edit(server, owner, deleted, 1, "x") == missing
    gone = await delete(server, outsider, MISSING_ROOM, 1)
    assert gone == missing
    assert await delete(server, outsider, room, seq) == gone
    assert await delete(server, owner, deleted, 1) == gone
    status, data = await server.call("GET", f"/rooms/{room}/messages", owner)
    assert [(m["seq"], m["content"]) for m in data["content"]] == [(seq, "mine")]


async def test_a_subscriber_not_live_yet_gets_the_http_edit_on_resume(server: Server) -> None:
    """An HTTP edit is a room event like any other: a resume replays it in its place."""
    room, owner, member = await room_with_member(server)
    seq = await say(server, member, room, "a")
    status, data = await edit(server, member, room, seq, "b")
    assert status == 200, data
    client = await server.login(owner)
    reply = await client.ask({"type": "select_room", "room_id": room, "since": 0})
    assert reply == {"type": "status", "data": "CONNECTED"}
    kinds = [await frame(client), await frame(client)]
    assert [(k, d["seq"], d.get("history")) for k, d in kinds] == [
        ("message", seq, True),
        ("edited", seq + 1, True),
    ]
    assert {**kinds[1][1], "history": None} == {**data["content"], "history": None}
