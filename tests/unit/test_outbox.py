"""The per-connection outbox of the WebSocket shell, driven without sockets: a recording
transport stands in for the kernel, the HTTP upgrade and frames are real bytes through
websockets' sans-I/O protocol."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from nanomsg.app import build_usecases
from nanomsg.auth import Verifier
from nanomsg.clock import SystemClock
from nanomsg.config import Config
from nanomsg.events import EndReplay, Join, Leave, Send
from nanomsg.fanout import Hub, text_frame
from nanomsg.store.sqlite import SqliteStore
from nanomsg.store.writer import BatchWriter
from nanomsg.subscription import SubEvent, Subscription, SubState
from nanomsg.ws_server import Connection, WsServer, _Reply

pytestmark = pytest.mark.asyncio

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RecordingTransport:
    """A transport whose peer never reads: everything written stays buffered."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return sum(len(w) for w in self.writes)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[WsServer]:
    store = SqliteStore(str(tmp_path / "outbox.db"))
    clock = SystemClock()
    hub, writer = Hub(store), BatchWriter(store)
    ws = WsServer(
        config=Config(max_backlog=4096),
        hub=hub,
        store=store,
        writer=writer,
        verifier=Verifier.from_material(clock=clock, secret="outbox-test-secret-0123456789abcd"),
        clock=clock,
        usecases=build_usecases(store, clock, writer=writer, hub=hub),
    )
    yield ws
    for conn in list(ws.connections):
        conn.connection_lost(None)


def connect(server: WsServer) -> tuple[Connection, RecordingTransport]:
    conn = Connection(server)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(UPGRADE)
    assert transport.writes[0].startswith(b"HTTP/1.1 101")
    assert transport.writes[-1] == text_frame(b'{"type":"query","data":"START?"}')
    transport.writes.clear()
    return conn, transport


def frame(n: int, size: int = 10) -> bytes:
    return text_frame(b"%d:" % n + b"x" * size)


def close_code(data: bytes) -> int:
    """The status code of the WebSocket close frame at the end of ``data``."""
    # Close frames from the server are short and unmasked: 0x88, length, code, reason.
    start = data.rindex(b"\x88")
    payload_len = data[start + 1]
    code: int = struct.unpack("!H", data[start + 2 : start + 4])[0]
    assert start + 2 + payload_len == len(data)
    return code


async def one_pass() -> None:
    """Let the event loop run the callbacks scheduled so far (the outbox flush among them)."""
    await asyncio.sleep(0)


async def test_frames_of_one_loop_pass_go_out_in_one_write_in_order(server: WsServer) -> None:
    conn, transport = connect(server)
    for seq in (1, 2, 3):
        conn.write_frame(frame(seq), seq)
    assert transport.writes == []  # nothing is written before the end of the pass
    await one_pass()
    assert transport.writes == [frame(1) + frame(2) + frame(3)]


async def test_each_receiver_of_a_room_gets_one_write_per_pass(server: WsServer) -> None:
    members = [connect(server) for _ in range(3)]
    for conn, _ in members:
        server.hub.join(conn, room_id=7, last_seq=0)
    frames = [frame(seq) for seq in range(1, 6)]
    for seq, data in enumerate(frames, start=1):
        for conn, _ in members:
            conn.write_frame(data, seq)
    await one_pass()
    for _, transport in members:
        assert transport.writes == [b"".join(frames)]


async def test_passes_after_a_flush_start_a_new_write(server: WsServer) -> None:
    conn, transport = connect(server)
    conn.write_frame(frame(1), 1)
    await one_pass()
    conn.write_frame(frame(2), 2)
    conn.write_frame(frame(3), 3)
    await one_pass()
    assert transport.writes == [frame(1), frame(2) + frame(3)]


async def test_control_frames_keep_their_place_after_queued_frames(server: WsServer) -> None:
    conn, transport = connect(server)
    conn.write_frame(frame(1), 1)
    conn.ping()  # websockets' own output (a ping) is written after what is already queued
    conn.write_frame(frame(2), 2)
    await one_pass()
    stream = b"".join(transport.writes)
    assert conn.pong_pending is not None
    ping = b"\x89\x08" + conn.pong_pending
    assert stream == frame(1) + ping + frame(2)


def hold(
    conn: Connection, room_id: int, *, min_seq: int = 0, held: list[bytes] | None = None
) -> Subscription:
    """Make ``conn``'s session hold ``room_id`` (as a granted select or subscribe does), with
    a resume floor or frames held behind its replay when given."""
    assert conn.session is not None
    sub = Subscription(room_id, explicit=True)
    sub.fire(SubEvent.GRANTED)
    sub.min_seq, sub.held = min_seq, held
    conn.session.subs.set(sub)
    return sub


async def test_frames_already_had_are_not_written(server: WsServer) -> None:
    conn, transport = connect(server)
    hold(conn, 7, min_seq=2)  # a resume of room 7 since seq 2
    hold(conn, 8)  # another room held: its floor is its own
    for seq in (1, 2, 3):
        conn.write_frame(frame(seq), seq, 7)
    conn.write_frame(frame(2), 2, 8)
    await one_pass()
    assert transport.writes == [frame(3) + frame(2)]


async def test_a_resume_floor_is_kept_only_while_it_can_drop_something(
    server: WsServer,
) -> None:
    """Room 7 resumes since seq 9 while this process has delivered up to 5: the hub writes it
    live from 6, so seqs 6-9 are dropped by its floor, and once its stream passes 9 the room
    goes back to its compact form. Room 8 resumes since 5, just below where the hub starts
    writing it: no floor is needed, and the room is compact again when its replay is out."""
    conn, transport = connect(server)
    assert conn.session is not None
    subs = conn.session.subs
    for room_id, since in ((7, 9), (8, 5)):
        sub = Subscription(room_id, explicit=True)
        sub.fire(SubEvent.GRANTED_RESUME)  # as the session does before its Join
        subs.set(sub)
        conn.session._replay = room_id
        conn.apply([Join(room_id, last_seq=5, since=since)])
        assert subs.objects is not None and room_id in subs.objects  # replaying: an object
        for _ in range(100):  # the replay (nothing missed) comes back from a task
            if not conn.busy and conn.reply is None:
                break
            await asyncio.sleep(0.001)
        assert subs[room_id].state is SubState.LIVE
    assert subs.objects is not None and list(subs.objects) == [7]  # 7 keeps its floor
    assert subs[7].min_seq == 9 and subs[8].min_seq == 0
    await one_pass()
    transport.writes.clear()
    for seq in (6, 7, 8, 9, 10):
        conn.write_frame(frame(seq), seq, 7)
    await one_pass()
    assert transport.writes == [frame(10)]
    assert subs.objects is None  # past its floor: compact again


async def test_outbox_over_the_backlog_bound_closes_4000_and_spares_others(
    server: WsServer,
) -> None:
    slow, slow_transport = connect(server)
    other, other_transport = connect(server)
    big = frame(0, size=1500)
    for seq in range(1, 5):  # 4 x ~1.5 KB passes max_backlog=4096 within one pass
        slow.write_frame(big, seq)
        other.write_frame(frame(seq), seq)
    await one_pass()
    assert slow.closing
    # The queued frames were dropped; what went out is the close frame, code 4000.
    assert big not in b"".join(slow_transport.writes)
    assert close_code(b"".join(slow_transport.writes)) == 4000
    assert other_transport.writes == [b"".join(frame(s) for s in range(1, 5))]
    assert not other.closing


async def test_reader_that_never_reads_is_closed_when_the_kernel_buffer_fills(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    seq = 0
    while not conn.closing and seq < 100:
        seq += 1
        conn.write_frame(frame(seq, size=1000), seq)  # under the bound per pass
        await one_pass()
    # The transport keeps everything (the peer never reads): the bound is the sum.
    assert conn.closing and seq <= 6
    assert close_code(transport.writes[-1]) == 4000


DEFLATE_OFFER = UPGRADE.replace(
    b"\r\n\r\n",
    b"\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
)


def upgrade_with_offer(server: WsServer) -> tuple[Connection, RecordingTransport]:
    conn = Connection(server)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(DEFLATE_OFFER)
    return conn, transport


async def test_compression_is_off_by_default_even_when_the_client_offers_it(
    server: WsServer,
) -> None:
    assert server.config.compression is False
    conn, transport = upgrade_with_offer(server)
    response = transport.writes[0]
    assert response.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in response.lower()
    assert conn.deflate_bits is None
    conn.write_frame(frame(1), 1)
    await one_pass()
    assert transport.writes[-1] == frame(1)


async def test_with_compression_on_a_room_message_is_compressed_once_for_all_receivers(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "deflate.db"))
    clock = SystemClock()
    hub, writer = Hub(store), BatchWriter(store)
    ws = WsServer(
        config=Config(compression=True),
        hub=hub,
        store=store,
        writer=writer,
        verifier=Verifier.from_material(clock=clock, secret="outbox-test-secret-0123456789abcd"),
        clock=clock,
        usecases=build_usecases(store, clock, writer=writer, hub=hub),
    )
    members = [upgrade_with_offer(ws) for _ in range(3)]
    for conn, transport in members:
        assert b"permessage-deflate" in transport.writes[0]
        assert conn.deflate_bits == 15
        transport.writes.clear()
    payload = b'{"type":"message","data":{"content":"' + b"hello " * 50 + b'"}}'
    plain = text_frame(payload)
    for conn, _ in members:
        conn.write_frame(plain, 1)
    await one_pass()

    assert ws.deflate.compressions == 1
    for _, transport in members:
        (data,) = transport.writes
        assert data[0] == 0xC1  # FIN + RSV1 (compressed) + text
        assert len(data) < len(plain) // 3
        body = data[2:] if data[1] < 126 else data[4:]
        assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == payload
    for conn, _ in members:
        conn.connection_lost(None)


def client_frame(payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked client text frame (payloads under 126 bytes)."""
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


BAD_TOKEN = client_frame(b'{"type":"token","content":"not-a-jwt"}')
BADAUTH = text_frame(b'{"type":"status","data":"BADAUTH"}')


async def test_the_upgrade_request_is_not_kept_after_the_handshake(server: WsServer) -> None:
    conn, transport = connect(server)
    parser = conn.ws.parser
    assert parser.gi_frame is not None and "request" not in parser.gi_frame.f_locals
    conn.data_received(BAD_TOKEN[:3])  # frames still parse, across reads
    conn.data_received(BAD_TOKEN[3:])
    await one_pass()
    assert b"".join(transport.writes) == BADAUTH


async def test_frame_bytes_arriving_with_the_upgrade_keep_the_original_parser(
    server: WsServer,
) -> None:
    conn = Connection(server)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(UPGRADE + BAD_TOKEN[:5])  # a partial frame right behind the request
    conn.data_received(BAD_TOKEN[5:])
    await one_pass()
    assert b"".join(transport.writes).endswith(BADAUTH)


def start_long_reply(conn: Connection, frames: list[bytes]) -> None:
    """What the shell does with a history or replay result: a long reply, live frames held."""
    conn.reply = _Reply(list(frames), sum(map(len, frames)), streaming=True)
    conn.held, conn.busy = [], True


async def test_a_long_reply_waits_for_the_transport_and_live_frames_follow_it(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    reply = [frame(seq, size=500) for seq in range(1, 31)]  # ~15 KB, max_backlog is 4 KiB
    start_long_reply(conn, reply)
    conn.pause_writing()  # the client has not read yet
    conn._send_reply()
    assert transport.writes == []
    conn.write_frame(frame(31), 31)  # live, meanwhile
    conn.resume_writing()  # the client read: the reply goes out, then the live frame
    await one_pass()
    assert b"".join(transport.writes) == b"".join(reply) + frame(31)
    assert max(map(len, transport.writes)) <= 1024 + len(reply[0])  # in chunks
    assert not conn.closing and not conn.busy and conn.held is None and conn.reply is None


async def test_live_frames_held_behind_a_reply_nobody_reads_close_4000(server: WsServer) -> None:
    conn, transport = connect(server)
    start_long_reply(conn, [frame(1, size=500)])
    conn.pause_writing()
    seq = 1
    while not conn.closing and seq < 100:
        seq += 1
        conn.write_frame(frame(seq, size=500), seq)
    assert conn.closing and seq < 20  # 4 KiB held, nothing of the reply read
    assert close_code(transport.writes[-1]) == 4000
    assert conn.held is None and conn.reply is None  # dropped


async def test_frames_held_behind_a_reply_being_read_may_pass_the_backlog_bound(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    start_long_reply(conn, [frame(1, size=500)])
    conn.pause_writing()
    assert conn.reply is not None
    conn.reply.streamed = 20_000  # the client has taken 20 KB of the reply so far
    for seq in range(2, 40):  # ~19 KB held: over max_backlog (4 KiB), under 4 KiB + 20 KB
        conn.write_frame(frame(seq, size=500), seq)
    assert not conn.closing
    for seq in range(40, 60):
        conn.write_frame(frame(seq, size=500), seq)
    assert conn.closing and close_code(transport.writes[-1]) == 4000


async def test_leaving_the_room_while_its_replay_is_read_forgets_the_replay(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    hold(conn, 7, held=[])  # its replay is being read
    hold(conn, 8)
    conn.write_frame(frame(5), 5, 7)  # held behind room 7's replay
    conn.write_frame(frame(1), 1, 8)  # another room's frames are not held
    assert conn.held_bytes == len(frame(5))
    assert conn.session is not None
    conn.session.subs.pop(7)  # the session dropped the room, then asks the shell to leave
    conn.apply([Leave(7)])
    assert conn.held_bytes == 0 and conn.reply is None
    await one_pass()
    assert transport.writes == [frame(1)]


async def test_a_rooms_replay_holds_only_that_rooms_frames_and_they_follow_the_replay(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    replaying = hold(conn, 7, held=[])  # room 7's resume replay is being read
    hold(conn, 8)
    conn.write_frame(frame(5), 5, 7)  # held by room 7's subscription
    conn.write_frame(frame(1), 1, 8)  # room 8 flows meanwhile
    await one_pass()
    assert transport.writes == [frame(1)]
    transport.writes.clear()
    # The replay is read: written as a long reply, then room 7's held frames, in that order.
    conn.reply, conn.held, conn.busy = _Reply(streaming=True), [], True
    replay = text_frame(b'{"replayed":4}')
    conn.apply([Send(b'{"replayed":4}'), EndReplay(7)])
    assert replaying.held is None
    conn.write_frame(frame(2), 2, 8)  # arrives after the replay result: behind the reply too
    conn._send_reply()
    assert b"".join(transport.writes) == replay + frame(5) + frame(2)
    assert conn.reply is None and conn.held is None and conn.held_bytes == 0 and not conn.busy


class _Watcher:
    """A receiver of the hub: records the frames written to it."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None:
        self.frames.append(frame)

    def reauthorize(self, room_id: int, access: Any) -> None:
        pass


async def test_an_edit_stored_after_its_sender_closed_still_reaches_the_room(
    server: WsServer,
) -> None:
    from nanomsg.clock import utc_datetime
    from nanomsg.events import ChangeMessage
    from nanomsg.fanout import frame_payload
    from nanomsg.models import Principal
    from nanomsg.store.base import NewMessage, NewRoom

    user, entity = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
    now = utc_datetime(1_800_000_000)
    await server.store.open()
    server.writer.start()
    try:
        room = await server.store.create_room(
            NewRoom("r", 100, "group", entity, 100, user, 100, now)
        )
        await server.store.append_message(NewMessage(room.id, user, entity, "typo", None, now))
        watcher = _Watcher()
        server.hub.join(watcher, room.id, last_seq=1)
        conn, _ = connect(server)
        principal = Principal(user, entity, 100, 0, {})
        conn._change(ChangeMessage(principal, room.id, 1, "fixed"))  # handed to the writer
        conn.closing = True  # the editor's connection closed while its edit was stored
        await asyncio.gather(*list(server._tasks))  # the room's rules read (not kept here)
        await server.writer.flush()
        assert [orjson.loads(frame_payload(f))["type"] for f in watcher.frames] == ["edited"]
    finally:
        await server.writer.close()
        await server.store.close()
