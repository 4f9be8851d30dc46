"""The use-case layer's rules, without sockets, on a real SQLite store in a temporary file:
who may post (write; system messages for room admins; through the real batching writer and
hub), who may edit and delete, DMs (oneself refused, one room per pair, tenant isolation),
read marks (clamped, never backwards, only in readable rooms) and the conversation list."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from nanomsg.clock import FakeClock
from nanomsg.fanout import Hub
from nanomsg.models import Principal, Room, RoomAccess, Rule
from nanomsg.permissions import Access
from nanomsg.store.base import ContentRefused, NewMessage, NewRoom, RoomGone, StoreUnavailable
from nanomsg.store.sqlite import SqliteStore
from nanomsg.store.writer import BatchWriter
from nanomsg.usecases import BadArgs, Forbidden, NoSuchRoom, UseCases, message_to_post

pytestmark = pytest.mark.asyncio

ACME = "11111111-1111-4111-8111-111111111111"
GLOBEX = "22222222-2222-4222-8222-222222222222"


def person(entity: str = ACME, level: int = 0) -> Principal:
    return Principal(user=str(uuid.uuid4()), entity=entity, level=level, exp=0, claims={})


@pytest_asyncio.fixture
async def cases(tmp_path: Path) -> AsyncIterator[UseCases]:
    store = SqliteStore(str(tmp_path / "usecases.db"))
    await store.open()
    try:
        yield UseCases(store, FakeClock())
    finally:
        await store.close()


async def group(cases: UseCases, admin: Principal) -> Room:
    """A group room of ``admin``'s entity: ``admin`` holds rwa; the entity rw from level 0."""
    return await cases.store.create_room(
        NewRoom("g", 100, "group", admin.entity, 10, admin.user, admin.level, cases.now(), 0)
    )


async def post(cases: UseCases, room: Room, who: Principal, text: str = "hi") -> int:
    message, _ = await cases.store.append_message(
        NewMessage(room.id, who.user, who.entity, text, None, cases.now())
    )
    return message.seq


class Receiver:
    """A hub receiver (what a WebSocket connection is to the hub): keeps the frames written."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None:
        # The hub hands over a whole WebSocket text frame; its payload follows a 2- or 4-byte
        # header (these frames stay under 64 KiB).
        start = 4 if frame[1] & 0x7F == 126 else 2
        self.frames.append(orjson.loads(frame[start:]))

    def reauthorize(self, room_id: int, access: RoomAccess | None) -> None:
        pass


@pytest_asyncio.fixture
async def posting(tmp_path: Path) -> AsyncIterator[UseCases]:
    """Use cases wired as the server wires them: the real batching writer and hub."""
    store = SqliteStore(str(tmp_path / "posting.db"))
    await store.open()
    writer, hub = BatchWriter(store), Hub(store)
    writer.start()
    try:
        yield UseCases(store, FakeClock(), writer=writer, publisher=hub)
    finally:
        await writer.close()
        await hub.close()
        await store.close()


def watch(cases: UseCases, room: Room) -> Receiver:
    receiver = Receiver()
    assert isinstance(cases.publisher, Hub)
    cases.publisher.join(receiver, room.id, room.last_seq)
    return receiver


# -- posting ------------------------------------------------------------------------------------


async def test_post_stores_with_the_next_seq_and_publishes_the_message_frame(
    posting: UseCases,
) -> None:
    admin, member = person(), person()
    room = await group(posting, admin)
    receiver = watch(posting, room)
    first = await posting.post(member, room.id, "over http", "k1")
    assert (first.created, first.message.seq, first.message.client_id) == (True, 1, "k1")
    assert not first.message.system
    second = await posting.post(admin, room.id, "next")
    assert second.message.seq == 2
    # Published once stored, before post returned: the hub wrote both frames, in seq order.
    assert receiver.frames == [
        {"type": "message", "data": first.message.to_json()},
        {"type": "message", "data": second.message.to_json()},
    ]


async def test_a_client_id_repeat_answers_the_stored_message_and_publishes_nothing(
    posting: UseCases,
) -> None:
    admin = person()
    room = await group(posting, admin)
    receiver = watch(posting, room)
    first = await posting.post(admin, room.id, "once", "k1")
    again = await posting.post(admin, room.id, "twice", "k1")
    assert (again.created, again.message) == (False, first.message)
    assert len(receiver.frames) == 1
    other = await posting.post(person(), room.id, "same key, other user", "k1")
    assert (other.created, other.message.seq) == (True, 2)


async def test_post_needs_write_and_a_system_message_needs_room_admin(
    posting: UseCases,
) -> None:
    admin, reader, writer, delegate = person(), person(GLOBEX), person(GLOBEX), person(GLOBEX)
    room = await group(posting, admin)
    now = posting.now()
    await posting.store.put_rule(room.id, reader.user, "user", "r", 0, True, now)
    await posting.store.put_rule(room.id, writer.user, "user", "rw", 0, True, now)
    await posting.store.put_rule(room.id, delegate.user, "user", "a", 0, True, now)
    receiver = watch(posting, room)
    with pytest.raises(Forbidden, match="write permission required"):
        await posting.post(reader, room.id, "hi")
    with pytest.raises(Forbidden, match="system messages need admin rights"):
        await posting.post(writer, room.id, "official", system=True)
    assert receiver.frames == []
    for who in (admin, delegate):  # owner-entity admin, and admin by rule
        made = await posting.post(who, room.id, "attached", system=True)
        assert made.message.system and made.message.to_json()["system"] is True
    assert [f["data"]["system"] for f in receiver.frames] == [True, True]
    assert (await posting.post(writer, room.id, "plain")).message.system is False


async def test_the_post_rule_is_pure_over_the_rights_a_driver_holds() -> None:
    """What the WebSocket session will call with a subscription's rights: no store at all."""
    who, now = person(), FakeClock().wall()
    stamp = datetime.fromtimestamp(now, UTC)
    reader = Access(read=True, write=False, admin=False, reason="rules r")
    writer = Access(read=True, write=True, admin=False, reason="rules rw")
    admin = Access(read=True, write=True, admin=True, reason="rules a")
    with pytest.raises(Forbidden, match="write permission required"):
        message_to_post(who, 7, reader, "hi", None, False, stamp)
    with pytest.raises(Forbidden, match="admin"):
        message_to_post(who, 7, writer, "hi", None, True, stamp)
    made = message_to_post(who, 7, admin, "hi", "k", True, stamp)
    assert made == NewMessage(7, who.user, who.entity, "hi", "k", stamp, system=True)
    assert not message_to_post(who, 7, writer, "hi", None, False, stamp).system


async def test_post_to_a_foreign_or_missing_room_is_no_such_room(posting: UseCases) -> None:
    admin = person()
    room = await group(posting, admin)
    for room_id in (room.id, 10**9):
        with pytest.raises(NoSuchRoom):
            await posting.post(person(GLOBEX), room_id, "hi")
    await posting.store.delete_room(room.id, posting.now())
    with pytest.raises(NoSuchRoom):
        await posting.post(admin, room.id, "hi")


async def test_post_while_storage_refuses_writes_is_store_unavailable(posting: UseCases) -> None:
    admin = person()
    room = await group(posting, admin)
    receiver = watch(posting, room)
    assert isinstance(posting.writer, BatchWriter)
    await posting.writer.close()  # refuses from now on, as at shutdown
    with pytest.raises(StoreUnavailable):
        await posting.post(admin, room.id, "hi")
    assert receiver.frames == []


async def test_writer_outcomes_map_to_the_driver_neutral_errors(posting: UseCases) -> None:
    with pytest.raises(NoSuchRoom):
        posting.stored(RoomGone(3))
    with pytest.raises(BadArgs, match="content refused by storage"):
        posting.stored(ContentRefused("bad"))
    with pytest.raises(StoreUnavailable, match="down"):
        posting.stored(StoreUnavailable("down"))
    with pytest.raises(StoreUnavailable, match="unexpected"):
        posting.stored(ValueError("bug"))


async def test_post_without_a_writer_is_a_wiring_error(cases: UseCases) -> None:
    admin = person()
    room = await group(cases, admin)
    with pytest.raises(RuntimeError, match="need a writer"):
        await cases.post(admin, room.id, "hi")


# -- edit and delete ----------------------------------------------------------------------------


async def test_the_author_edits_and_another_member_may_not(posting: UseCases) -> None:
    cases = posting
    admin, author, member = person(), person(), person()
    room = await group(cases, admin)
    seq = await post(cases, room, author, "helo")
    changed = await cases.edit(author, room.id, seq, "hello")
    assert (changed.event.seq, changed.event.target_seq, changed.message.content) == (
        2,
        seq,
        "hello",
    )
    with pytest.raises(Forbidden, match="not the author"):
        await cases.edit(member, room.id, seq, "mine now")
    with pytest.raises(Forbidden, match="not the author"):  # admins delete, never edit
        await cases.edit(admin, room.id, seq, "moderated")


async def test_delete_by_the_author_or_a_room_admin_but_not_another_member(
    posting: UseCases,
) -> None:
    cases = posting
    admin, author, member = person(), person(), person()
    room = await group(cases, admin)
    first, second = await post(cases, room, author), await post(cases, room, author)
    with pytest.raises(Forbidden, match="not the author"):
        await cases.delete(member, room.id, first)
    assert (await cases.delete(author, room.id, first)).message.deleted
    assert (await cases.delete(admin, room.id, second)).message.deleted_by == admin.user
    with pytest.raises(Forbidden, match="deleted"):
        await cases.delete(admin, room.id, second)
    with pytest.raises(Forbidden, match="deleted"):
        await cases.edit(author, room.id, first, "back")


async def test_edit_and_delete_answer_unknown_seq_bad_args_and_foreign_rooms_no_such_room(
    posting: UseCases,
) -> None:
    cases = posting
    admin, author = person(), person()
    room = await group(cases, admin)
    await post(cases, room, author)
    with pytest.raises(BadArgs, match="no message has seq 9"):
        await cases.edit(author, room.id, 9, "x")
    with pytest.raises(BadArgs):
        await cases.delete(author, room.id, -1)
    with pytest.raises(BadArgs, match="empty"):
        await cases.edit(author, room.id, 1, "  ")
    outsider = person(GLOBEX)
    for room_id in (room.id, 10**9):  # foreign and missing: the same answer
        with pytest.raises(NoSuchRoom):
            await cases.delete(outsider, room_id, 1)


async def test_a_reader_without_write_may_neither_edit_nor_delete(posting: UseCases) -> None:
    cases = posting
    admin, reader = person(), person(GLOBEX)
    room = await group(cases, admin)
    await cases.store.put_rule(room.id, reader.user, "user", "r", 0, True, cases.now())
    seq = await post(cases, room, reader)  # posted while it could write, say
    with pytest.raises(Forbidden, match="write"):
        await cases.edit(reader, room.id, seq, "x")
    with pytest.raises(Forbidden, match="write"):
        await cases.delete(reader, room.id, seq)


async def test_edit_and_delete_go_through_the_writer_and_publish_their_frames_when_stored(
    posting: UseCases,
) -> None:
    """As ``post``: the event takes the room's next seq among the sends and reaches the
    room's receivers before the use case returns, in seq order; a refusal publishes nothing."""
    admin, author = person(), person()
    room = await group(posting, admin)
    receiver = watch(posting, room)
    sent = await posting.post(author, room.id, "helo")
    edited = await posting.edit(author, room.id, sent.message.seq, "hello")
    deleted = await posting.delete(admin, room.id, sent.message.seq)
    with pytest.raises(Forbidden, match="deleted"):
        await posting.delete(author, room.id, sent.message.seq)
    assert [(f["type"], f["data"]["seq"]) for f in receiver.frames] == [
        ("message", 1),
        ("edited", 2),
        ("deleted", 3),
    ]
    assert (edited.event.seq, deleted.event.seq, deleted.message.deleted_by) == (2, 3, admin.user)
    writer = posting.writer
    assert isinstance(writer, BatchWriter) and writer.messages == 4  # the refusal included


async def test_edit_and_delete_without_a_writer_are_a_wiring_error(cases: UseCases) -> None:
    admin = person()
    room = await group(cases, admin)
    seq = await post(cases, room, admin)
    with pytest.raises(RuntimeError, match="need a writer"):
        await cases.edit(admin, room.id, seq, "x")
    with pytest.raises(RuntimeError, match="need a writer"):
        await cases.delete(admin, room.id, seq)


# -- DMs ----------------------------------------------------------------------------------------


async def test_a_dm_with_oneself_is_refused(cases: UseCases) -> None:
    me = person()
    with pytest.raises(BadArgs, match="another user"):
        await cases.open_dm(me, me.user)


async def test_a_dm_within_one_entity_is_open_to_both_once_the_other_shows_up(
    cases: UseCases,
) -> None:
    alice, bob = person(), person()
    opened = await cases.open_dm(alice, bob.user)
    assert opened.created and opened.invited  # bob's entity is not known yet
    settled = await cases.settle(bob)
    assert settled.added == (opened.room.id,)
    assert (await cases.readable(bob, opened.room.id)).room.type == "user2user"
    again = await cases.open_dm(bob, alice.user)
    assert (again.room.id, again.created, again.invited) == (opened.room.id, False, False)


async def test_a_cross_entity_dm_stays_an_invitation_until_accepted(cases: UseCases) -> None:
    alice, mallory = person(ACME), person(GLOBEX)
    opened = await cases.open_dm(alice, mallory.user)
    seq = await post(cases, opened.room, alice, "for your eyes after accepting")
    assert (await cases.settle(mallory)).invited == (opened.room.id,)
    with pytest.raises(NoSuchRoom):
        await cases.readable(mallory, opened.room.id)
    with pytest.raises(NoSuchRoom):
        await cases.mark_read(mallory, opened.room.id, seq)
    assert await cases.conversations(mallory, "id", 10, 0) == []
    await cases.store.set_accepted(opened.room.id, mallory.user, "user", True, cases.now())
    assert (await cases.readable(mallory, opened.room.id)).rights.write


async def test_asking_for_a_dm_one_was_invited_to_accepts_it(cases: UseCases) -> None:
    alice, mallory = person(ACME), person(GLOBEX)
    opened = await cases.open_dm(alice, mallory.user)
    await cases.settle(mallory)
    mine = await cases.open_dm(mallory, alice.user)
    assert mine.room.id == opened.room.id and not mine.created
    assert (await cases.readable(mallory, opened.room.id)).rights.read


# -- read marks and the conversation list -------------------------------------------------------


async def test_read_marks_clamp_never_go_back_and_list_every_member(cases: UseCases) -> None:
    admin, member = person(), person()
    room = await group(cases, admin)
    await cases.store.put_rule(room.id, member.user, "user", "rw", 0, True, cases.now())
    for _ in range(3):
        await post(cases, room, admin)
    assert await cases.mark_read(member, room.id, 99) == 3
    assert await cases.mark_read(member, room.id, 1) == 3
    with pytest.raises(BadArgs):
        await cases.mark_read(member, room.id, -1)
    marks = {m.user: m.seq for m in await cases.reads(admin, room.id)}
    assert marks == {admin.user: 0, member.user: 3}
    with pytest.raises(NoSuchRoom):
        await cases.reads(person(GLOBEX), room.id)


async def test_conversations_count_unread_messages_of_others_and_order_by_activity(
    cases: UseCases,
) -> None:
    me, other = person(), person()
    old, fresh = await group(cases, me), await group(cases, me)
    clock = cases.clock
    assert isinstance(clock, FakeClock)
    clock.advance(10)
    await post(cases, old, other)
    clock.advance(10)
    await post(cases, fresh, other)
    await post(cases, fresh, me)
    listed = await cases.conversations(me, "activity", 10, 0)
    assert [(c.room.id, c.state.unread) for c in listed] == [(fresh.id, 1), (old.id, 1)]
    with pytest.raises(BadArgs, match="order"):
        await cases.conversations(me, "name", 10, 0)


async def test_the_conversation_entries_are_the_lists_json_in_its_order(cases: UseCases) -> None:
    me, other = person(), person()
    rooms = [await group(cases, me) for _ in range(3)]
    await post(cases, rooms[1], other)
    entries = await cases.conversation_entries(me, "id", 10, 1)
    listed = await cases.conversations(me, "id", 10, 1)
    assert entries == [c.to_json() for c in listed]
    assert [e["id"] for e in entries] == [r.id for r in rooms[1:]]
    assert entries[0]["unread"] == 1
    with pytest.raises(BadArgs, match="order"):
        await cases.conversation_entries(me, "name", 10, 0)


class SettlesAfterTheList(SqliteStore):
    """A real SQLite store whose settle of waiting DMs holds back until a conversation list
    has been read (or a second has passed), as it may when both run side by side."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.listed = asyncio.Event()
        self.lists = 0

    async def conversations(self, *args: Any) -> Any:
        try:
            return await super().conversations(*args)
        finally:
            self.lists += 1
            self.listed.set()

    async def settle_dms(self, user: str, entity: str, now: datetime) -> Any:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listed.wait(), 1)
        return await super().settle_dms(user, entity, now)


async def test_a_dm_settled_by_a_list_request_is_in_that_list_even_when_read_before_it(
    tmp_path: Path,
) -> None:
    store = SettlesAfterTheList(str(tmp_path / "settle.db"))
    await store.open()
    try:
        cases = UseCases(store, FakeClock())
        alice, bob = person(), person()
        opened = await cases.open_dm(alice, bob.user)  # bob's entity is not known yet
        listed = await cases.conversations(bob, "id", 10, 0)
        assert [c.id for c in listed] == [opened.room.id]
        assert store.lists == 2  # read once beside the settle, again once it added the DM
        assert [c.id for c in await cases.conversations(bob, "id", 10, 0)] == [opened.room.id]
        assert store.lists == 3  # nothing left to settle: one read
    finally:
        await store.close()


async def test_a_list_request_reports_storage_down_even_while_its_settle_runs(
    tmp_path: Path,
) -> None:
    store = SettlesAfterTheList(str(tmp_path / "down.db"))
    await store.open()
    cases = UseCases(store, FakeClock())
    await store.close()
    with pytest.raises(StoreUnavailable):
        await cases.conversations(person(), "id", 10, 0)


class ReceiptLog:
    def __init__(self) -> None:
        self.reads: list[tuple[int, str, int]] = []

    def read(self, room_id: int, user: str, seq: int) -> None:
        self.reads.append((room_id, user, seq))


async def test_a_mark_moved_forward_sends_a_receipt_and_one_not_moved_sends_none(
    cases: UseCases,
) -> None:
    log = ReceiptLog()
    cases.receipts = log
    admin, member = person(), person()
    room = await group(cases, admin)
    await cases.store.put_rule(room.id, member.user, "user", "rw", 0, True, cases.now())
    assert await cases.mark_read(member, room.id, 5) == 0  # nothing to read yet: no receipt
    for _ in range(3):
        await post(cases, room, admin)
    assert await cases.mark_read(member, room.id, 2) == 2
    assert await cases.mark_read(member, room.id, 99) == 3  # clamped: the mark held is sent
    assert await cases.mark_read(member, room.id, 1) == 3  # behind the mark: nobody is told
    assert log.reads == [(room.id, member.user, 2), (room.id, member.user, 3)]
    with pytest.raises(NoSuchRoom):
        await cases.mark_read(person(GLOBEX), room.id, 1)
    assert len(log.reads) == 2


# -- user events from rule changes ---------------------------------------------------------------


class Told:
    """Records the user events the use cases send."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], object | None]] = []

    def user_event(self, user: str, data: dict[str, Any], skip: object | None = None) -> None:
        self.events.append((user, data, skip))


T0 = datetime(2026, 11, 23, tzinfo=UTC)


def urule(subject: str, flags: str, accepted: bool = True, kind: str = "user") -> Rule:
    return Rule(5, subject, kind, flags, 0, accepted, T0, T0)


def told_for(before: tuple[Rule, ...], after: tuple[Rule, ...]) -> list[tuple[str, str]]:
    told = Told()
    UseCases(SqliteStore(":memory:"), FakeClock(), users=told).rules_changed(5, before, after)
    return [(user, data["event"]) for user, data, _ in told.events]


async def test_rules_changed_tells_each_user_what_the_room_now_is_to_them() -> None:
    assert told_for((), (urule("u1", "rw"),)) == [("u1", "room_added")]
    assert told_for((urule("u1", "rw"),), (urule("u1", "r"),)) == []  # still readable
    assert told_for((urule("u1", "rw"),), ()) == [("u1", "room_removed")]  # rule deleted
    assert told_for((urule("u1", "rw"),), (urule("u1", "b"),)) == [("u1", "room_removed")]
    assert told_for((urule("u1", "rw"),), (urule("u1", "rwb"),)) == [("u1", "room_removed")]
    assert told_for((), (urule("u1", "rw", accepted=False),)) == [("u1", "invited")]
    assert told_for((urule("u1", "rw", accepted=False),), (urule("u1", "rw"),)) == [
        ("u1", "room_added")
    ]
    assert told_for((urule("u1", "rw", accepted=False),), (urule("u1", "rw", False),)) == []
    assert told_for((), (urule("u1", "w"),)) == []  # write-only grants no read


async def test_entity_rules_tell_nobody() -> None:
    assert told_for((), (urule(ACME, "rw", kind="entity"),)) == []
    assert told_for((urule(ACME, "rw", kind="entity"),), ()) == []


async def test_mark_read_tells_the_users_other_connections_when_the_mark_moves(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "told.db"))
    await store.open()
    try:
        told = Told()
        cases = UseCases(store, FakeClock(now=1_800_000_000), users=told)
        me = person()
        now = datetime(2027, 1, 15, tzinfo=UTC)
        room = await store.create_room(NewRoom("r", 100, "group", ACME, 100, me.user, 0, now))
        await store.append_message(NewMessage(room.id, me.user, ACME, "hi", None, now))
        origin = object()
        assert await cases.mark_read(me, room.id, 1, origin=origin) == 1
        assert told.events == [(me.user, {"event": "read", "room_id": room.id, "seq": 1}, origin)]
        await cases.mark_read(me, room.id, 0, origin=origin)  # not moved: nobody told
        assert len(told.events) == 1
    finally:
        await store.close()


class CountingStore:
    """The real store, counting the rules queries made through it."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.rules_reads = 0

    async def room_access(self, room_id: int) -> RoomAccess | None:
        self.rules_reads += 1
        found: RoomAccess | None = await self.store.room_access(room_id)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_the_rules_kept_for_a_live_room_decide_without_a_query_and_stay_strict(
    cases: UseCases,
) -> None:
    admin, author, outsider = person(), person(), person(GLOBEX)
    room = await group(cases, admin)
    seq = await post(cases, room, author, "helo")
    kept = await cases.store.room_access(room.id)
    counting = CountingStore(cases.store)
    live: dict[int, RoomAccess | None] = {room.id: kept}
    writer, hub = BatchWriter(counting), Hub(cases.store)  # type: ignore[arg-type]
    writer.start()
    fast = UseCases(
        counting,  # type: ignore[arg-type]
        cases.clock,
        writer=writer,
        publisher=hub,
        kept_rules=live.get,
    )
    try:
        assert (await fast.edit(author, room.id, seq, "hello")).message.content == "hello"
        assert counting.rules_reads == 0  # decided on the kept rules, as a send is
        with pytest.raises(NoSuchRoom):  # the kept rules still refuse whom they refuse
            await fast.edit(outsider, room.id, seq, "mine")
        live.clear()  # not live here (or the relay cannot hear change notices): read storage
        assert (await fast.delete(author, room.id, seq)).message.deleted
        assert counting.rules_reads == 1
    finally:
        await writer.close()
        await hub.close()


class Notices:
    """The relay's ``room_changed`` as the use cases see it: records the rooms announced."""

    def __init__(self) -> None:
        self.rooms: list[int] = []

    async def __call__(self, room_id: int) -> None:
        self.rooms.append(room_id)


async def test_settling_a_dm_announces_its_rules_changed_and_only_those_it_made_readable(
    cases: UseCases,
) -> None:
    """Kept rules of a DM (live where its opener watches it) must not outlive the rule that
    settling accepts: the next request of the invitee would be refused on stale rules."""
    notices = Notices()
    told = UseCases(cases.store, cases.clock, notify_room_changed=notices)
    alice, bob, mallory = person(), person(), person(GLOBEX)
    same = await told.open_dm(alice, bob.user)
    cross = await told.open_dm(alice, mallory.user)
    assert notices.rooms == []  # rooms just created: no rules were kept for them anywhere
    assert (await told.settle(bob)).added == (same.room.id,)
    assert notices.rooms == [same.room.id]
    assert (await told.settle(mallory)).invited == (cross.room.id,)
    assert notices.rooms == [same.room.id]  # still pending: nothing changed that grants


async def test_asking_for_an_existing_dm_announces_its_rules_changed(cases: UseCases) -> None:
    """Asking for a DM accepts the caller's pending rule in it (a cross-entity invitation)."""
    notices = Notices()
    told = UseCases(cases.store, cases.clock, notify_room_changed=notices)
    alice, mallory = person(), person(GLOBEX)
    room_id = (await told.open_dm(alice, mallory.user)).room.id
    opened = await told.open_dm(mallory, alice.user)
    assert (opened.room.id, opened.created) == (room_id, False)
    assert notices.rooms == [room_id]
    assert (await told.readable(mallory, room_id)).rights.read


async def test_a_failing_change_notice_does_not_fail_the_use_case(cases: UseCases) -> None:
    async def broken(room_id: int) -> None:
        raise ConnectionError("relay gone")

    told = UseCases(cases.store, cases.clock, notify_room_changed=broken)
    alice, bob = person(), person()
    room_id = (await told.open_dm(alice, bob.user)).room.id
    assert (await told.settle(bob)).added == (room_id,)  # stored; the notice is only logged
