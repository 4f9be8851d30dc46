"""A slow-consumer storm: ``python -m benchmarks.slowstorm [--subscribers N] ...``.

Starts one ``python -m nanomsg serve`` (SQLite in a temporary directory, no Redis), puts N
subscribers in one room that stop reading once they are in (a small receive window, so the
server's own buffers fill), and has one publisher send messages as fast as acknowledgements
come back. It samples the server's RSS every 50 ms until every subscriber has been closed (or
``--seconds`` pass), then hangs up every client and measures the RSS again once the process
has settled. Prints one JSON line: RSS before, peak (VmHWM), after the storm, closes seen.

``--max-outbound`` and ``--max-backlog`` are passed to the server; ``--no-trim`` starts the
server with ``malloc_trim`` disabled, to show what it gives back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks.procstat import memory_kib
from benchmarks.tokens import mint

SECRET = "slowstorm-benchmark-secret-0123456789abcdef"
LISTENING = re.compile(r"nanomsg listening: ws://[^:]+:(\d+)/chat, http://[^:]+:(\d+)")
NO_TRIM = (
    "import sys, nanomsg.ws_server as w; w._libc = None; "
    "from nanomsg.cli import main; sys.exit(main())"
)


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes([0x81, 0x80 | size])
    else:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def open_ws(port: int, rcvbuf: int | None) -> tuple[asyncio.StreamReader, Any]:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /chat HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def read_text(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(2)
    size = head[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return await reader.readexactly(size)


async def login(port: int, token: str, room: int, rcvbuf: int | None) -> tuple[Any, Any]:
    reader, writer = await open_ws(port, rcvbuf)
    await read_text(reader)  # START?
    writer.write(masked_text(orjson.dumps({"type": "token", "content": token})))
    await read_text(reader)  # READY
    writer.write(masked_text(orjson.dumps({"type": "select_room", "room_id": room})))
    await read_text(reader)  # CONNECTED
    return reader, writer


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="slowstorm-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOMSG_")}
    env.update(
        NANOMSG_DATABASE_URL=f"sqlite:///{tmp / 'storm.db'}",
        NANOMSG_JWT_SECRET=SECRET,
        NANOMSG_PORT="0",
        NANOMSG_HTTP_PORT="0",
        NANOMSG_PING_INTERVAL="0",
        NANOMSG_MAX_BACKLOG=str(args.max_backlog),
        NANOMSG_MAX_OUTBOUND=str(args.max_outbound),
    )
    cmd = [sys.executable, "-c", NO_TRIM] if args.no_trim else [sys.executable, "-m", "nanomsg"]
    log = open(tmp / "server.log", "wb+")  # noqa: SIM115, ASYNC230 - read back below
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [*cmd, "serve"], env=env, stderr=log, stdout=subprocess.DEVNULL
    )
    try:
        ws_port = http_port = 0
        for _ in range(200):
            found = LISTENING.search((tmp / "server.log").read_text())
            if found:
                ws_port, http_port = int(found.group(1)), int(found.group(2))
                break
            await asyncio.sleep(0.05)
        assert ws_port, (tmp / "server.log").read_text()
        entity, user = str(uuid.uuid4()), str(uuid.uuid4())
        token = mint(SECRET, user=user, entity=entity, level=100)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{http_port}/rooms",
                json={"name": "storm", "level_admin": 100},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            room = (await resp.json())["content"]["room"]["id"]
        subscribers = [
            await login(ws_port, token, room, rcvbuf=4096) for _ in range(args.subscribers)
        ]
        for _, writer in subscribers:
            writer.transport.pause_reading()  # from now on they read nothing
        pub_reader, pub_writer = await login(ws_port, token, room, rcvbuf=None)
        before = memory_kib(proc.pid)
        assert before is not None
        content = "m" * args.size
        frame = masked_text(orjson.dumps({"type": "message", "content": content}))
        sent = received = 0
        start = time.monotonic()
        rss_peak = 0
        last_sample = 0.0
        while time.monotonic() - start < args.seconds:
            while sent - received < 32:
                pub_writer.write(frame)
                sent += 1
            await read_text(pub_reader)  # the echo of an earlier message
            received += 1
            now = time.monotonic()
            if now - last_sample > 0.05:
                last_sample = now
                mem = memory_kib(proc.pid)
                assert mem is not None
                rss_peak = max(rss_peak, mem[0])
                closed = (tmp / "server.log").read_text().count(": 4000 ")
                if closed >= args.subscribers:
                    break
        storm_seconds = time.monotonic() - start
        peak = memory_kib(proc.pid)
        assert peak is not None
        for _, writer in [*subscribers, (pub_reader, pub_writer)]:
            writer.transport.abort()
        await asyncio.sleep(args.settle)
        after = memory_kib(proc.pid)
        assert after is not None
        text = (tmp / "server.log").read_text()
        return {
            "scenario": "slowstorm",
            "subscribers": args.subscribers,
            "message_bytes": args.size,
            "max_backlog": args.max_backlog,
            "max_outbound": args.max_outbound,
            "malloc_trim": not args.no_trim,
            "messages_sent": received,
            "storm_seconds": round(storm_seconds, 1),
            "closed_4000": text.count(": 4000 "),
            "closed_for_budget": text.count("outbound budget"),
            "rss_before_mib": round(before[0] / 1024, 1),
            "rss_peak_mib": round(max(rss_peak, peak[1]) / 1024, 1),
            "rss_after_mib": round(after[0] / 1024, 1),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=400)
    parser.add_argument("--size", type=int, default=1000, help="message content bytes")
    parser.add_argument("--seconds", type=float, default=30.0, help="most the storm lasts")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before 'after'")
    parser.add_argument("--max-backlog", type=int, default=1 << 20)
    parser.add_argument("--max-outbound", type=int, default=256 << 20)
    parser.add_argument("--no-trim", action="store_true")
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
