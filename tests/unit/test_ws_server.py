"""Bounds of the WebSocket shell driven without sockets (see test_outbox): reading paused
while writes do not drain, control-frame replies counted, the keepalive pong matched to its
ping, and the process-wide outbound budget."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from nanomsg.app import build_usecases
from nanomsg.auth import Verifier, mint
from nanomsg.clock import SystemClock
from nanomsg.config import Config
from nanomsg.events import Token
from nanomsg.fanout import Hub
from nanomsg.models import Principal, Room, RoomAccess, Rule
from nanomsg.permissions import evaluate
from nanomsg.session import State
from nanomsg.store.sqlite import SqliteStore
from nanomsg.store.writer import BatchWriter
from nanomsg.subscription import SubEvent, Subscription, Subscriptions
from nanomsg.ws_server import WsServer
from tests.unit.test_outbox import close_code, connect, frame, one_pass


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[WsServer]:
    """A shell over SQLite: 4 KiB per connection, 6 000 bytes for the whole process."""
    store = SqliteStore(str(tmp_path / "ws.db"))
    clock = SystemClock()
    hub, writer = Hub(store), BatchWriter(store)
    ws = WsServer(
        config=Config(max_backlog=4096, max_outbound=6000),
        hub=hub,
        store=store,
        writer=writer,
        verifier=Verifier.from_material(clock=clock, secret="ws-server-test-secret-0123456789ab"),
        clock=clock,
        usecases=build_usecases(store, clock, writer=writer, hub=hub),
    )
    yield ws
    for conn in list(ws.connections):
        conn.connection_lost(None)
    await store.close()  # a test may open it; its thread would keep the process alive


pytestmark = pytest.mark.asyncio


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (payloads under 126 bytes), masked as clients must."""
    assert len(payload) < 126
    mask = b"\x0a\x0b\x0c\x0d"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


PING, PONG = 0x9, 0xA


async def test_reading_stops_while_the_transport_is_over_its_high_water_mark(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    conn.pause_writing()  # what asyncio calls when the client does not read
    assert not transport.reading
    conn.resume_writing()
    assert transport.reading


async def test_pongs_past_the_backlog_bound_close_4000(server: WsServer) -> None:
    conn, transport = connect(server)  # max_backlog=4096; the peer never reads
    conn.data_received(masked(PING, b"p" * 100) * 20)  # one read, ~2 KB of pongs
    assert not conn.closing
    conn.data_received(masked(PING, b"p" * 100) * 40)
    assert conn.closing
    assert close_code(transport.writes[-1]) == 4000
    assert server.closes[4000] == 1


async def test_only_the_pong_of_the_ping_sent_answers_it(server: WsServer) -> None:
    liar, liar_transport = connect(server)
    honest, _ = connect(server)
    for conn in (liar, honest):
        conn.ping()
        assert conn.pong_pending is not None
    liar.data_received(masked(PONG, b"nanomsg"))  # unsolicited, or an old payload
    answer = honest.pong_pending
    assert answer is not None
    honest.data_received(masked(PONG, answer))
    assert liar.pong_pending is not None and honest.pong_pending is None
    liar.ping()
    honest.ping()
    assert liar.closing and close_code(liar_transport.writes[-1]) == 4001
    assert not honest.closing


async def test_past_the_outbound_budget_the_largest_backlogs_are_closed_first(
    server: WsServer, caplog: pytest.LogCaptureFixture
) -> None:
    small, _ = connect(server)
    big, big_transport = connect(server)
    middle, _ = connect(server)
    for seq, (conn, size) in enumerate([(small, 500), (big, 2900), (middle, 1800)], start=1):
        conn.write_frame(frame(seq, size=size), seq)
    await one_pass()
    await one_pass()
    assert not any(conn.closing for conn in (small, big, middle))  # 5.2 KB in all: fits
    small.write_frame(frame(9, size=1000), 9)
    with caplog.at_level(logging.INFO, logger="nanomsg.ws_server"):
        await one_pass()
        await one_pass()
    assert big.closing and close_code(big_transport.writes[-1]) == 4000
    assert not small.closing and not middle.closing
    assert big_transport.closed  # dropped at once: its buffer is not kept for the handshake
    assert server.closes[4000] == 1
    (line,) = [r.getMessage() for r in caplog.records if "4000" in r.getMessage()]
    assert big.conn_id in line and "budget" in line


def held(*subs: Subscription) -> Subscriptions:
    """A connection's rooms, as the session keeps them."""
    rooms = Subscriptions()
    for sub in subs:
        rooms.set(sub)
    return rooms


async def test_a_receipt_is_dropped_while_its_room_replays_and_for_its_own_user(
    server: WsServer,
) -> None:
    conn, transport = connect(server)
    session = conn.session
    assert session is not None
    session.principal = Principal(user="me", entity="e", level=0, exp=0, claims={})
    live, replaying = Subscription(7, explicit=True), Subscription(8, explicit=True)
    live.fire(SubEvent.GRANTED)
    replaying.fire(SubEvent.GRANTED_RESUME)
    replaying.held = []
    session.subs = held(live, replaying)
    receipt = frame(1)
    conn.write_signal(receipt, 8, "someone")  # replaying: dropped, not held
    assert replaying.held == [] and conn.held_bytes == 0
    conn.write_signal(receipt, 7, "me")  # about this connection's own user
    conn.write_signal(receipt, 9, "someone")  # a room not held
    assert conn.outbox == []
    conn.write_signal(receipt, 7, "someone")
    assert conn.outbox == [receipt]  # no seq: the room's resume floor does not apply
    await one_pass()
    assert transport.writes == [receipt]


async def test_receipts_count_against_the_backlog_like_any_frame(server: WsServer) -> None:
    conn, transport = connect(server)  # max_backlog=4096; the peer never reads
    session = conn.session
    assert session is not None
    session.principal = Principal(user="me", entity="e", level=0, exp=0, claims={})
    sub = Subscription(7, explicit=True)
    sub.fire(SubEvent.GRANTED)
    session.subs = held(sub)
    for _ in range(5):
        conn.write_signal(frame(1, 1000), 7, "someone")
    assert conn.closing and close_code(transport.writes[-1]) == 4000


async def test_a_refresh_decides_held_rooms_on_the_hubs_rules_and_reads_storage_only_without(
    server: WsServer,
) -> None:
    """A token refresh that changes the level decides every held room again: room 7 on the
    rules the hub keeps (it is not in storage at all, so a read would lose it), room 8, whose
    rules the hub does not have, from storage (where it does not exist: lost, by name)."""
    await server.store.open()
    conn, transport = connect(server)
    session = conn.session
    assert session is not None
    user, entity = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
    secret = "ws-server-test-secret-0123456789ab"
    session.principal = Principal(user=user, entity=entity, level=100, exp=0, claims={})
    session.state = State.READY
    now = datetime.now(UTC)
    kept = RoomAccess(
        Room(7, "u7", "r", 100, "group", "other", 10, 0, now, now),
        (Rule(7, user, "user", "r", 0, True, now, now),),
    )
    server.hub.join(conn, 7, 0, kept)
    server.hub.join(conn, 8, 0, None)  # the hub has no rules for room 8
    for room_id, rules in ((7, kept), (8, kept)):
        sub = Subscription(room_id, explicit=True)
        sub.fire(SubEvent.GRANTED)
        sub.access = evaluate(session.principal, rules.room, rules.rules)
        session.subs.set(sub)
    refresh = mint(secret=secret, user=user, entity=entity, level=5, now=time.time())
    conn.apply(session.receive(Token(refresh)))
    assert conn.busy  # room 8's rules are being read: later commands wait
    for _ in range(1000):
        if not conn.busy:
            break
        await asyncio.sleep(0.001)
    assert not conn.busy
    await one_pass()
    sent = [orjson.loads(w[2:]) for w in transport.writes]
    assert sent == [
        {"type": "status", "data": "READY"},
        {"type": "status", "data": "NOTAUTHORIZED", "room_id": 8},
    ]
    assert list(session.subs) == [7]
    assert server.hub.receivers(8) == [] and server.hub.receivers(7) == [conn]
