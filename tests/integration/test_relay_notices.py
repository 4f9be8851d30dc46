"""Room-change notices between processes survive a broker outage, whatever else was queued.

Real processes, a private ``redis-server``, and real network faults: either Redis itself is
stopped, or one node alone loses Redis because its connections go through a TCP forwarder
that is cut (the other node's subscription never breaks, so only the notice itself can tell
it). Meanwhile the node that made the rule change stores more messages than its relay's
publish queue holds: before the notices were kept apart, the notice was the oldest entry and
was dropped, and the other node kept admitting readers on the revoked rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import Client, User
from tests.integration.processes import (
    NodeProcess,
    Nodes,
    PrivateRedis,
    connect_and_join,
    create_room,
    eventually,
    free_port,
    grant,
    make_user,
    nodes,  # noqa: F401  (fixture)
    private_redis,  # noqa: F401  (fixture)
    readyz,
    revoke,
)

pytestmark = pytest.mark.asyncio

FLOOD = 10_500  # more messages than the relay's publish queue holds (10 000)


class TcpForwarder:
    """127.0.0.1:<port> forwarded to 127.0.0.1:<target>. ``cut`` resets every forwarded
    connection and refuses new ones (the target unreachable for the clients behind it only);
    ``restore`` listens on the same port again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        await self.cut()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            sink.transport.abort()
            self._writers.discard(sink)


@pytest_asyncio.fixture
async def forwarder(private_redis: PrivateRedis) -> AsyncIterator[TcpForwarder]:  # noqa: F811
    proxy = TcpForwarder(private_redis.port)
    await proxy.restore()
    try:
        yield proxy
    finally:
        await proxy.close()


async def broker_is(node: NodeProcess, up: bool, timeout: float) -> None:
    async def check() -> bool:
        return (await readyz(node))[1].get("broker") is up

    await eventually(check, timeout=timeout)


async def flood(node: NodeProcess, user: User, room: int, count: int) -> None:
    """Store ``count`` messages in ``room`` through ``node``, pipelined; returns once every
    echo (sent after the commit) has arrived."""
    client = await connect_and_join(node, user, room)
    echoed = 0

    async def read() -> None:
        nonlocal echoed
        while echoed < count:
            frame = orjson.loads(await asyncio.wait_for(client.ws.recv(), 30.0))
            if frame.get("type") == "message":
                echoed += 1
            else:
                raise AssertionError(f"flood refused: {frame}")

    reader = asyncio.get_running_loop().create_task(read())
    try:
        for n in range(count):
            await client.send({"type": "message", "content": f"flood {n}"})
        await asyncio.wait_for(reader, 60.0)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()
    assert echoed == count


async def lost_room(client: Client, room: int, timeout: float) -> float:
    """Read until the connection is told it lost ``room``; the seconds it took."""
    began = time.monotonic()
    deadline = began + timeout
    seen: list[dict[str, Any]] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the live connection kept room {room}; last frames {seen[-3:]}")
        try:
            frame = await client.recv(timeout=left)
        except TimeoutError:
            continue
        if frame == {"type": "status", "data": "NOTAUTHORIZED", "room_id": room}:
            return time.monotonic() - began
        seen.append(frame)


async def select_answer(node: NodeProcess, user: User, room: int) -> dict[str, Any]:
    client = Client(await connect(node.ws_url, open_timeout=5))
    try:
        assert await client.recv() == {"type": "query", "data": "START?"}
        assert await client.ask({"type": "token", "content": user.token}) == {
            "type": "status",
            "data": "READY",
        }
        return await client.ask({"type": "select_room", "room_id": room})
    finally:
        with contextlib.suppress(ConnectionClosed):
            await client.close()


REFUSED = {"type": "status", "data": "NOTAUTHORIZED"}


async def test_revocation_reaches_a_node_whose_subscription_never_broke_despite_a_flood(
    private_redis: PrivateRedis,  # noqa: F811
    forwarder: TcpForwarder,
    pg_url: str,
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """A loses Redis alone (its connections go through a forwarder that is cut); B stays
    subscribed throughout, so it re-checks nothing by itself. Through A a member's rule is
    deleted, then more messages than A's publish queue holds are stored. Once A reaches Redis
    again, B's live connection of that member loses the room, and a new select on B is
    refused."""
    (a,) = await nodes.start(1, database_url=pg_url, redis_url=forwarder.url)
    (b,) = await nodes.start(1, database_url=pg_url, redis_url=private_redis.url)
    owner, member = make_user(), make_user()
    room = await create_room(a, owner, name="revoked")
    busy = await create_room(a, owner, name="busy")
    assert await grant(a, owner, room, member.user, "rw") == 201
    await broker_is(a, True, 10.0)
    await broker_is(b, True, 10.0)
    on_b = await connect_and_join(b, member, room)
    try:
        await forwarder.cut()
        await broker_is(a, False, 5.0)
        await revoke(a, owner, room, member.user)
        await flood(a, owner, busy, FLOOD)
        assert (await readyz(b))[1]["broker"] is True  # B never lost its subscription
        await forwarder.restore()
        took = await lost_room(on_b, room, timeout=20.0)
        assert await select_answer(b, member, room) == REFUSED
        print(f"B lost the room {took:.2f}s after A could reach Redis again")
    finally:
        await on_b.close()


async def test_revocation_during_a_redis_outage_with_a_flood_reaches_the_other_node(
    private_redis: PrivateRedis,  # noqa: F811
    pg_url: str,
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """Redis itself stops; through A a member's rule is deleted, then more messages than A's
    publish queue holds are stored. Redis starts again: B's live connection loses the room
    (B re-checks its rooms when its subscription returns, and A's notice follows), and a new
    select on B is refused."""
    a, b = await nodes.start(2, database_url=pg_url, redis_url=private_redis.url)
    owner, member = make_user(), make_user()
    room = await create_room(a, owner, name="revoked")
    busy = await create_room(a, owner, name="busy")
    assert await grant(a, owner, room, member.user, "rw") == 201
    await broker_is(b, True, 10.0)
    on_b = await connect_and_join(b, member, room)
    try:
        await private_redis.stop()
        await broker_is(b, False, 5.0)
        await revoke(a, owner, room, member.user)
        await flood(a, owner, busy, FLOOD)
        await private_redis.start()
        await lost_room(on_b, room, timeout=20.0)
        assert await select_answer(b, member, room) == REFUSED
    finally:
        await on_b.close()
