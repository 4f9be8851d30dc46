"""Publishing over HTTP: ``POST /rooms/{id}/messages`` stores and delivers a message exactly as
a WebSocket send does (one seq stream, one client_id idempotency, live delivery to WebSocket
receivers), on each backend, with its permission, input and storage answers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Client, Server, User

pytestmark = pytest.mark.asyncio

MISSING_ROOM = 2**62


def path(room_id: int | str) -> str:
    return f"/rooms/{room_id}/messages"


async def posted(server: Server, user: User, room_id: int, body: dict[str, Any]) -> dict[str, Any]:
    status, data = await server.call("POST", path(room_id), user, body)
    assert status == 200, data
    message: dict[str, Any] = data["content"]
    return message


async def live(client: Client) -> dict[str, Any]:
    """The next frame, which must be a live message frame; its data."""
    frame = await client.recv()
    assert frame["type"] == "message", frame
    data: dict[str, Any] = frame["data"]
    return data


async def test_a_message_posted_over_http_reaches_websocket_receivers_live_in_seq_order(
    server: Server,
) -> None:
    owner, member = server.user(), server.user()
    room = await server.create_room(owner)
    await server.grant(owner, room, member.user, "rw")
    sender = await server.join(member, room)
    watcher = await server.join(owner, room)

    await sender.send({"type": "message", "content": "first"})
    assert (await live(watcher))["seq"] == 1
    assert (await live(sender))["seq"] == 1
    answer = await posted(server, owner, room, {"content": "over http"})
    await sender.send({"type": "message", "content": "third"})

    for client in (watcher, sender):
        frame = await live(client)
        assert frame == answer  # the HTTP answer is the live frame's data, field for field
        assert (frame["seq"], frame["content"], frame["emitter"]) == (2, "over http", owner.user)
        assert "system" not in frame and "history" not in frame
        third = await live(client)
        assert (third["seq"], third["content"]) == (3, "third")
    status, data = await server.call("GET", path(room), owner)
    assert status == 200
    assert [(m["seq"], m["content"]) for m in data["content"]] == [
        (1, "first"),
        (2, "over http"),
        (3, "third"),
    ]


async def test_a_client_id_repeat_over_http_then_websocket_answers_the_stored_message_once(
    server: Server,
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    watcher = await server.join(owner, room)
    author = server.user(entity=owner.entity)  # admitted by the entity's rw rule
    first = await posted(server, author, room, {"content": "hello", "client_id": "k-1"})
    assert (first["seq"], first["client_id"]) == (1, "k-1")
    assert await live(watcher) == first

    again = await posted(server, author, room, {"content": "changed", "client_id": "k-1"})
    assert again == first  # 200, the message stored the first time, not the new content
    ws = await server.join(author, room)
    await ws.send({"type": "message", "content": "over ws", "client_id": "k-1"})
    assert await live(ws) == first  # the sender alone gets the stored message again
    # Nobody received the repeats: the next live frame is the next message.
    await ws.send({"type": "message", "content": "next"})
    assert ((await live(watcher))["seq"], (await live(ws))["seq"]) == (2, 2)
    status, data = await server.call("GET", path(room), owner)
    assert status == 200 and [m["seq"] for m in data["content"]] == [1, 2]


async def test_a_websocket_client_id_repeated_over_http_is_not_delivered_again(
    server: Server,
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    ws = await server.join(owner, room)
    await ws.send({"type": "message", "content": "from ws", "client_id": "same"})
    first = await live(ws)
    assert await posted(server, owner, room, {"content": "x", "client_id": "same"}) == first
    assert await ws.silent(0.3)


async def test_system_message_by_a_room_admin_is_marked_live_and_in_history(
    server: Server,
) -> None:
    owner, delegate = server.user(), server.user()
    room = await server.create_room(owner)
    await server.grant(owner, room, delegate.user, "a")  # a room admin by rule
    watcher = await server.join(owner, room)
    for admin, text in ((owner, "case opened"), (delegate, "document attached")):
        answer = await posted(server, admin, room, {"content": text, "system": True})
        assert answer["system"] is True
        frame = await live(watcher)
        assert frame == answer and frame["content"] == text
    status, data = await server.call("GET", path(room), owner)
    assert status == 200
    assert [(m["content"], m.get("system")) for m in data["content"]] == [
        ("case opened", True),
        ("document attached", True),
    ]
    # "system": false is a plain message.
    plain = await posted(server, owner, room, {"content": "plain", "system": False})
    assert "system" not in plain


async def test_system_message_by_a_writer_who_is_not_admin_is_403_and_not_stored(
    server: Server,
) -> None:
    owner, writer = server.user(), server.user()
    room = await server.create_room(owner)
    await server.grant(owner, room, writer.user, "rw")
    watcher = await server.join(owner, room)
    status, data = await server.call(
        "POST", path(room), writer, {"content": "official", "system": True}
    )
    assert (status, data["meta"]["reason"]) == (
        403,
        "system messages need admin rights in the room",
    )
    assert await watcher.silent(0.3)
    assert (await posted(server, writer, room, {"content": "plain"}))["seq"] == 1


async def test_a_reader_without_write_gets_403_and_outsiders_404_like_a_missing_room(
    server: Server,
) -> None:
    owner, reader, outsider = server.user(), server.user(), server.user(level=1000)
    room = await server.create_room(owner)
    await server.grant(owner, room, reader.user, "r")
    deleted = await server.create_room(owner)
    assert (await server.call("DELETE", f"/rooms/{deleted}", owner))[0] == 200
    body = {"content": "hi"}
    status, data = await server.call("POST", path(room), reader, body)
    assert (status, data["meta"]["reason"]) == (403, "write permission required")
    missing = await server.call("POST", path(MISSING_ROOM), outsider, body)
    assert missing[0] == 404 and missing[1]["meta"]["reason"] == "no such room"
    assert await server.call("POST", path(room), outsider, body) == missing
    assert await server.call("POST", path(deleted), owner, body) == missing
    status, data = await server.call("GET", path(room), owner)
    assert (status, data["content"]) == (200, [])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "content must be a string"),
        ({"content": None}, "content must be a string"),
        ({"content": 5}, "content must be a string"),
        ({"content": ""}, "content must not be empty"),
        ({"content": "a\u0000b"}, "content must not contain U+0000"),
        ({"content": "\ud800"}, "content must not contain a lone surrogate"),
        ({"content": "x" * 11}, "content must be at most 10 characters"),
        (
            {"content": "hi", "client_id": None},
            "client_id must not be null (leave it out for none)",
        ),
        ({"content": "hi", "client_id": ""}, "client_id must be a string of 1-64 characters"),
        ({"content": "hi", "client_id": 7}, "client_id must be a string of 1-64 characters"),
        ({"content": "hi", "client_id": "k" * 65}, "client_id must be a string of 1-64 characters"),
        ({"content": "hi", "client_id": "\u0000"}, "client_id must not contain U+0000"),
        ({"content": "hi", "client_id": "\udfff"}, "client_id must not contain a lone surrogate"),
        ({"content": "hi", "system": None}, "field 'system' must be a boolean"),
        ({"content": "hi", "system": "true"}, "field 'system' must be a boolean"),
        ({"content": "hi", "room_id": 1}, "unknown field 'room_id'"),
    ],
)
async def test_bad_input_is_400_with_the_websocket_codec_reason_and_stores_nothing(
    server_factory: Any, body: dict[str, Any], reason: str
) -> None:
    server: Server = await server_factory(max_content=10)
    owner = server.user()
    room = await server.create_room(owner)
    status, data = await server.call("POST", path(room), owner, body)
    assert (status, data["meta"]["reason"]) == (400, reason)
    # The same checks let through what the WebSocket lets through: exactly max_content code
    # points, newlines and other control characters but NUL.
    ok = await posted(server, owner, room, {"content": "\U0001f600\n\t\x85" + "x" * 6})
    assert ok["seq"] == 1


async def test_a_body_that_is_not_a_json_object_is_400(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    url = server.http_url + path(room)
    headers = {"Authorization": f"Bearer {owner.token}", "Content-Type": "application/json"}
    for raw, reason in (
        (b"{", "invalid JSON"),
        (b"\xff", "invalid JSON"),
        (b'["hi"]', "body must be a JSON object"),
        (b'"\\ud800"', "body must be a JSON object"),
    ):
        async with server.http.post(url, data=raw, headers=headers) as resp:
            data = await resp.json()
            assert (resp.status, data["meta"]["reason"]) == (400, reason), raw


async def test_storage_refusing_new_messages_is_503_and_nothing_is_delivered(
    server: Server,
) -> None:
    """The writer refuses once it is closing (as at shutdown): StoreUnavailable, as when the
    database is down, which the use case passes through and the side-port answers 503."""
    owner = server.user()
    room = await server.create_room(owner)
    watcher = await server.join(owner, room)
    await server.app.writer.close()
    status, data = await server.call("POST", path(room), owner, {"content": "lost"})
    assert (status, data["meta"]["reason"]) == (503, "storage unavailable")
    assert await watcher.silent(0.3)
