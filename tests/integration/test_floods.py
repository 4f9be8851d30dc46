"""Floods and long replies over real sockets: control frames, empty fragments, history and
resume replies bigger than the backlog bound, slow readers in numbers, keepalive timing,
shutdown with clients connected, and the log line of every close the server starts."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from nanomsg import ws_server
from tests.integration.conftest import Client, Server, ServerFactory, User
from tests.integration.processes import (
    NodeProcess,
    Nodes,
    eventually,
    make_user,
    nodes,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.asyncio

TEXT, CONT, CLOSE, PING, PONG = 0x1, 0x0, 0x8, 0x9, 0xA
EMOJI = "\U0001f600"


class RawClient:
    """A WebSocket client written by hand, to send what no library sends (floods of control
    frames, thousands of empty fragments) and to see every frame the server writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small window: the server's writes back up sooner
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET /chat HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        client = cls(reader, writer)
        assert await client.recv_json() == {"type": "query", "data": "START?"}
        return client

    @staticmethod
    def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
        mask = os.urandom(4)
        head = bytes([(0x80 if fin else 0) | opcode])
        size = len(payload)
        if size < 126:
            head += bytes([0x80 | size])
        elif size < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", size)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + masked

    def send(self, obj: Any) -> None:
        self.writer.write(self.frame(TEXT, orjson.dumps(obj)))

    async def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await self.reader.readexactly(size)

    async def recv_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text frame (pings are answered on the way)."""
        while True:
            opcode, payload = await self.recv_frame(timeout)
            if opcode == PING:
                self.writer.write(self.frame(PONG, payload))
                continue
            assert opcode == TEXT, (opcode, payload)
            decoded = orjson.loads(payload)
            assert isinstance(decoded, dict)
            return decoded

    async def close_code(self, timeout: float = 5.0) -> int:
        """Read until the server's close frame; its code."""
        while True:
            opcode, payload = await self.recv_frame(timeout)
            if opcode == CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code

    def stop_reading(self) -> None:
        """Read nothing more: what the server writes piles up in its buffers."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        cast(asyncio.Transport, self.writer.transport).pause_reading()

    def abort(self) -> None:
        self.writer.transport.abort()


@pytest_asyncio.fixture
async def raw_clients() -> AsyncIterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.abort()


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def start_node(group: Nodes, tmp_path: Path, **settings: Any) -> NodeProcess:
    (node,) = await group.start(database_url=f"sqlite:///{tmp_path / 'node.db'}", **settings)
    return node


async def flood(client: RawClient, data: bytes, *, total: int, seconds: float) -> int:
    """Send ``data`` over and over until ``total`` bytes or ``seconds`` pass (a server that
    stops reading makes the sends wait); the bytes the kernel took."""
    sent = 0
    deadline = time.monotonic() + seconds
    batch = data * max(1, 65536 // len(data))
    while sent < total and time.monotonic() < deadline:
        client.writer.write(batch)
        try:
            await asyncio.wait_for(client.writer.drain(), max(deadline - time.monotonic(), 0.01))
        except (TimeoutError, ConnectionError):
            break
        sent += len(batch)
    return sent


# -- control frames and fragments ------------------------------------------------------------------


async def test_ping_flood_from_a_client_that_never_reads_keeps_the_server_under_20_mib(
    nodes: Nodes,  # noqa: F811
    tmp_path: Path,
    raw_clients: list[RawClient],
) -> None:
    node = await start_node(nodes, tmp_path)
    assert node.proc is not None
    before = rss_mib(node.proc.pid)
    client = await RawClient.open(node.ws_port, rcvbuf=4096)  # no token: anyone can do this
    raw_clients.append(client)
    client.stop_reading()
    # 125-byte pings: each answer is as big as the ping; the client reads none of them.
    sent = await flood(client, RawClient.frame(PING, b"p" * 125), total=200 << 20, seconds=4.0)
    grown = rss_mib(node.proc.pid) - before
    # Unbounded, the server kept every pong: RSS grew by about what was sent (~40 MiB/s).
    assert grown < 20, f"RSS grew {grown:.1f} MiB after {sent >> 20} MiB of pings"
    assert sent < 40 << 20, "the server kept reading a client that reads nothing"


async def test_pongs_over_the_backlog_bound_close_4000(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    # Reading pauses at a quarter of the bound; one read of pings answers more than the bound.
    server = await server_factory(max_backlog=16 * 1024)
    client = await RawClient.open(server.app.ws_port, rcvbuf=4096)
    raw_clients.append(client)
    client.stop_reading()
    await flood(client, RawClient.frame(PING, b"p" * 125), total=8 << 20, seconds=3.0)

    async def closed_4000() -> bool:
        return server.app.ws.closes[4000] == 1

    await eventually(closed_4000, timeout=10)


async def test_unsolicited_pongs_do_not_answer_the_keepalive_ping(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    server = await server_factory(ping_interval=0.4)
    silent = await RawClient.open(server.app.ws_port)
    answering = await RawClient.open(server.app.ws_port)
    raw_clients += [silent, answering]
    # Before the fix any pong cleared "waiting for pong": a client that never answered the
    # server's pings but sent its own pongs stayed forever.
    silent.writer.write(RawClient.frame(PONG, b"nanomsg") * 20)
    seen: list[bytes] = []
    start = time.monotonic()
    while len(seen) < 3 and time.monotonic() - start < 5:
        opcode, payload = await answering.recv_frame()
        assert opcode == PING
        seen.append(payload)
        answering.writer.write(RawClient.frame(PONG, payload))
        silent.writer.write(RawClient.frame(PONG, payload[::-1] + b"x"))  # a wrong payload
    assert len(seen) == 3 and len(set(seen)) == 3  # a fresh payload per ping
    while True:
        opcode, payload = await silent.recv_frame()
        if opcode == CLOSE:
            assert struct.unpack("!H", payload[:2])[0] == 4001
            break
        assert opcode == PING
    assert server.app.ws.closes[4001] == 1  # the client that answered is still there


async def test_a_flood_of_empty_continuation_frames_closes_1009(
    server: Server, raw_clients: list[RawClient]
) -> None:
    client = await RawClient.open(server.app.ws_port)
    raw_clients.append(client)
    client.writer.write(RawClient.frame(TEXT, b'{"type":', fin=False))
    empty = RawClient.frame(CONT, b"", fin=False)
    await flood(client, empty, total=ws_server.MAX_FRAGMENTS * 6 * 20, seconds=3.0)
    assert await client.close_code() == 1009
    assert server.app.ws.closes[1009] == 1


async def test_a_message_in_a_few_fragments_is_still_read(
    server: Server, raw_clients: list[RawClient]
) -> None:
    client = await RawClient.open(server.app.ws_port)
    raw_clients.append(client)
    text = orjson.dumps({"type": "token", "content": server.user().token})
    parts = [text[i : i + 16] for i in range(0, len(text), 16)]
    assert 1 < len(parts) < ws_server.MAX_FRAGMENTS
    client.writer.write(RawClient.frame(TEXT, parts[0], fin=False))
    for i, part in enumerate(parts[1:], start=2):
        client.writer.write(RawClient.frame(CONT, part, fin=i == len(parts)))
    assert await client.recv_json() == {"type": "status", "data": "READY"}


# -- long history and resume replies ---------------------------------------------------------------


async def fill_room(server: Server, count: int) -> tuple[int, User, Client]:
    """A room with ``count`` stored messages of 4 096 emoji (~16 KB each), its owner, and the
    owner's connection that sent them."""
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    for i in range(count):
        await sender.send({"type": "message", "content": EMOJI * 4095 + chr(0x41 + i % 26)})
        echo = await sender.recv()
        assert echo["type"] == "message", echo
    return room, owner, sender


async def test_history_of_70_messages_of_4096_emoji_is_delivered(server: Server) -> None:
    room, owner, _ = await fill_room(server, 70)
    reader = await server.join(owner, room)
    await reader.send({"type": "get_past_messages", "limit": 100})
    got = [await reader.recv() for _ in range(71)]
    assert all(frame["type"] == "message" for frame in got[:70]), got[-1]
    assert got[70]["type"] == "status", got[70]
    assert server.app.ws.closes[4000] == 0


async def test_resume_since_0_over_1_mib_delivers_all_then_resumed_then_live(
    server: Server,
) -> None:
    room, owner, sender = await fill_room(server, 70)
    resumer = await server.login(owner)
    await resumer.send({"type": "select_room", "room_id": room, "since": 0})
    frames = [await resumer.recv(timeout=10) for _ in range(2)]
    assert frames[0] == {"type": "status", "data": "CONNECTED"}, frames[0]
    # The replay is read in one go before its first frame is written: a live message sent
    # once that frame is out is held behind the reply and comes after RESUMED.
    await sender.send({"type": "message", "content": "live"})
    frames += [await resumer.recv(timeout=10) for _ in range(71)]
    replay = frames[1:71]
    assert [m["data"]["seq"] for m in replay] == list(range(1, 71))
    assert frames[71] == {
        "type": "status",
        "data": "RESUMED",
        "room_id": room,
        "count": 70,
        "complete": True,
    }
    assert frames[72]["data"]["content"] == "live" and frames[72]["data"]["seq"] == 71
    assert server.app.ws.closes[4000] == 0


async def test_a_resuming_client_that_never_reads_is_still_closed_4000(
    server: Server, raw_clients: list[RawClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_server, "STALL_TIMEOUT", 0.5)
    room, owner, sender = await fill_room(server, 70)
    client = await RawClient.open(server.app.ws_port, rcvbuf=4096)
    raw_clients.append(client)
    client.send({"type": "token", "content": owner.token})
    assert await client.recv_json() == {"type": "status", "data": "READY"}
    client.send({"type": "select_room", "room_id": room, "since": 0})
    client.stop_reading()  # and never reads again
    # The reply may fit in the kernel's socket buffers; the room goes on talking meanwhile.
    for i in range(400):
        if server.app.ws.closes[4000]:
            break
        assert (await sender.ask({"type": "message", "content": EMOJI * 4096}))["type"]
        assert i < 399, "the client that never reads was never closed"
    assert server.app.ws.closes[4000] == 1


# -- slow readers in numbers -----------------------------------------------------------------------


async def test_past_the_outbound_budget_the_largest_backlogs_are_closed_4000(
    server_factory: ServerFactory,
    raw_clients: list[RawClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = 2 << 20
    server = await server_factory(max_backlog=1 << 20, max_outbound=budget)
    owner = server.user()
    room = await server.create_room(owner)
    sender = await server.join(owner, room)
    for _ in range(6):  # subscribers that stop reading once in the room
        client = await RawClient.open(server.app.ws_port, rcvbuf=4096)
        raw_clients.append(client)
        client.send({"type": "token", "content": owner.token})
        assert await client.recv_json() == {"type": "status", "data": "READY"}
        client.send({"type": "select_room", "room_id": room})
        assert await client.recv_json() == {"type": "status", "data": "CONNECTED"}
        client.stop_reading()
    ws = server.app.ws
    peak = 0
    with caplog.at_level(logging.INFO, logger="nanomsg.ws_server"):
        for i in range(1000):  # 16 KB each, to every subscriber
            if ws.closes[4000] >= 3:
                break
            assert (await sender.ask({"type": "message", "content": EMOJI * 4096}))["type"]
            peak = max(peak, ws.outbound)
            assert i < 999, "no subscriber was closed"
    # Six backlogs of up to 1 MiB each would be 6 MiB; the budget closed some first.
    assert peak <= budget + (1 << 20), peak
    assert any("outbound budget" in r.getMessage() for r in caplog.records)


# -- keepalive -----------------------------------------------------------------------------------


async def test_each_connection_is_pinged_once_per_interval_while_others_come_and_go(
    server_factory: ServerFactory, raw_clients: list[RawClient]
) -> None:
    interval = 0.6
    server = await server_factory(ping_interval=interval)
    for _ in range(20):  # more connections (answering no ping, they go after two intervals)
        raw_clients.append(await RawClient.open(server.app.ws_port))
    watched = await RawClient.open(server.app.ws_port)
    raw_clients.append(watched)
    stop = asyncio.Event()

    async def churn() -> None:
        """Connections open and close all the time, in numbers that keep changing."""
        others: list[RawClient] = []
        wave = 0
        while not stop.is_set():
            wave += 1
            for _ in range(2 if wave % 2 else 40):
                others.append(await RawClient.open(server.app.ws_port))
            await asyncio.sleep(0.05)
            for client in others[: len(others) // 2 + wave % 3]:
                client.abort()
            others = others[len(others) // 2 + wave % 3 :]
        for client in others:
            client.abort()

    churner = asyncio.create_task(churn())
    arrivals: list[float] = []
    try:
        while len(arrivals) < 8:
            opcode, payload = await watched.recv_frame(timeout=interval * 3)
            assert opcode == PING
            arrivals.append(time.monotonic())
            watched.writer.write(RawClient.frame(PONG, payload))
    finally:
        stop.set()
        await churner
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(interval * 0.9 < gap < interval * 1.1 for gap in gaps), gaps


# -- shutdown ------------------------------------------------------------------------------------


async def test_sigterm_with_an_idle_client_connected_ends_at_once_and_the_client_gets_1001(
    nodes: Nodes,  # noqa: F811
    tmp_path: Path,
) -> None:
    node = await start_node(nodes, tmp_path)
    owner = make_user()
    client = Client(await connect(node.ws_url, open_timeout=5))
    try:
        assert await client.recv() == {"type": "query", "data": "START?"}
        assert await client.ask({"type": "token", "content": owner.token}) == {
            "type": "status",
            "data": "READY",
        }
        closing = asyncio.create_task(client.expect_close())
        start = time.monotonic()
        assert await node.terminate() == 0
        took = time.monotonic() - start
        assert await closing == 1001
    finally:
        await client.close()
    # Before, the drain stopped reading: the client's close reply was never seen and the
    # server waited for the close timeout (~3 s).
    assert took < 1.5, took
    assert "shutdown: 1 connections closed with 1001 (0 without the client's answer)" in (
        node.tail()
    )


# -- close logging -------------------------------------------------------------------------------


async def test_each_close_the_server_starts_is_logged_once_with_connection_user_and_code(
    server_factory: ServerFactory,
    raw_clients: list[RawClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await server_factory(ping_interval=0.3)
    owner = server.user()
    silent = await RawClient.open(server.app.ws_port)  # logs in, never answers a ping
    raw_clients.append(silent)
    silent.send({"type": "token", "content": owner.token})
    with caplog.at_level(logging.INFO, logger="nanomsg.ws_server"):
        assert await silent.recv_frame() == (TEXT, b'{"type":"status","data":"READY"}')
        bad = await RawClient.open(server.app.ws_port)
        raw_clients.append(bad)
        for _ in range(3):
            bad.send({"type": "token", "content": "not-a-token"})
        assert await bad.close_code() == 1008
        big = await RawClient.open(server.app.ws_port)  # websockets itself refuses this one
        raw_clients.append(big)
        big.writer.write(RawClient.frame(TEXT, b" " * 70000))  # the socket may be reset

        async def too_big_closed() -> bool:
            return server.app.ws.closes[1009] == 1

        await eventually(too_big_closed, timeout=5)
        assert await silent.close_code() == 4001
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing")]
    (timeout_line,) = [line for line in lines if ": 4001 " in line]
    (policy_line,) = [line for line in lines if ": 1008 " in line]
    (too_big_line,) = [line for line in lines if ": 1009 " in line]
    assert "(user -)" in too_big_line
    assert owner.user in timeout_line and "no pong" in timeout_line
    assert "(user -)" in policy_line
    ws = server.app.ws
    assert ws.closes[4001] == 1 and ws.closes[1008] == 1 and ws.closes[1009] == 1
    assert len({line.split()[2] for line in lines}) == len(lines)  # one line per connection
    # The counts are what an operator reads from the side-port.
    status, health = await server.call("GET", "/healthz", None)
    assert status == 200
    assert health["content"]["closes"] == {"1008": 1, "1009": 1, "4001": 1}
