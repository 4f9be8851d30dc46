"""The hub's ordering and recovery, with recording receivers and a real SQLite store (a file,
no sockets)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from nanomsg import codec
from nanomsg.auth import Verifier, mint
from nanomsg.clock import FakeClock, utc_datetime
from nanomsg.events import Effect, Join, Leave, LoadRoom, RoomLoaded, SelectRoom, Token
from nanomsg.fanout import Hub, frame_payload, text_frame
from nanomsg.models import Message, RoomAccess
from nanomsg.session import Limits, Session
from nanomsg.store.base import NewMessage, NewRoom
from nanomsg.store.sqlite import SqliteStore

pytestmark = pytest.mark.asyncio
USER = "00000000-0000-4000-8000-000000000001"
ENTITY = "00000000-0000-4000-8000-000000000002"


class Recorder:
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.rooms: list[int] = []
        self.rechecked: list[tuple[int, RoomAccess | None]] = []

    def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None:
        self.frames.append(frame)
        self.seqs.append(seq)
        self.rooms.append(room_id)

    def reauthorize(self, room_id: int, access: RoomAccess | None) -> None:
        self.rechecked.append((room_id, access))


class RecordingRelay:
    def __init__(self) -> None:
        self.watched: set[int] = set()
        self.published: list[int] = []
        self.up = True

    def publish(self, message: Message) -> None:
        self.published.append(message.seq)

    def watch(self, room_id: int) -> None:
        self.watched.add(room_id)

    def unwatch(self, room_id: int) -> None:
        self.watched.discard(room_id)

    def healthy(self) -> bool:
        return self.up


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


async def test_kept_rules_are_not_used_while_the_relay_cannot_hear_change_notices(
    store: SqliteStore,
) -> None:
    room, _ = await room_with(store, 0)
    access = await store.room_access(room)
    hub, relay, rec = Hub(store), RecordingRelay(), Recorder()
    hub.attach(relay)
    hub.join(rec, room, 0, access)
    assert hub.cached_access(room) is not None
    relay.up = False  # e.g. Redis unreachable: another node's revocation would be missed
    assert hub.cached_access(room) is None  # so a select reads storage instead
    relay.up = True
    assert hub.cached_access(room) is not None
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


async def test_every_change_notice_is_counted_even_for_a_room_not_live_here(
    store: SqliteStore,
) -> None:
    """A select that read a room's rules compares this count before and after: a notice for
    a room with no channel yet reaches no channel, and would otherwise be lost to it."""
    room, _ = await room_with(store, 0)
    hub = Hub(store)
    before = hub.notices
    hub.room_changed(room)  # not live here: no channel to forget rules in
    hub.room_changed(room + 1)
    assert hub.notices == before + 2
    assert hub.cached_access(room) is None
    await hub.close()


async def test_a_receiver_never_gets_seqs_below_the_position_it_joined_at(
    store: SqliteStore,
) -> None:
    room, msgs = await room_with(store, 6)
    hub, behind, fresh = Hub(store, gap_timeout=0.05), Recorder(), Recorder()
    assert hub.join(behind, room, last_seq=0) == 1  # the channel starts at 1
    # A join that read storage after seq 5 was stored: it must not get 1-5 as live.
    assert hub.join(fresh, room, last_seq=5) == 6
    hub.deliver(msgs[5])  # seq 6 arrives; 1-5 are filled from storage for ``behind``
    for _ in range(100):
        if behind.seqs == [1, 2, 3, 4, 5, 6]:
            break
        await asyncio.sleep(0.02)
    assert behind.seqs == [1, 2, 3, 4, 5, 6]
    assert fresh.seqs == [6]
    assert hub.rooms[room].floors == {}  # reached: delivery is the plain loop again
    await hub.close()


async def test_kept_rules_carry_the_position_delivered_here_not_the_one_first_read(
    store: SqliteStore,
) -> None:
    room, _ = await room_with(store, 0)
    access = await store.room_access(room)
    assert access is not None and access.room.last_seq == 0
    hub, rec = Hub(store), Recorder()
    hub.join(rec, room, 0, access)
    for i in range(3):
        msg, _ = await store.append_message(
            NewMessage(room, USER, ENTITY, f"m{i}", None, utc_datetime(1_800_000_000))
        )
        hub.deliver(msg)
    cached = hub.cached_access(room)
    assert cached is not None and cached.room.last_seq == 3
    assert cached.rules == access.rules
    await hub.close()


class Shell:
    """The part of ws_server that turns a session's room effects into hub calls, without a
    socket: a select of a room live here is answered from the hub's kept rules."""

    def __init__(self, hub: Hub, session: Session, receiver: Recorder) -> None:
        self.hub, self.session, self.receiver = hub, session, receiver
        self.live_from: list[int] = []

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, LoadRoom):
                cached = self.hub.cached_access(effect.room_id)
                assert cached is not None, "the test selects a room live here"
                self.apply(self.session.result(RoomLoaded(effect.room_id, cached)))
            elif isinstance(effect, Join):
                self.live_from.append(
                    self.hub.join(self.receiver, effect.room_id, effect.last_seq, effect.access)
                )
            elif isinstance(effect, Leave):
                self.hub.leave(self.receiver, effect.room_id)


async def test_resuming_the_only_readers_room_keeps_its_position_and_others_get_no_old_messages(
    store: SqliteStore,
) -> None:
    room, _ = await room_with(store, 0)
    first_read = await store.room_access(room)  # last_seq 0, as the first select read it
    assert first_read is not None
    clock = FakeClock(now=1_800_000_000)
    secret = "unit-secret-0123456789abcdef-0123456789"
    verifier = Verifier.from_material(clock=clock, secret=secret)
    session = Session(verifier, clock, Limits())
    session.start()
    session.receive(Token(mint(secret=secret, user=USER, entity=ENTITY, level=100, now=1.8e9)))
    hub, reader = Hub(store, gap_timeout=0.05), Recorder()
    shell = Shell(hub, session, reader)
    session.receive(SelectRoom(room))
    shell.apply(session.result(RoomLoaded(room, first_read)))  # the first select: from storage
    msgs = []
    for i in range(5):
        msg, _ = await store.append_message(
            NewMessage(room, USER, ENTITY, f"m{i}", None, utc_datetime(1_800_000_000))
        )
        msgs.append(msg)
        hub.deliver(msg)
    assert reader.seqs == [1, 2, 3, 4, 5]

    shell.apply(session.receive(SelectRoom(room, since=2)))  # resume the room already selected
    assert shell.live_from == [1, 6]  # the replay covers 3-5, live goes on from 6
    other = Recorder()
    assert hub.join(other, room, hub.cached_access(room).room.last_seq) == 6  # type: ignore[union-attr]
    await hub.check_heads()  # storage is at 5: nothing to fill, nothing re-sent
    await asyncio.sleep(0.1)
    assert reader.seqs == [1, 2, 3, 4, 5] and other.seqs == []
    await hub.close()


async def test_a_receiver_in_two_rooms_gets_each_rooms_frames_named_by_room(
    store: SqliteStore,
) -> None:
    first, first_msgs = await room_with(store, 2)
    second, second_msgs = await room_with(store, 1)
    hub, rec = Hub(store), Recorder()
    hub.join(rec, first, 0)
    hub.join(rec, second, 0)
    hub.deliver(first_msgs[0])
    hub.deliver(second_msgs[0])
    hub.deliver(first_msgs[1])
    assert list(zip(rec.rooms, rec.seqs, strict=True)) == [(first, 1), (second, 1), (first, 2)]
    hub.leave(rec, first)  # leaving one room keeps the other
    assert hub.receivers(first) == [] and hub.receivers(second) == [rec]
    await hub.close()


async def test_receivers_leaving_in_any_order_leave_each_room_with_exactly_the_others(
    store: SqliteStore,
) -> None:
    first, first_msgs = await room_with(store, 2)
    second, second_msgs = await room_with(store, 1)
    hub = Hub(store)
    recs = [Recorder() for _ in range(6)]
    for rec in recs:
        hub.join(rec, first, 0)
        hub.join(rec, first, 0)  # joining again (a resume) adds no second membership
    for rec in recs[::2]:
        hub.join(rec, second, 0)
    # Leave from the middle, the end and the start: the last member fills each hole.
    for rec in (recs[2], recs[5], recs[0]):
        hub.leave(rec, first)
    hub.leave(recs[1], second)  # not a member there: nothing changes
    stay = [recs[1], recs[3], recs[4]]
    assert sorted(map(id, hub.receivers(first))) == sorted(map(id, stay))
    assert sorted(map(id, hub.receivers(second))) == sorted(map(id, recs[::2]))
    hub.deliver(first_msgs[0])
    hub.deliver(second_msgs[0])
    for rec in recs:
        expected = [1] if rec in stay else []
        expected += [1] if rec in recs[::2] else []
        assert rec.seqs == expected
    for rec in stay:
        hub.leave(rec, first)
    assert first not in hub.rooms
    for rec in recs[::2]:
        hub.leave(rec, second)
    assert hub.rooms == {} and hub.places == {}  # nothing kept for receivers gone
    await hub.close()


async def test_a_membership_costs_a_few_bytes_not_a_dict_entry(store: SqliteStore) -> None:
    """1 000 receivers holding the same 100 rooms: the hub's memberships (the rooms' member
    lists and each receiver's places) cost about 16 bytes each, where a dict entry per
    membership cost ~37 (BENCHMARKS.md section 10)."""
    hub = Hub(store)
    recs = [Recorder() for _ in range(1000)]
    for room_id in range(1, 101):
        for rec in recs:
            hub.join(rec, room_id, 0)
    size = sum(sys.getsizeof(channel.members) for channel in hub.rooms.values())
    places = getattr(hub, "places", {})  # where each receiver stands (none with a dict)
    size += sum(
        sys.getsizeof(p) + sys.getsizeof(p.rooms) + sys.getsizeof(p.at) for p in places.values()
    )
    per_membership = size / 100_000
    assert per_membership < 24, per_membership
    await hub.close()


async def test_a_recheck_names_its_room_to_each_receiver(store: SqliteStore) -> None:
    first, _ = await room_with(store, 0)
    second, _ = await room_with(store, 0)
    hub, rec = Hub(store), Recorder()
    hub.join(rec, first, 0)
    hub.join(rec, second, 0)
    hub.room_changed(second)
    for _ in range(100):  # bounded: the re-check is one storage read
        if rec.rechecked:
            break
        await asyncio.sleep(0.01)
    assert [(room_id, access.room.id if access else None) for room_id, access in rec.rechecked] == [
        (second, second)
    ]
    await hub.close()


async def room_with_events(store: SqliteStore) -> tuple[int, list[Message]]:
    """A room whose stream is message 1, message 2, edit of 1 (3), delete of 2 (4), message 5."""
    room, msgs = await room_with(store, 2)
    now = utc_datetime(1_800_000_100)
    edit, _ = await store.edit_message(room, 1, USER, "m0!", now)
    delete, _ = await store.delete_message(room, 2, USER, False, now)
    last, _ = await store.append_message(NewMessage(room, USER, ENTITY, "m2", None, now))
    return room, [*msgs, edit, delete, last]


def kinds(rec: Recorder) -> list[tuple[str, int]]:
    out = []
    for frame in rec.frames:
        obj = orjson.loads(frame_payload(frame))
        out.append((obj["type"], obj["data"]["seq"]))
    return out


async def test_edits_and_deletes_are_delivered_in_seq_order_among_messages(
    store: SqliteStore,
) -> None:
    room, events = await room_with_events(store)
    hub, rec = Hub(store, gap_timeout=10), Recorder()
    hub.join(rec, room, last_seq=0)
    for index in (4, 2, 0, 3, 1):  # arrive in any order, as through the relay
        hub.deliver(events[index])
    assert kinds(rec) == [
        ("message", 1),
        ("message", 2),
        ("edited", 3),
        ("deleted", 4),
        ("message", 5),
    ]
    edited = orjson.loads(frame_payload(rec.frames[2]))["data"]
    assert (edited["content"], edited["seq_edited"]) == ("m0!", 1)
    await hub.close()


async def test_one_frame_is_built_per_event_and_shared_by_receivers(store: SqliteStore) -> None:
    room, events = await room_with_events(store)
    hub, a, b = Hub(store), Recorder(), Recorder()
    hub.join(a, room, 2)
    hub.join(b, room, 2)
    hub.deliver(events[2])
    hub.deliver(events[3])
    assert [x is y for x, y in zip(a.frames, b.frames, strict=True)] == [True, True]
    await hub.close()


async def test_a_gap_fill_reads_the_edits_and_deletes_too(store: SqliteStore) -> None:
    room, events = await room_with_events(store)
    hub, rec = Hub(store, gap_timeout=0.05), Recorder()
    hub.join(rec, room, 0)
    hub.deliver(events[4])  # seqs 1-4 (two messages, an edit, a delete) never arrive live
    for _ in range(100):  # bounded wait for the fill
        if len(rec.seqs) == 5:
            break
        await asyncio.sleep(0.02)
    assert kinds(rec) == [
        ("message", 1),
        ("message", 2),
        ("edited", 3),
        ("deleted", 4),
        ("message", 5),
    ]
    await hub.close()


# -- ephemeral events ----------------------------------------------------------------------------


class SignalRecorder(Recorder):
    def __init__(self, user: str) -> None:
        super().__init__()
        self.user = user
        self.signals: list[tuple[bytes, int]] = []

    def write_signal(self, frame: bytes, room_id: int, about: str | None) -> None:
        if about != self.user:  # as a connection does: nothing about its own user
            self.signals.append((frame, room_id))


class SignalRelay(RecordingRelay):
    def __init__(self) -> None:
        super().__init__()
        self.signalled: list[tuple[int, dict[str, object]]] = []

    def signal(self, room_id: int, data: dict[str, object]) -> None:
        self.signalled.append((room_id, data))


async def test_a_signal_is_encoded_once_written_to_the_rooms_receivers_and_relayed(
    store: SqliteStore,
) -> None:
    room, msgs = await room_with(store, 2)
    hub = Hub(store)
    relay = SignalRelay()
    hub.attach(relay)
    reader, a, b, elsewhere = (SignalRecorder(u) for u in ("u1", "u2", "u3", "u4"))
    for receiver in (reader, a, b):
        hub.join(receiver, room, 2)
    hub.join(elsewhere, room + 1, 0)
    data = codec.receipt(room, "u1", 2)
    hub.signal(room, data)
    assert reader.signals == []  # the user it is about gets nothing
    assert a.signals[0][0] is b.signals[0][0]  # the same bytes: encoded once for the room
    assert orjson.loads(frame_payload(a.signals[0][0])) == data
    assert a.signals[0][1] == room and elsewhere.signals == []
    assert relay.signalled == [(room, data)]
    assert a.seqs == []  # no seq: the room's stream position is untouched
    hub.deliver(msgs[0])
    assert a.seqs == []  # still expects seq 3: joined after 2
    await hub.close()


async def test_a_signal_from_another_process_is_delivered_here_and_not_relayed_again(
    store: SqliteStore,
) -> None:
    room, _ = await room_with(store, 1)
    hub = Hub(store)
    relay = SignalRelay()
    hub.attach(relay)
    a = SignalRecorder("u2")
    hub.join(a, room, 1)
    hub.deliver_signal(room, codec.receipt(room, "u1", 1))
    hub.deliver_signal(room + 5, codec.receipt(room + 5, "u1", 1))  # no receivers: nothing
    assert len(a.signals) == 1 and relay.signalled == []
    await hub.close()


class UserRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.user_events: list[tuple[bytes, dict[str, object]]] = []

    def write_user_event(self, frame: bytes, data: dict[str, object]) -> None:
        self.user_events.append((frame, data))


class UserRelay(RecordingRelay):
    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[str, dict[str, object]]] = []

    def user_event(self, user: str, data: dict[str, object]) -> None:
        self.told.append((user, data))


async def test_a_user_event_reaches_the_users_connections_but_the_skipped_one_and_is_relayed(
    store: SqliteStore,
) -> None:
    hub = Hub(store)
    relay = UserRelay()
    hub.attach(relay)
    phone, laptop, other = UserRecorder(), UserRecorder(), UserRecorder()
    hub.add_user(phone, "u1")
    hub.add_user(laptop, "u1")
    hub.add_user(other, "u2")
    data = {"event": "read", "room_id": 4, "seq": 2}
    hub.user_event("u1", data, skip=phone)
    assert phone.user_events == [] and other.user_events == []
    [(frame, got)] = laptop.user_events
    assert orjson.loads(frame_payload(frame)) == {"type": "user_event", "data": data}
    assert got == data
    assert relay.told == [("u1", data)]  # every other process hears it, once
    await hub.close()


async def test_a_user_event_from_another_process_is_delivered_and_a_closed_connection_gets_none(
    store: SqliteStore,
) -> None:
    hub = Hub(store)
    relay = UserRelay()
    hub.attach(relay)
    a, b = UserRecorder(), UserRecorder()
    hub.add_user(a, "u1")
    hub.add_user(b, "u1")
    hub.remove_user(b, "u1")
    hub.deliver_user_event("u1", {"event": "room_added", "room_id": 3})
    hub.deliver_user_event("u9", {"event": "room_added", "room_id": 3})  # nobody here
    assert len(a.user_events) == 1 and b.user_events == [] and relay.told == []
    hub.remove_user(a, "u1")
    assert hub.users == {}  # nothing kept for a user with no connection
    await hub.close()
