"""The /chat protocol end to end: a real server, real WebSockets, on both backends."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.conftest import Server, ServerFactory

pytestmark = pytest.mark.asyncio

START = {"type": "query", "data": "START?"}
READY = {"type": "status", "data": "READY"}
BADAUTH = {"type": "status", "data": "BADAUTH"}
TOKEN_Q = {"type": "query", "data": "TOKEN?"}
COMMAND_Q = {"type": "query", "data": "COMMAND?"}
SELECTROOM_Q = {"type": "query", "data": "SELECTROOM?"}
CONNECTED = {"type": "status", "data": "CONNECTED"}
NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}
BADJSON = {"type": "status", "data": "BADJSON"}


async def test_normal_path_start_token_select_message_history_quit(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.connect()
    assert await client.recv() == START
    assert await client.ask({"type": "token", "content": owner.token}) == READY
    assert await client.ask({"type": "message", "content": "before select"}) == SELECTROOM_Q
    assert await client.ask({"type": "get_past_messages"}) == SELECTROOM_Q
    assert await client.ask({"type": "select_room", "room_id": room}) == CONNECTED
    echo = await client.ask({"type": "message", "content": "hello 1"})
    assert echo["type"] == "message"
    data = echo["data"]
    assert data["content"] == "hello 1" and data["emitter"] == owner.user
    assert data["entity"] == owner.entity and data["room_id"] == room and data["seq"] == 1
    assert isinstance(data["id"], int) and data["created_at"].endswith("Z")
    assert data["createdAt"] == data["created_at"]
    second = await client.ask({"type": "message", "content": "hello 2"})
    assert second["data"]["seq"] == 2
    await client.send({"type": "get_past_messages"})
    history = [await client.recv() for _ in range(3)]
    assert [m["data"]["content"] for m in history[:2]] == ["hello 1", "hello 2"]
    assert history[2] == {"type": "status", "data": "HISTORYEND", "count": 2}
    assert await client.ask({"type": "frobnicate"}) == COMMAND_Q
    assert await client.ask({"content": "no type"}) == COMMAND_Q
    await client.send({"type": "quit"})
    assert await client.expect_close() == 1000


async def test_every_member_receives_each_message_once_in_seq_order(server: Server) -> None:
    owner = server.user()
    mate = server.user(entity=owner.entity)  # entity rule rw at level 100 admits her
    room = await server.create_room(owner)
    a = await server.join(owner, room)
    b = await server.join(mate, room)
    for i in range(20):
        await (a if i % 2 else b).send({"type": "message", "content": f"m{i}"})
    for client in (a, b):
        seqs = [(await client.recv())["data"]["seq"] for _ in range(20)]
        assert seqs == list(range(1, 21))
        assert await client.silent(0.2)


async def test_bad_tokens_three_times_close_1008(server: Server) -> None:
    client = await server.connect()
    assert await client.recv() == START
    assert await client.ask({"type": "token", "content": "not.a.jwt"}) == BADAUTH
    wrong_key = server.user().token[:-4] + "AAAA"
    assert await client.ask({"type": "token", "content": wrong_key}) == BADAUTH
    expired = server.user(ttl=-3600).token
    assert await client.ask({"type": "token", "content": expired}) == BADAUTH
    assert await client.expect_close() == 1008


async def test_commands_before_auth_get_token_query_and_count_as_trials(server: Server) -> None:
    client = await server.connect()
    await client.recv()
    assert await client.ask({"type": "select_room", "room_id": 1}) == TOKEN_Q
    assert await client.ask({"type": "message", "content": "x"}) == TOKEN_Q
    assert await client.ask({"type": "token", "content": 5}) == BADAUTH
    assert await client.expect_close() == 1008


async def test_quit_before_auth_closes_1000(server: Server) -> None:
    client = await server.connect()
    await client.recv()
    await client.send({"type": "quit"})
    assert await client.expect_close() == 1000


@pytest.mark.parametrize("frame", ["{not json", "null", "[]", "1", '"token"'])
async def test_non_object_frames_get_badjson_and_close_1003(server: Server, frame: str) -> None:
    client = await server.connect()
    await client.recv()
    assert await client.ask(frame) == BADJSON
    assert await client.expect_close() == 1003


async def test_badjson_after_auth_closes_only_that_connection(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    bystander = await server.join(owner, room)
    client = await server.login(owner)
    assert await client.ask("{not json") == BADJSON
    assert await client.expect_close() == 1003
    echo = await bystander.ask({"type": "message", "content": "still here"})
    assert echo["data"]["content"] == "still here"


async def test_binary_frames_are_read_as_utf8_text(server: Server) -> None:
    user = server.user()
    client = await server.connect()
    await client.recv()
    assert await client.ask(b'{"type":"token","content":"' + user.token.encode() + b'"}') == READY
    assert await client.ask(b"\xff\xfe") == BADJSON
    assert await client.expect_close() == 1003


async def test_invalid_utf8_text_frame_closes_1007(server: Server) -> None:
    client = await server.connect()
    await client.recv()
    # websockets refuses to send invalid UTF-8 as text; write the raw frame ourselves.
    from websockets.frames import Frame, Opcode

    client.ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
    client.ws.send_data()
    assert await client.expect_close() == 1007


async def test_frame_over_limit_closes_1009(server_factory: ServerFactory) -> None:
    server = await server_factory(max_frame=1024)
    client = await server.connect()
    await client.recv()
    await client.send({"type": "token", "content": "x" * 2000})
    assert await client.expect_close() == 1009


async def test_fragmented_message_is_reassembled(server: Server) -> None:
    user = server.user()
    client = await server.connect()
    await client.recv()
    frame = '{"type":"token","content":"' + user.token + '"}'
    await client.ws.send([frame[:10], frame[10:30], frame[30:]])
    assert await client.recv() == READY


async def test_select_room_rules_and_string_ids(server: Server) -> None:
    owner = server.user()
    stranger = server.user()
    room = await server.create_room(owner)
    client = await server.login(owner)
    assert await client.ask({"type": "select_room", "room_id": str(room)}) == CONNECTED
    outsider = await server.login(stranger)
    assert await outsider.ask({"type": "select_room", "room_id": room}) == NOTAUTHORIZED
    assert await outsider.ask({"type": "select_room", "room_id": 999_999_999}) == NOTAUTHORIZED
    bad = await outsider.ask({"type": "select_room", "room_id": "abc"})
    assert bad["data"] == "BADARGS" and "room_id" in bad["reason"]
    assert await outsider.ask({"type": "message", "content": "x"}) == SELECTROOM_Q


async def test_failed_select_leaves_previous_room(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    watcher = await server.join(owner, room)
    client = await server.join(owner, room)
    assert await client.ask({"type": "select_room", "room_id": 999_999_999}) == NOTAUTHORIZED
    await watcher.send({"type": "message", "content": "after"})
    assert (await watcher.recv())["data"]["content"] == "after"
    assert await client.silent(0.3)
    assert await client.ask({"type": "message", "content": "x"}) == SELECTROOM_Q


async def test_selecting_another_room_stops_the_previous_rooms_traffic(server: Server) -> None:
    owner = server.user()
    room_a = await server.create_room(owner)
    room_b = await server.create_room(owner)
    sender = await server.join(owner, room_a)
    mover = await server.join(owner, room_a)
    assert await mover.ask({"type": "select_room", "room_id": room_b}) == CONNECTED
    await sender.ask({"type": "message", "content": "to A"})
    assert await mover.silent(0.3)
    echo = await mover.ask({"type": "message", "content": "to B"})
    assert echo["data"]["room_id"] == room_b


async def test_message_argument_errors(server_factory: ServerFactory) -> None:
    server = await server_factory(max_content=5)
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    for content in (12345, None, {"a": 1}, ""):
        reply = await client.ask({"type": "message", "content": content})
        assert reply["data"] == "BADARGS" and "content" in reply["reason"]
    echo = await client.ask({"type": "message", "content": "ééééé"})
    assert echo["data"]["content"] == "ééééé"  # 5 code points: within the limit of 5
    too_large = await client.ask({"type": "message", "content": "éééééé"})
    assert too_large == {"type": "status", "data": "TOOLARGE"}
    # Nothing was stored for the refused frames.
    await client.send({"type": "get_past_messages"})
    assert (await client.recv())["data"]["content"] == "ééééé"
    assert (await client.recv())["count"] == 1


async def test_client_id_makes_a_send_idempotent(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    other = await server.join(owner, room)
    first = await client.ask({"type": "message", "content": "once", "client_id": "k1"})
    again = await client.ask({"type": "message", "content": "once", "client_id": "k1"})
    assert again["data"]["id"] == first["data"]["id"] and again["data"]["seq"] == 1
    assert (await other.recv())["data"]["seq"] == 1
    assert await other.silent(0.3)  # the resend was not delivered a second time


async def test_history_limit_before_and_bounds(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    for i in range(1, 8):
        await client.ask({"type": "message", "content": f"m{i}"})
    await client.send({"type": "get_past_messages", "limit": 3, "before": 6})
    got = [await client.recv() for _ in range(4)]
    assert [m["data"]["seq"] for m in got[:3]] == [3, 4, 5]
    assert got[3] == {"type": "status", "data": "HISTORYEND", "count": 3}
    for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"}):
        reply = await client.ask({"type": "get_past_messages", **bad})
        assert reply["data"] == "BADARGS"


async def test_history_of_empty_room_ends_with_zero(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    assert await client.ask({"type": "get_past_messages"}) == {
        "type": "status",
        "data": "HISTORYEND",
        "count": 0,
    }


async def test_auth_timeout_closes_1008(server_factory: ServerFactory) -> None:
    server = await server_factory(auth_timeout=0.5)
    client = await server.connect()
    assert await client.recv() == START
    assert await client.expect_close(timeout=3) == 1008


async def test_other_paths_are_refused_with_404(server: Server) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(server.ws_url.replace("/chat", "/nope"))
    assert info.value.response.status_code == 404


async def test_token_expiry_on_live_connection_then_refresh(server_factory: ServerFactory) -> None:
    server = await server_factory(jwt_leeway=0)
    owner = server.user()
    room = await server.create_room(owner)
    short = server.make_token(user=owner.user, entity=owner.entity, level=100, ttl=1)
    client = await server.connect()
    await client.recv()
    assert await client.ask({"type": "token", "content": short}) == READY
    assert await client.ask({"type": "select_room", "room_id": room}) == CONNECTED
    assert await client.recv(timeout=4) == {"type": "status", "data": "EXPIRED"}
    # While expired: no room traffic, and only a token is accepted.
    other = await server.join(owner, room)
    await other.ask({"type": "message", "content": "while expired"})
    assert await client.silent(0.3)
    assert await client.ask({"type": "message", "content": "x"}) == TOKEN_Q
    assert await client.ask({"type": "token", "content": owner.token}) == READY
    echo = await client.ask({"type": "message", "content": "back"})  # room kept
    assert echo["data"]["content"] == "back"


async def test_token_expiry_without_refresh_closes_1008(server_factory: ServerFactory) -> None:
    server = await server_factory(jwt_leeway=0, refresh_grace=0.5)
    owner = server.user()
    short = server.make_token(user=owner.user, entity=owner.entity, level=100, ttl=1)
    client = await server.connect()
    await client.recv()
    assert await client.ask({"type": "token", "content": short}) == READY
    assert await client.recv(timeout=4) == {"type": "status", "data": "EXPIRED"}
    assert await client.expect_close(timeout=3) == 1008


async def test_refresh_with_another_users_token_is_badauth_and_1008(server: Server) -> None:
    client = await server.login(server.user())
    assert await client.ask({"type": "token", "content": server.user().token}) == BADAUTH
    assert await client.expect_close() == 1008


async def test_revoked_member_stops_receiving_and_is_told(server: Server) -> None:
    owner = server.user()
    member = server.user()
    room = await server.create_room(owner)
    await server.grant(owner, room, member.user, "rw")
    watcher = await server.join(owner, room)
    client = await server.join(member, room)
    status, _ = await server.call("DELETE", f"/rooms/{room}/members/{member.user}", owner)
    assert status == 200
    assert await client.recv(timeout=2) == {
        "type": "status",
        "data": "NOTAUTHORIZED",
        "room_id": room,
    }
    await watcher.ask({"type": "message", "content": "secret"})
    assert await client.silent(0.3)
    assert await client.ask({"type": "message", "content": "x"}) == SELECTROOM_Q


async def test_room_deletion_reaches_live_connections(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    status, _ = await server.call("DELETE", f"/rooms/{room}", owner)
    assert status == 200
    assert await client.recv(timeout=2) == {
        "type": "status",
        "data": "NOTAUTHORIZED",
        "room_id": room,
    }


async def test_malformed_input_never_disturbs_other_connections(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    chatter = await server.join(owner, room)
    junk = ["null", "[]", "{", '{"type":"select_room","room_id":"abc"}', "\u0000", "1e999"]
    for frame in junk:
        c = await server.connect()
        await c.recv()
        await c.send(frame)
    for i in range(3):
        echo = await chatter.ask({"type": "message", "content": f"ok {i}"})
        assert echo["data"]["seq"] == i + 1
    await asyncio.sleep(0)


async def test_pipelined_commands_are_answered_in_command_order(server: Server) -> None:
    """Sends overlap in storage, yet every reply comes in the order of the commands: refusals
    wait behind the sends before them, and other commands wait until those are stored."""
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    watcher = await server.join(owner, room)
    for i in range(40):
        await client.send({"type": "message", "content": f"m{i}"})
    await client.send({"type": "message", "content": ""})  # BADARGS
    await client.send({"type": "no-such-command"})  # COMMAND?
    for i in range(40, 80):
        await client.send({"type": "message", "content": f"m{i}"})
    await client.send({"type": "get_past_messages", "limit": 2})
    await client.send({"type": "message", "content": "m80"})

    replies = [await client.recv() for _ in range(40 + 2 + 40 + 3 + 1)]
    echoes = [r["data"]["content"] for r in replies[:40]]
    assert echoes == [f"m{i}" for i in range(40)]
    assert replies[40]["data"] == "BADARGS"
    assert replies[41] == {"type": "query", "data": "COMMAND?"}
    assert [r["data"]["seq"] for r in replies[42:82]] == list(range(41, 81))
    # The history request saw every send before it stored, and nothing after it.
    assert [r["data"]["seq"] for r in replies[82:84]] == [79, 80]
    assert replies[84] == {"type": "status", "data": "HISTORYEND", "count": 2}
    assert replies[85]["data"]["seq"] == 81
    seen = [(await watcher.recv())["data"]["seq"] for _ in range(81)]
    assert seen == list(range(1, 82))


async def test_compression_is_off_by_default_although_clients_offer_it(server: Server) -> None:
    client = await server.connect()  # websockets' client offers permessage-deflate
    assert client.ws.response is not None
    assert client.ws.response.headers.get("Sec-WebSocket-Extensions") is None


async def test_compression_when_enabled_is_negotiated_and_messages_arrive_intact(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(compression=True)
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    other = await server.join(owner, room)
    assert client.ws.response is not None
    assert "permessage-deflate" in client.ws.response.headers["Sec-WebSocket-Extensions"]
    content = "compressible " * 200
    echo = await client.ask({"type": "message", "content": content})
    assert echo["data"]["content"] == content
    assert (await other.recv())["data"]["content"] == content
    assert server.app.ws.deflate.compressions == 1  # once for both receivers
