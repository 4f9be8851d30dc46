"""The side-port's connection limits over raw sockets, on a real server of each backend: read
timeouts for request heads and bodies, the cap on open connections, and quiet logs for clients
that hang up or send malformed requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
import pytest

from tests.integration.conftest import Server, ServerFactory

# Short limits, so the tests wait for them in well under a second each.
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
BOUND = 5.0  # the longest any test waits for an event that should take about a timeout


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(srv: Server) -> Stream:
    return await asyncio.open_connection("127.0.0.1", srv.app.http_port)


async def closed_after(reader: asyncio.StreamReader, *, pace: Callable[[], None] | None) -> bytes:
    """Read until the server closes the connection (or BOUND passes), calling ``pace`` every
    0.1 s of silence; return everything received. Raises TimeoutError past BOUND."""
    received = b""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), 0.1)
        except TimeoutError:
            if pace is not None:
                pace()
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise TimeoutError("the server kept the connection open")


async def until(condition: Callable[[], bool]) -> None:
    """Wait, bounded, for a condition on the server's state."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def open_connections(srv: Server) -> int:
    """Connections aiohttp serves on the side-port (it keeps one handler per connection)."""
    runner = srv.app._runner
    assert runner is not None and runner.server is not None
    return len(runner.server.connections)


def request(method: str, path: str, token: str | None = None, body: bytes = b"") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{length}\r\n".encode() + body


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def envelope_of(raw: bytes) -> dict[str, object]:
    body = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert isinstance(body, dict)
    return body


@pytest.mark.asyncio
async def test_trickling_request_head_is_closed_after_the_header_timeout(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory(http_header_timeout=HEADER_TIMEOUT)
    reader, writer = await connect(srv)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    received = await closed_after(reader, pace=lambda: writer.write(b"X-Slow: 1\r\n"))
    elapsed = time.monotonic() - started
    writer.close()
    assert received == b""
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 2.0


@pytest.mark.asyncio
async def test_silent_connection_is_closed_after_the_header_timeout(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory(http_header_timeout=HEADER_TIMEOUT)
    reader, writer = await connect(srv)
    started = time.monotonic()
    assert await closed_after(reader, pace=None) == b""
    assert time.monotonic() - started < HEADER_TIMEOUT + 2.0
    writer.close()
    await until(lambda: open_connections(srv) == 0)


@pytest.mark.asyncio
async def test_keep_alive_connection_is_served_again_then_closed_once_idle(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory(http_header_timeout=HEADER_TIMEOUT)
    reader, writer = await connect(srv)
    for _ in range(2):  # a head in two pieces, well within the timeout, is served
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        await writer.drain()
        writer.write(b"Host: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert status_of(head) == 200
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), BOUND)
    started = time.monotonic()
    assert await closed_after(reader, pace=None) == b""
    assert HEADER_TIMEOUT * 0.9 <= time.monotonic() - started < HEADER_TIMEOUT + 2.0
    writer.close()


@pytest.mark.asyncio
async def test_stalled_body_is_answered_408_and_closed(server_factory: ServerFactory) -> None:
    srv = await server_factory(http_body_timeout=BODY_TIMEOUT, http_header_timeout=30)
    token = srv.user().token
    reader, writer = await connect(srv)
    body = orjson.dumps({"name": "slow", "level_admin": 100})
    # Announce the whole body, send half of it, and stall.
    writer.write(request("POST", "/rooms", token, body)[: -len(body) // 2])
    started = time.monotonic()
    received = await closed_after(reader, pace=None)
    assert time.monotonic() - started < BODY_TIMEOUT + 2.0
    writer.close()
    assert status_of(received) == 408
    assert envelope_of(received)["meta"] == {
        "code": 408,
        "message": "Request Timeout",
        "reason": f"request body not received within {BODY_TIMEOUT:g} s",
    }
    assert b"connection: close" in received.lower()


@pytest.mark.asyncio
async def test_connections_past_the_cap_get_503_while_the_others_are_served(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cap = 4
    srv = await server_factory(http_max_connections=cap, http_header_timeout=30)
    held = [await connect(srv) for _ in range(cap)]
    await until(lambda: open_connections(srv) == cap)
    caplog.set_level(logging.WARNING, logger="nanomsg.http_guard")
    for _ in range(3):
        extra_reader, extra_writer = await connect(srv)
        refused = await closed_after(extra_reader, pace=None)
        extra_writer.close()
        assert status_of(refused) == 503
        assert envelope_of(refused)["meta"] == {
            "code": 503,
            "message": "Service Unavailable",
            "reason": "too many connections",
        }
    # A flood of refusals is one log line per interval, not one per connection.
    assert len([r for r in caplog.records if r.name == "nanomsg.http_guard"]) == 1
    # The connections inside the cap are served.
    reader, writer = held[0]
    writer.write(request("GET", "/healthz"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    assert status_of(head) == 200
    # Once one leaves, a new connection is admitted again.
    for _, w in held:
        w.close()
    await until(lambda: open_connections(srv) == 0)
    reader, writer = await connect(srv)
    writer.write(request("GET", "/healthz"))
    assert status_of(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)) == 200
    writer.close()


@pytest.mark.asyncio
async def test_client_hanging_up_mid_body_logs_no_traceback(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = server.user().token
    _, writer = await connect(server)
    body = orjson.dumps({"name": "gone", "level_admin": 100})
    writer.write(request("POST", "/rooms", token, body)[:-5])
    await writer.drain()
    await until(lambda: open_connections(server) == 1)
    writer.close()
    await until(lambda: open_connections(server) == 0)
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []


@pytest.mark.asyncio
async def test_malformed_request_logs_one_line_without_traceback(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
    received = await closed_after(reader, pace=None)
    writer.close()
    assert status_of(received) == 400
    await until(lambda: open_connections(server) == 0)
    about_it = [r for r in caplog.records if "malformed" in r.getMessage().lower()]
    assert len(about_it) == 1
    assert "\n" not in about_it[0].getMessage()
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []
