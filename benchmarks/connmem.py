"""Where an idle connection's memory goes: ``python -m benchmarks.connmem [--connections N]``.

Opens N server-side connections in this process, without sockets (a transport that keeps
nothing stands in for the kernel): each gets the real HTTP upgrade, a valid token and a
``select_room`` of a room already live, through websockets' sans-I/O protocol and nanomsg's
shell, exactly as on the wire. tracemalloc then attributes the Python heap they hold to the
lines that allocated it. This is the part of ``connections``' RSS per connection that the
server's code controls; the rest is the event loop's C structures and allocator overhead.
Prints one JSON line and the top allocation sites.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from nanomsg.app import build_usecases
from nanomsg.auth import Verifier, mint
from nanomsg.clock import SystemClock
from nanomsg.config import Config
from nanomsg.fanout import Hub
from nanomsg.models import Room, RoomAccess, Rule
from nanomsg.store.sqlite import SqliteStore
from nanomsg.store.writer import BatchWriter
from nanomsg.ws_server import Connection, WsServer

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SECRET = "connmem-secret-0123456789abcdef0123"


class NullTransport:
    """Accepts writes and keeps nothing (the peer reads everything at once)."""

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Member:
    def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None:
        pass

    def reauthorize(self, room_id: int, access: RoomAccess | None) -> None:
        pass


def client_frame(obj: object) -> bytes:
    """A masked client text frame, as a browser would send it."""
    data = orjson.dumps(obj)
    mask = os.urandom(4)
    n = len(data)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def measure(count: int, top: int, rooms: int = 1) -> dict[str, Any]:
    clock = SystemClock()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(f"{tmp}/connmem.db")
        hub, writer = Hub(store), BatchWriter(store)
        server = WsServer(
            config=Config(),
            hub=hub,
            store=store,
            writer=writer,
            verifier=Verifier.from_material(clock=clock, secret=SECRET),
            clock=clock,
            usecases=build_usecases(store, clock, writer=writer, hub=hub),
        )
        now = datetime.now(UTC)
        entity = str(uuid.uuid4())
        # The rooms are live with their rules known, as for every select after the first.
        for room_id in range(1, rooms + 1):
            room = Room(room_id, str(uuid.uuid4()), "r", 100, "group", entity, 10, 0, now, now)
            rules = (Rule(room_id, entity, "entity", "rw", 100, True, now, now),)
            server.hub.join(_Member(), room_id, 0, RoomAccess(room, rules))
        frames = [
            (
                client_frame(
                    {
                        "type": "token",
                        "content": mint(
                            secret=SECRET,
                            user=str(uuid.uuid4()),
                            entity=entity,
                            level=100,
                            now=time.time(),
                        ),
                    }
                ),
                client_frame({"type": "select_room", "room_id": 1}),
                [
                    client_frame({"type": "subscribe", "room_id": room_id})
                    for room_id in range(2, rooms + 1)
                ],
            )
            for _ in range(count)
        ]
        gc.collect()
        tracemalloc.start(12)
        before = tracemalloc.take_snapshot()
        conns = []
        for token, select, subscribes in frames:
            conn = Connection(server)
            conn.connection_made(NullTransport())  # type: ignore[arg-type]
            conn.data_received(UPGRADE)
            conn.data_received(token)
            conn.data_received(select)
            for subscribe in subscribes:
                conn.data_received(subscribe)
            conns.append(conn)
        # Until every connection is idle: its commands answered (authentication settles DMs in
        # a task first) and its outbox written, so replies still queued are not counted as
        # what an idle connection holds.
        for _ in range(1000):
            await asyncio.sleep(0)
            if not any(c.outbox or c.inbox or c.busy for c in conns):
                break
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        joined = sum(
            1
            for c in conns
            if c.session is not None
            and len(c.session.subs) == rooms
            and all(sub.joined for sub in c.session.subs.values())
        )
        stats = after.compare_to(before, "traceback")
        total = sum(s.size_diff for s in stats)
        sites = []
        for stat in sorted(stats, key=lambda s: -s.size_diff)[:top]:
            ours = [
                f for f in stat.traceback if "/nanomsg/" in f.filename or "websockets" in f.filename
            ]
            frames_ = ours[-3:] if ours else list(stat.traceback)[-1:]
            where = " <- ".join(
                f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}" for f in reversed(frames_)
            )
            sites.append({"bytes_per_conn": round(stat.size_diff / count), "where": where})
        for conn in conns:
            conn.connection_lost(None)
    return {
        "scenario": "connmem",
        "connections": count,
        "rooms_per_conn": rooms,
        "joined": joined,
        "python_heap_bytes_per_conn": round(total / count),
        "top_sites": sites,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.connmem", description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=12, help="allocation sites to list")
    parser.add_argument(
        "--rooms",
        type=int,
        default=1,
        help="rooms each connection holds (1 selected, the rest subscribed)",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.connections, args.top, args.rooms))
    print(json.dumps(result))
    print(
        f"{result['joined']:,} of {args.connections:,} connections authenticated and joined; "
        f"Python heap {result['python_heap_bytes_per_conn']:,} B per connection",
        file=sys.stderr,
    )
    for site in result["top_sites"]:
        print(f"  {site['bytes_per_conn']:6,} B  {site['where']}", file=sys.stderr)
    return 0 if result["joined"] == args.connections else 1


if __name__ == "__main__":
    raise SystemExit(main())
