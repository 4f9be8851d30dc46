"""Valid JSON that used to fail a connection, or other tenants' sends, over real WebSockets on
both backends: each gets a precise answer, the connection stays open, and nobody else notices.
Also what a client is told about refused tokens and history frames."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import SECRET
from tests.integration.conftest import Client, Server

pytestmark = pytest.mark.asyncio

READY = {"type": "status", "data": "READY"}
BADAUTH = {"type": "status", "data": "BADAUTH"}
START = {"type": "query", "data": "START?"}


def badargs(reason: str) -> dict[str, Any]:
    return {"type": "status", "data": "BADARGS", "reason": reason}


def signed(payload_json: str) -> str:
    """An HS256 token over any payload text (PyJWT cannot write a 5 000-digit number)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(payload_json.encode())
    )
    signature = hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + b64(signature)


def claims_with_level(level_json: str) -> str:
    user, entity = str(uuid.uuid4()), str(uuid.uuid4())
    exp = int(time.time()) + 600
    return (
        f'{{"userUUID":"{user}","entityUUID":"{entity}","levelOnEntity":{level_json},"exp":{exp}}}'
    )


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records of the nanomsg package that carry a traceback."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("nanomsg") and r.exc_info]


async def still_open(client: Client) -> None:
    """The connection answers the next command as usual."""
    reply = await client.ask({"type": "get_past_messages", "limit": 1})
    while reply["type"] == "message":
        reply = await client.recv()
    assert reply["data"] == "HISTORYEND", reply


async def test_a_nul_message_gets_badargs_and_concurrent_senders_of_other_rooms_all_get_echoes(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    senders: list[tuple[Client, int]] = []
    for _ in range(6):  # other tenants: other entities, other rooms, the same writer shards
        owner = server.user()
        room = await server.create_room(owner)
        senders.append((await server.join(owner, room), room))
    attacker_user = server.user()
    attacker_room = await server.create_room(attacker_user)
    attacker = await server.join(attacker_user, attacker_room)
    rounds = 15

    async def tenant(client: Client, n: int) -> list[int]:
        for i in range(n):
            await client.send({"type": "message", "content": f"t{i}"})
        return [(await client.recv())["data"]["seq"] for _ in range(n)]

    async def attack() -> list[dict[str, Any]]:
        for _ in range(rounds):
            await attacker.send('{"type":"message","content":"a\\u0000b"}')
        return [await attacker.recv() for _ in range(rounds)]

    with caplog.at_level(logging.INFO):
        results = await asyncio.gather(attack(), *(tenant(c, rounds) for c, _ in senders))
    assert results[0] == [badargs("content must not contain U+0000")] * rounds
    for seqs in results[1:]:
        assert seqs == list(range(1, rounds + 1))  # every send echoed: none UNAVAILABLE
    echo = await attacker.ask({"type": "message", "content": "fine"})
    assert echo["data"]["seq"] == 1  # the refused sends stored nothing
    assert no_tracebacks(caplog) == []


@pytest.mark.parametrize(
    ("frame", "reply"),
    [
        pytest.param(
            '{"type":"select_room","room_id":"' + "1" * 5000 + '"}',
            badargs("room_id must be a positive integer"),
            id="room_id-5000-digit-string",
        ),
        pytest.param(
            '{"type":"select_room","room_id":1e400}',
            badargs("room_id must be a positive integer"),
            id="room_id-1e400",
        ),
        pytest.param(
            '{"type":"select_room","room_id":' + "9" * 5000 + "}",
            badargs("room_id must be a positive integer"),
            id="room_id-5000-digit-number",
        ),
        pytest.param(
            '{"type":"select_room","room_id":1,"since":-1e400}',
            badargs("since must be an integer seq >= 0"),
            id="since-minus-1e400",
        ),
        pytest.param(
            '{"type":"get_past_messages","limit":1e400}',
            badargs("limit must be an integer from 1 to 500"),
            id="limit-1e400",
        ),
        pytest.param(
            '{"type":"message","content":"\\ud800"}',
            badargs("content must not contain a lone surrogate"),
            id="content-lone-surrogate",
        ),
        pytest.param(
            '{"type":"message","content":"x","client_id":"\\udfff"}',
            badargs("client_id must not contain a lone surrogate"),
            id="client_id-lone-surrogate",
        ),
        pytest.param(
            '{"type":"edit","seq":1e400,"content":"x"}',
            badargs("seq must be a positive integer"),
            id="edit-seq-1e400",
        ),
        pytest.param(
            '{"type":"edit","seq":' + "9" * 5000 + ',"content":"x"}',
            badargs("seq must be a positive integer"),
            id="edit-seq-5000-digit-number",
        ),
        pytest.param(
            '{"type":"edit","seq":1,"content":"\\ud800"}',
            badargs("content must not contain a lone surrogate"),
            id="edit-content-lone-surrogate",
        ),
        pytest.param(
            '{"type":"delete","seq":' + str(2**63) + "}",
            badargs("seq must be a positive integer"),
            id="delete-seq-past-2-63",
        ),
        pytest.param(
            '{"type":"delete","seq":' + str(2**63 - 1) + "}",
            badargs("no message has seq 9223372036854775807"),
            id="delete-seq-2-63-minus-1-unknown",
        ),
        pytest.param(
            '{"type":"\\ud800","room_id":1e400}',
            {"type": "query", "data": "COMMAND?"},
            id="type-lone-surrogate",
        ),
    ],
)
async def test_valid_json_in_a_read_field_gets_badargs_for_that_field_and_the_connection_stays(
    server: Server, caplog: pytest.LogCaptureFixture, frame: str, reply: dict[str, Any]
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    with caplog.at_level(logging.INFO):
        assert await client.ask(frame) == reply
        await still_open(client)
    assert no_tracebacks(caplog) == []


@pytest.mark.parametrize(
    "unread",
    ["1e400", "9" * 5000, '"\\ud800"', '"\\u0000"', '{"x":[-1e400]}'],
    ids=["1e400", "5000-digits", "lone-surrogate", "nul", "nested-minus-1e400"],
)
async def test_fields_a_command_does_not_read_are_ignored_whatever_valid_json_they_hold(
    server: Server, unread: str
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    echo = await client.ask(f'{{"type":"message","content":"hi","extra":{unread}}}')
    assert echo["data"]["content"] == "hi" and echo["data"]["seq"] == 1
    assert await client.ask(f'{{"type":"select_room","room_id":{room},"x":{unread}}}') == {
        "type": "status",
        "data": "CONNECTED",
    }


async def test_a_5000_digit_room_id_before_auth_is_a_try_not_a_dropped_connection(
    server: Server,
) -> None:
    client = await server.connect()
    assert await client.recv() == START
    frame = '{"type":"select_room","room_id":"' + "1" * 5000 + '"}'
    assert await client.ask(frame) == {"type": "query", "data": "TOKEN?"}
    assert await client.ask({"type": "token", "content": server.user().token}) == READY


@pytest.mark.parametrize(
    "level", ['"' + "9" * 5000 + '"', "9" * 5000], ids=["digit-string", "number"]
)
async def test_a_5000_digit_level_gets_badauth_on_the_websocket_and_401_with_a_reason_over_http(
    server: Server, level: str
) -> None:
    token = signed(claims_with_level(level))
    client = await server.connect()
    assert await client.recv() == START
    assert await client.ask({"type": "token", "content": token}) == BADAUTH
    assert await client.ask({"type": "token", "content": server.user().token}) == READY

    headers = {"Authorization": f"Bearer {token}"}
    async with server.http.get(server.http_url + "/test/token", headers=headers) as resp:
        body = orjson.loads(await resp.read())
    assert resp.status == 401
    reason = body["meta"]["reason"]
    assert reason in ("levelOnEntity out of range", "invalid token"), body
    if level.startswith('"'):
        assert reason == "levelOnEntity out of range"


async def test_history_frames_are_marked_history_and_live_frames_are_not(server: Server) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    client = await server.join(owner, room)
    echo = await client.ask({"type": "message", "content": "one"})
    assert "history" not in echo["data"]
    history = await client.ask({"type": "get_past_messages"})
    assert history == {"type": "message", "data": {**echo["data"], "history": True}}
    assert await client.recv() == {"type": "status", "data": "HISTORYEND", "count": 1}

    back = await server.login(owner)
    await back.ask({"type": "select_room", "room_id": room, "since": 0})
    replayed = await back.recv()
    assert replayed == {"type": "message", "data": {**echo["data"], "history": True}}
    assert (await back.recv())["data"] == "RESUMED"
    live = await client.ask({"type": "message", "content": "two"})
    assert await back.recv() == live and "history" not in live["data"]


async def test_a_refused_token_is_logged_with_the_connection_and_reason_and_badauth_is_exact(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = await server.connect()
    assert await client.recv() == START
    with caplog.at_level(logging.INFO, logger="nanomsg.ws_server"):
        await client.send({"type": "token", "content": server.user(ttl=-3600).token})
        raw = await asyncio.wait_for(client.ws.recv(), 5)
    assert raw == '{"type":"status","data":"BADAUTH"}'  # byte for byte the original's
    lines = [r.getMessage() for r in caplog.records if "token refused" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("connection ") and lines[0].endswith(
        ": token refused: token expired"
    )


async def test_closing_for_failed_tokens_names_the_last_reason_in_the_close_reason(
    server: Server,
) -> None:
    client = await server.connect()
    assert await client.recv() == START
    assert await client.ask({"type": "token", "content": "not.a.jwt"}) == BADAUTH
    assert await client.ask({"type": "select_room", "room_id": 1}) == {
        "type": "query",
        "data": "TOKEN?",
    }
    await client.send({"type": "token", "content": server.user(ttl=-3600).token})
    assert await client.recv() == BADAUTH
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(client.ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "too many failed attempts: token expired"
