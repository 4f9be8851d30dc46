"""The hub's ordering and recovery, with recording receivers and a real SQLite store (a file,
no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from nanomsg.clock import utc_datetime
from nanomsg.fanout import Hub, text_frame
from nanomsg.models import Message, RoomAccess
from nanomsg.store.base import NewMessage, NewRoom
from nanomsg.store.sqlite import SqliteStore

pytestmark = pytest.mark.asyncio
USER = "00000000-0000-4000-8000-000000000001"
ENTITY = "00000000-0000-4000-8000-000000000002"


class Recorder:
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.frames: list[bytes] = []

    def write_frame(self, frame: bytes, seq: int) -> None:
        self.frames.append(frame)
        self.seqs.append(seq)

    def reauthorize(self, access: RoomAccess | None) -> None:
        pass


class RecordingRelay:
    def __init__(self) -> None:
        self.watched: set[int] = set()
        self.published: list[int] = []

    def publish(self, message: Message) -> None:
        self.published.append(message.seq)

    def watch(self, room_id: int) -> None:
        self.watched.add(room_id)

    def unwatch(self, room_id: int) -> None:
        self.watched.discard(room_id)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "hub.db"))
    await s.open()
    yield s
    await s.close()


async def room_with(store: SqliteStore, n: int) -> tuple[int, list[Message]]:
    now = utc_datetime(1_800_000_000)
    room = await store.create_room(NewRoom("r", 100, "group", ENTITY, 100, USER, 100, now))
    stored = []
    for i in range(n):
        msg, _ = await store.append_message(NewMessage(room.id, USER, ENTITY, f"m{i}", None, now))
        stored.append(msg)
    return room.id, stored


async def test_early_messages_wait_for_their_turn(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 3)
    hub, rec = Hub(store, gap_timeout=10), Recorder()
    hub.join(rec, room, last_seq=0)
    for m in (msgs[2], msgs[0], msgs[1]):
        hub.deliver(m)
    assert rec.seqs == [1, 2, 3]
    await hub.close()


async def test_duplicates_are_dropped(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 2)
    hub, rec = Hub(store), Recorder()
    hub.join(rec, room, last_seq=0)
    for m in (msgs[0], msgs[0], msgs[1], msgs[0], msgs[1]):
        hub.deliver(m)
    assert rec.seqs == [1, 2]
    await hub.close()


async def test_one_frame_is_built_per_message_and_shared_by_receivers(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 1)
    hub = Hub(store)
    a, b = Recorder(), Recorder()
    hub.join(a, room, 0)
    hub.join(b, room, 0)
    hub.deliver(msgs[0])
    assert a.frames[0] is b.frames[0]  # the same bytes object: encoded once
    frame = a.frames[0]
    payload = frame[4:] if frame[1] == 126 else frame[2:]  # 16-bit or 7-bit length
    assert a.frames[0] == text_frame(payload)
    assert orjson.loads(payload)["data"]["seq"] == 1
    await hub.close()


async def test_a_gap_that_does_not_close_is_filled_from_storage(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 3)
    hub, rec = Hub(store, gap_timeout=0.05), Recorder()
    hub.join(rec, room, 0)
    hub.deliver(msgs[2])  # 1 and 2 never arrive through the relay
    assert rec.seqs == []
    await asyncio.sleep(0.3)
    assert rec.seqs == [1, 2, 3]
    await hub.close()


async def test_head_check_recovers_a_lost_last_message(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 2)
    hub, rec = Hub(store, head_check=0), Recorder()
    hub.join(rec, room, 0)
    hub.deliver(msgs[0])  # message 2's publish was lost and nothing follows it
    await hub.check_heads()
    await asyncio.sleep(0.1)
    assert rec.seqs == [1, 2]
    await hub.close()


async def test_join_reports_the_first_live_seq(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 2)
    hub = Hub(store)
    assert hub.join(Recorder(), room, last_seq=2) == 3
    hub.deliver(Message(99, room, 3, USER, ENTITY, "x", msgs[0].created_at))
    assert hub.join(Recorder(), room, last_seq=2) == 4  # an existing channel decides
    await hub.close()


async def test_relay_watches_a_room_while_it_has_local_receivers(store: SqliteStore) -> None:
    room, msgs = await room_with(store, 1)
    hub, relay = Hub(store), RecordingRelay()
    hub.attach(relay)
    a, b = Recorder(), Recorder()
    hub.join(a, room, 0)
    hub.join(b, room, 0)
    assert relay.watched == {room}
    hub.publish(msgs[0])
    assert relay.published == [1] and a.seqs == [1]
    hub.leave(a, room)
    assert relay.watched == {room}
    hub.leave(b, room)
    assert relay.watched == set()
    await hub.close()


async def test_rules_of_a_live_room_are_kept_until_its_last_receiver_leaves(
    store: SqliteStore,
) -> None:
    room, _ = await room_with(store, 0)
    access = await store.room_access(room)
    hub, a, b = Hub(store), Recorder(), Recorder()
    assert hub.cached_access(room) is None
    hub.join(a, room, 0, access)
    hub.join(b, room, 0, None)  # a later joiner does not erase what is known
    assert hub.cached_access(room) is access
    hub.leave(a, room)
    assert hub.cached_access(room) is access
    hub.leave(b, room)
    assert hub.cached_access(room) is None  # not live here: the next select reads storage
    await hub.close()


async def test_room_changed_forgets_the_rules_at_once_and_the_recheck_stores_new_ones(
    store: SqliteStore,
) -> None:
    room, _ = await room_with(store, 0)
    before = await store.room_access(room)
    assert before is not None
    hub, rec = Hub(store), Recorder()
    hub.join(rec, room, 0, before)
    await store.put_rule(room, "someone", "user", "rw", 0, True, utc_datetime(1_800_000_001))

    hub.room_changed(room)
    assert hub.cached_access(room) is None  # a select right now must read storage
    await asyncio.sleep(0.1)
    after = hub.cached_access(room)
    assert after is not None and after != before
    assert {r.subject for r in after.rules} == {r.subject for r in before.rules} | {"someone"}
    await hub.close()
