"""Real faults on a live server: storage refusing work, slow readers, silent peers."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg
import pytest
from websockets.asyncio.client import connect

from tests.conftest import PG_URL
from tests.integration.conftest import Client, Server, ServerFactory

pytestmark = pytest.mark.asyncio

UNAVAILABLE = {"type": "status", "data": "UNAVAILABLE"}


@asynccontextmanager
async def storage_outage(server: Server) -> AsyncIterator[None]:
    """Make the server's real database refuse work, then give it back.

    PostgreSQL: the database stops accepting connections and every open one is terminated.
    SQLite: another connection holds the write lock longer than the store's busy timeout.
    """
    url = server.app.config.database_url
    if url.startswith("sqlite"):
        locker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        return
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        try:
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


async def test_storage_outage_answers_unavailable_relays_nothing_and_recovers(
    server: Server,
) -> None:
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    watcher = await server.join(owner, room)
    async with storage_outage(server):
        # SQLite first waits out its 5 s busy timeout.
        await sender.send({"type": "message", "content": "lost?"})
        assert await sender.recv(timeout=10) == UNAVAILABLE
        assert await watcher.silent(0.3)  # nothing unstored was relayed
        await sender.send({"type": "get_past_messages"})
        history = await sender.recv(timeout=10)
        if server.app.config.database_url.startswith("sqlite"):
            # WAL: readers go on while the writer is locked out; nothing was stored.
            assert history == {"type": "status", "data": "HISTORYEND", "count": 0}
        else:
            assert history == UNAVAILABLE
    # Same connections, no restart: everything works again and nothing was stored meanwhile.
    echo = await sender.ask({"type": "message", "content": "back"})
    assert echo["data"]["seq"] == 1 and echo["data"]["content"] == "back"
    assert (await watcher.recv())["data"]["seq"] == 1


async def test_slow_reader_is_closed_4000_without_slowing_others(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(max_backlog=64 * 1024)
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    # A client that stops reading: websockets stops pulling from the socket once its queue
    # of one message is full, so the server's write buffer grows.
    slow_ws = await connect(server.ws_url, max_queue=1)
    slow = Client(slow_ws)
    server.clients.append(slow)
    await slow.recv()
    await slow.ask({"type": "token", "content": owner.token})
    await slow.ask({"type": "select_room", "room_id": room})
    slow_ws.transport.pause_reading()
    content = "x" * 4000
    # ~6 MB of room traffic: past what loopback socket buffers absorb, and the 64 KiB bound.
    for i in range(1500):
        echo = await sender.ask({"type": "message", "content": content})
        assert echo["data"]["seq"] == i + 1  # the sender keeps its pace
    slow_ws.transport.resume_reading()
    assert await slow.expect_close() == 4000


async def test_peer_that_never_answers_pings_is_closed_4001(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(ping_interval=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.app.ws_port)
    from websockets.client import ClientProtocol
    from websockets.frames import Close, Opcode
    from websockets.uri import parse_uri

    proto = ClientProtocol(parse_uri(server.ws_url))
    proto.send_request(proto.connect())
    for data in proto.data_to_send():
        writer.write(data)
    code = None
    try:
        async with asyncio.timeout(5):
            while code is None:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                proto.receive_data(chunk)
                for event in proto.events_received():
                    if getattr(event, "opcode", None) is Opcode.CLOSE:
                        code = Close.parse(event.data).code
                proto.data_to_send()  # discard the automatic pongs: this peer is silent
    finally:
        writer.close()
    assert code == 4001


async def test_client_answering_pings_stays_connected(server_factory: ServerFactory) -> None:
    server = await server_factory(ping_interval=0.2)
    client = await server.login(server.user())
    await asyncio.sleep(1.0)  # five keepalive rounds
    assert await client.ask({"type": "nope"}) == {"type": "query", "data": "COMMAND?"}
