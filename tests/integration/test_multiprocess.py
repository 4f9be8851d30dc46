"""Two real server processes on different ports, one PostgreSQL, one Redis."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from tests.conftest import SECRET, TokenFactory
from tests.integration.conftest import Client, User

pytestmark = pytest.mark.asyncio

LISTENING = re.compile(rb"listening: ws://[^:]+:(\d+)/chat, http://[^:]+:(\d+)")


@dataclass
class Node:
    proc: asyncio.subprocess.Process
    ws_port: int
    http_port: int
    redis_url: str
    prefix: str


async def start_node(pg_url: str, redis_url: str, prefix: str) -> Node:
    env = {
        **os.environ,
        "NANOMSG_JWT_SECRET": SECRET,
        "NANOMSG_DATABASE_URL": pg_url,
        "NANOMSG_REDIS_URL": redis_url,
        "NANOMSG_REDIS_PREFIX": prefix,
        "NANOMSG_PORT": "0",
        "NANOMSG_HTTP_PORT": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanomsg", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    lines = []
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        lines.append(line)
        if not line:
            raise AssertionError(b"node exited: " + b"".join(lines))
        found = LISTENING.search(line)
        if found:
            # Keep draining stderr so a chatty node never blocks on a full pipe.
            asyncio.get_running_loop().create_task(_drain(proc.stderr))
            return Node(proc, int(found.group(1)), int(found.group(2)), redis_url, prefix)


async def subscribed(node: Node, channel: str, count: int) -> None:
    """Wait until ``count`` processes subscribe ``channel`` (``room:<id>`` or ``control``) in
    Redis: a message published before a process's subscription took effect would reach it only
    through a storage fill, so the tests below wait for the subscription itself."""
    name = f"{node.prefix}:{channel}"
    client = aioredis.from_url(node.redis_url)
    try:
        for _ in range(200):
            (_, found), *_ = await client.pubsub_numsub(name)
            if found >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{name} has {found} subscribers, not {count}")
    finally:
        await client.aclose()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@pytest_asyncio.fixture
async def nodes(pg_url: str, redis_url: str) -> AsyncIterator[list[Node]]:
    prefix = "mp" + uuid.uuid4().hex[:10]
    started = await asyncio.gather(*(start_node(pg_url, redis_url, prefix) for _ in range(2)))
    try:
        yield list(started)
    finally:
        for node in started:
            if node.proc.returncode is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in started:
            await asyncio.wait_for(node.proc.wait(), 15)


def user(make_token: TokenFactory, entity: str | None = None) -> User:
    u, e = str(uuid.uuid4()), entity or str(uuid.uuid4())
    return User(u, e, 100, make_token(user=u, entity=e, level=100))


async def join(node: Node, who: User, room: int) -> Client:
    client = Client(await connect(f"ws://127.0.0.1:{node.ws_port}/chat"))
    await client.recv()
    assert (await client.ask({"type": "token", "content": who.token}))["data"] == "READY"
    reply = await client.ask({"type": "select_room", "room_id": room})
    assert reply == {"type": "status", "data": "CONNECTED"}
    return client


async def http(
    node: Node, method: str, path: str, who: User, body: object = None
) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{node.http_port}{path}",
            json=body,
            headers={"Authorization": f"Bearer {who.token}"},
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_two_processes_deliver_every_message_once_in_one_order(
    nodes: list[Node], make_token: TokenFactory
) -> None:
    a, b = nodes
    owner = user(make_token)
    status, body = await http(a, "POST", "/rooms", owner, {"name": "mp", "level_admin": 100})
    assert status == 200
    room = body["content"]["room"]["id"]
    clients = [await join(node, owner, room) for node in (a, b, a, b)]
    await subscribed(a, f"room:{room}", 2)
    per_sender = 25
    await asyncio.gather(
        *(
            c.send({"type": "message", "content": f"{i}-{n}"})
            for i, c in enumerate(clients)
            for n in range(per_sender)
        )
    )
    total = per_sender * len(clients)
    streams = []
    for c in clients:
        got = [await c.recv(timeout=10) for _ in range(total)]
        streams.append([(m["data"]["seq"], m["data"]["content"]) for m in got])
        assert await c.silent(0.3)
    assert [s for s, _ in streams[0]] == list(range(1, total + 1))
    assert all(stream == streams[0] for stream in streams)  # same messages, same order
    for c in clients:
        await c.close()


async def test_permission_change_through_one_process_reaches_the_other(
    nodes: list[Node], make_token: TokenFactory
) -> None:
    a, b = nodes
    owner, member = user(make_token), user(make_token)
    status, body = await http(a, "POST", "/rooms", owner, {"name": "mp", "level_admin": 100})
    room = body["content"]["room"]["id"]
    status, _ = await http(
        a, "PUT", f"/rooms/{room}/members", owner, {"entity_UUID": member.user, "permissions": "rw"}
    )
    assert status == 201
    on_b = await join(b, member, room)
    await subscribed(a, "control", 2)
    status, _ = await http(a, "DELETE", f"/rooms/{room}/members/{member.user}", owner)
    assert status == 200
    assert await on_b.recv(timeout=1.0) == {
        "type": "status",
        "data": "NOTAUTHORIZED",
        "room_id": room,
    }
    await on_b.close()


async def test_a_subscriber_to_two_rooms_on_one_process_gets_both_rooms_sent_on_the_other(
    nodes: list[Node], make_token: TokenFactory
) -> None:
    a, b = nodes
    owner = user(make_token)
    rooms = []
    for name in ("first", "second"):
        status, body = await http(a, "POST", "/rooms", owner, {"name": name, "level_admin": 100})
        assert status == 200
        rooms.append(body["content"]["room"]["id"])
    reader = Client(await connect(f"ws://127.0.0.1:{b.ws_port}/chat"))
    await reader.recv()
    assert (await reader.ask({"type": "token", "content": owner.token}))["data"] == "READY"
    for room in rooms:
        reply = await reader.ask({"type": "subscribe", "room_id": room})
        assert reply == {"type": "status", "data": "SUBSCRIBED", "room_id": room}
    sender = await join(a, owner, rooms[0])
    await subscribed(a, f"room:{rooms[0]}", 2)
    await subscribed(a, f"room:{rooms[1]}", 1)
    sent = []
    for n in range(3):
        for room in rooms:  # one to the selected room, one naming the other
            echo = await sender.ask({"type": "message", "room_id": room, "content": f"{n}"})
            sent.append((echo["data"]["room_id"], echo["data"]["seq"]))
    got = [await reader.recv(timeout=10) for _ in range(len(sent))]
    assert sorted((f["data"]["room_id"], f["data"]["seq"]) for f in got) == sorted(sent)
    for room in rooms:  # each room in its own order
        seqs = [f["data"]["seq"] for f in got if f["data"]["room_id"] == room]
        assert seqs == [1, 2, 3]
    assert await reader.silent(0.3)
    await reader.close()
    await sender.close()


async def test_an_edit_and_a_delete_on_one_process_reach_a_subscriber_on_the_other_in_order(
    nodes: list[Node], make_token: TokenFactory
) -> None:
    a, b = nodes
    owner = user(make_token)
    status, body = await http(a, "POST", "/rooms", owner, {"name": "mp", "level_admin": 100})
    assert status == 200
    room = body["content"]["room"]["id"]
    on_b = await join(b, owner, room)
    sender = await join(a, owner, room)
    await subscribed(a, f"room:{room}", 2)
    first = (await sender.ask({"type": "message", "content": "typo"}))["data"]["seq"]
    edit = await sender.ask({"type": "edit", "seq": first, "content": "fixed"})
    delete = await sender.ask({"type": "delete", "seq": first})
    after = await sender.ask({"type": "message", "content": "next"})
    got = [await on_b.recv(timeout=10) for _ in range(4)]
    assert [(f["type"], f["data"]["seq"]) for f in got] == [
        ("message", 1),
        ("edited", 2),
        ("deleted", 3),
        ("message", 4),
    ]
    assert got[1:] == [edit, delete, after]
    assert await on_b.silent(0.3)
    await on_b.close()
    await sender.close()


async def test_a_read_on_one_process_sends_its_receipt_to_a_subscriber_on_the_other(
    nodes: list[Node], make_token: TokenFactory
) -> None:
    a, b = nodes
    owner, member = user(make_token), user(make_token)
    status, body = await http(a, "POST", "/rooms", owner, {"name": "mp", "level_admin": 100})
    assert status == 200
    room = body["content"]["room"]["id"]
    status, _ = await http(
        a, "PUT", f"/rooms/{room}/members", owner, {"entity_UUID": member.user, "permissions": "rw"}
    )
    assert status == 201
    on_b = await join(b, owner, room)
    reader = await join(a, member, room)
    await subscribed(a, f"room:{room}", 2)
    for text in ("one", "two"):
        await reader.ask({"type": "message", "content": text})
    assert [(await on_b.recv(timeout=10))["data"]["seq"] for _ in range(2)] == [1, 2]
    assert await reader.ask({"type": "read", "seq": 1}) == {
        "type": "status",
        "data": "READMARK",
        "room_id": room,
        "seq": 1,
    }
    receipt = {"type": "read", "data": {"room_id": room, "user": member.user, "seq": 1}}
    assert await on_b.recv(timeout=10) == receipt
    # Over HTTP on node A, within the same second: coalesced, sent when the second ends.
    status, body = await http(a, "POST", f"/rooms/{room}/read", member, {"seq": 2})
    assert (status, body["content"]) == (200, {"room_id": room, "seq": 2})
    receipt["data"]["seq"] = 2  # type: ignore[index]
    assert await on_b.recv(timeout=10) == receipt
    assert await on_b.silent(1.3)
    await on_b.close()
    await reader.close()


async def test_a_grant_on_one_process_reaches_the_users_connection_on_the_other_as_room_added(
    nodes: list[Node], make_token: TokenFactory
) -> None:
    a, b = nodes
    owner, member = user(make_token), user(make_token)
    status, body = await http(a, "POST", "/rooms", owner, {"name": "mp", "level_admin": 100})
    assert status == 200
    room = body["content"]["room"]["id"]
    on_b = Client(await connect(f"ws://127.0.0.1:{b.ws_port}/chat"))
    await on_b.recv()
    token = {"type": "token", "content": member.token, "user_events": True}
    assert (await on_b.ask(token))["data"] == "READY"
    await subscribed(a, "control", 2)
    status, _ = await http(
        a, "PUT", f"/rooms/{room}/members", owner, {"entity_UUID": member.user, "permissions": "rw"}
    )
    assert status == 201
    added = {"type": "user_event", "data": {"event": "room_added", "room_id": room}}
    assert await on_b.recv(timeout=10) == added
    status, _ = await http(a, "DELETE", f"/rooms/{room}/members/{member.user}", owner)
    assert status == 200
    removed = {"type": "user_event", "data": {"event": "room_removed", "room_id": room}}
    assert await on_b.recv(timeout=10) == removed
    await on_b.close()
