"""Room events, read marks, DMs and the conversation list in the Store contract, run
identically on SQLite and real PostgreSQL, migration 3 from a database at version 2, and the
unread count index of migration 4."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from nanomsg.models import Principal
from nanomsg.permissions import evaluate
from nanomsg.store import common
from nanomsg.store.base import (
    AlreadyDeleted,
    HistoryQuery,
    MessageChange,
    NewMessage,
    NewRoom,
    NotAuthor,
    RoomGone,
    Store,
    UnknownSeq,
)
from nanomsg.store.migrate import load_migrations, postgres_schema_path, sqlite_schema_path
from nanomsg.store.postgres import _VISIBLE_IDS as pg_visible_ids
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import _VISIBLE_IDS as sqlite_visible_ids
from nanomsg.store.sqlite import SqliteStore, split_statements, to_micros
from tests.integration.test_store import T0, make_room, new_id, store, store_target

__all__ = ["store", "store_target"]  # fixtures, imported for pytest

pytestmark = pytest.mark.asyncio


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def send(store: Store, room_id: int, emitter: str, text: str, at: float = 0) -> int:
    message, _ = await store.append_message(
        NewMessage(room_id, emitter, "e", text, None, later(at))
    )
    return message.seq


async def pg_index_plan(target: str, sql: str, args: list[Any]) -> str:
    """PostgreSQL's plan for ``sql`` once the messages' statistics are fresh, with sequential
    and bitmap scans ruled out: test tables are tiny, where those would win, and the test
    wants to see which index a query takes."""
    conn = await asyncpg.connect(target)
    try:
        await conn.execute("ANALYZE messages")
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_bitmapscan = off")
        return "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    finally:
        await conn.close()


def to_the_millisecond(at: datetime) -> datetime:
    """A stamp as the conversation list holds it: the wire's, cut to the millisecond."""
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def everything(room_id: int) -> HistoryQuery:
    return HistoryQuery(room_id=room_id, limit=100, newest=False)


# -- edit and delete ----------------------------------------------------------------------------


async def test_edit_takes_the_next_seq_and_the_message_keeps_its_seq_with_the_new_content(
    store: Store,
) -> None:
    room = await make_room(store)
    author = new_id()
    first = await send(store, room.id, author, "helo")
    edit, edited = await store.edit_message(room.id, first, author, "hello", later(5))
    assert (edit.kind, edit.seq, edit.target_seq, edit.content) == ("edit", 2, first, "hello")
    assert (edited.seq, edited.content, edited.edited_at) == (first, "hello", later(5))
    after = await send(store, room.id, author, "next")
    assert after == 3  # the edit took seq 2: one stream for every event
    [message, third] = await store.history(everything(room.id))
    assert (message.content, message.edited_at, third.seq) == ("hello", later(5), 3)
    kinds = [(e.seq, e.kind, e.target_seq) for e in await store.events(everything(room.id))]
    assert kinds == [(1, "message", None), (2, "edit", 1), (3, "message", None)]


async def test_delete_keeps_the_content_stored_but_history_serves_a_tombstone(
    store: Store,
) -> None:
    room = await make_room(store)
    author = new_id()
    seq = await send(store, room.id, author, "secret")
    await store.edit_message(room.id, seq, author, "secret v2", later(1))
    delete, tomb = await store.delete_message(room.id, seq, author, False, later(2))
    assert (delete.kind, delete.seq, delete.target_seq, delete.emitter) == ("delete", 3, 1, author)
    assert tomb.deleted and tomb.deleted_by == author and tomb.deleted_at == later(2)
    assert tomb.content == "secret v2"  # stored, for audit
    [shown] = await store.history(everything(room.id))
    assert shown.to_json()["content"] == "" and shown.to_json()["deleted"] is True
    events = await store.events(everything(room.id))
    assert [e.kind for e in events] == ["message", "edit", "delete"]
    # The edit made before the deletion no longer serves its content either.
    assert all("secret" not in str(e.event_json()) for e in events)
    assert events[2].event_json() == {
        "room_id": room.id,
        "seq": 3,
        "seq_deleted": 1,
        "deleted_by": author,
        "deleted_at": "2026-03-01T12:00:02.123Z",
    }


async def test_edit_and_delete_refuse_other_users_deleted_and_unknown_messages(
    store: Store,
) -> None:
    room = await make_room(store)
    author, other = new_id(), new_id()
    seq = await send(store, room.id, author, "mine")
    with pytest.raises(NotAuthor):
        await store.edit_message(room.id, seq, other, "theirs", later(1))
    with pytest.raises(NotAuthor):
        await store.delete_message(room.id, seq, other, False, later(1))
    with pytest.raises(UnknownSeq):
        await store.edit_message(room.id, 99, author, "x", later(1))
    edit, _ = await store.edit_message(room.id, seq, author, "mine!", later(1))
    with pytest.raises(UnknownSeq):  # an edit event is no message
        await store.delete_message(room.id, edit.seq, author, False, later(1))
    await store.delete_message(room.id, seq, other, True, later(2))  # a room admin may
    with pytest.raises(AlreadyDeleted):
        await store.delete_message(room.id, seq, author, False, later(3))
    with pytest.raises(AlreadyDeleted):
        await store.edit_message(room.id, seq, author, "again", later(3))
    assert (await store.room_heads([room.id]))[room.id] == 3  # refusals took no seq
    await store.delete_room(room.id, later(4))
    with pytest.raises(RoomGone):
        await store.edit_message(room.id, seq, author, "x", later(5))


async def test_concurrent_deletes_of_one_message_store_exactly_one(store: Store) -> None:
    room = await make_room(store)
    author = new_id()
    seq = await send(store, room.id, author, "m")
    outcomes = await asyncio.gather(
        *(store.delete_message(room.id, seq, author, False, later(1)) for _ in range(8)),
        return_exceptions=True,
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, AlreadyDeleted) for o in outcomes if isinstance(o, BaseException))
    assert [e.kind for e in await store.events(everything(room.id))] == ["message", "delete"]


async def test_edits_deletes_and_sends_racing_in_one_room_share_one_gapless_seq_stream(
    store: Store,
) -> None:
    author, owner = new_id(), new_id()
    room = await make_room(store, owner=owner)
    targets = [await send(store, room.id, author, f"t{n}") for n in range(6)]
    work = [send(store, room.id, author, f"m{n}") for n in range(20)]
    work += [store.edit_message(room.id, seq, author, "e", later(1)) for seq in targets[:3]]
    work += [store.delete_message(room.id, seq, author, False, later(1)) for seq in targets[3:]]
    await asyncio.gather(*work)
    events = await store.events(everything(room.id))
    assert [e.seq for e in events] == list(range(1, 33))
    assert sorted(e.kind for e in events).count("message") == 26
    assert (await store.room_heads([room.id]))[room.id] == 32
    # The room row's copy of its latest message is the stream's, whichever write came last.
    latest = [e for e in events if e.kind == "message"][-1]
    state = (await store.room_states(new_id(), owner, 100, [room.id]))[room.id]
    assert state.last_message is not None
    assert state.last_message.to_json() == latest.to_json()


# -- read marks ---------------------------------------------------------------------------------


async def test_read_mark_never_moves_backwards_and_is_clamped_to_the_last_seq(
    store: Store,
) -> None:
    room = await make_room(store)
    user, other = new_id(), new_id()
    for n in range(3):
        await send(store, room.id, other, f"m{n}")
    assert await store.set_read_mark(room.id, user, 2, later(1)) == 2
    assert await store.set_read_mark(room.id, user, 1, later(2)) == 2
    assert await store.set_read_mark(room.id, user, 1000, later(3)) == 3
    assert await store.set_read_mark(room.id, other, 0, later(3)) == 0
    marks = {m.user: (m.seq, m.updated_at) for m in await store.read_marks(room.id)}
    assert marks == {user: (3, later(3)), other: (0, later(3))}
    with pytest.raises(RoomGone):
        await store.set_read_mark(10**12, user, 1, later(4))


# -- DMs ----------------------------------------------------------------------------------------


def principal(user: str, entity: str, level: int = 0) -> Principal:
    return Principal(user=user, entity=entity, level=level, exp=0, claims={})


async def test_open_dm_is_one_room_whoever_asks_first_with_a_rw_rule_each_and_no_entity_rule(
    store: Store,
) -> None:
    a, b, entity = new_id(), new_id(), new_id()
    room, created = await store.open_dm(a, entity, b, 1000, T0)
    again, created_again = await store.open_dm(b, entity, a, 1000, later(1))
    upper, _ = await store.open_dm(a.upper(), entity, b, 1000, later(2))
    assert created and not created_again and again.id == room.id == upper.id
    access = await store.room_access(room.id)
    assert access is not None and access.room.type == "user2user"
    rules = {(r.kind, r.subject, r.permissions, r.accepted) for r in access.rules}
    assert rules == {("user", a, "rw", True), ("user", b, "rw", True)}


async def test_dm_invitee_is_settled_by_their_entity_same_entity_opens_other_stays_pending(
    store: Store,
) -> None:
    entity, foreign = new_id(), new_id()
    a, b, c = new_id(), new_id(), new_id()
    same, _ = await store.open_dm(a, entity, b, 1000, T0)
    cross, _ = await store.open_dm(a, entity, c, 1000, T0)
    assert (await store.settle_dms(b, entity, later(1))).added == (same.id,)
    settled = await store.settle_dms(c, foreign, later(1))
    assert settled.added == () and settled.invited == (cross.id,)
    assert (await store.settle_dms(c, foreign, later(2))).invited == ()  # decided once
    for room_id, user, user_entity, readable in (
        (same.id, b, entity, True),
        (cross.id, c, foreign, False),
    ):
        access = await store.room_access(room_id)
        assert access is not None
        who = principal(user, user_entity)
        assert evaluate(who, access.room, access.rules).read is readable


async def test_concurrent_open_dm_from_both_sides_creates_one_room(store: Store) -> None:
    a, b, entity = new_id(), new_id(), new_id()
    results = await asyncio.gather(
        *(
            store.open_dm(*((a, entity, b) if n % 2 else (b, entity, a)), 1000, T0)
            for n in range(10)
        )
    )
    assert len({room.id for room, _ in results}) == 1
    assert sum(created for _, created in results) == 1


# -- the conversation list ----------------------------------------------------------------------


async def test_conversations_carry_last_message_activity_read_mark_and_unread_in_one_query(
    store: Store,
) -> None:
    me, other, entity = new_id(), new_id(), new_id()
    quiet = await make_room(store, creator=me, owner=entity)
    busy = await make_room(store, creator=me, owner=entity)
    seqs = [await send(store, busy.id, other, f"m{n}", at=10 + n) for n in range(4)]
    await send(store, busy.id, me, "mine", at=20)  # mine: never unread
    await store.delete_message(busy.id, seqs[3], other, False, later(30))  # deleted: not unread
    await store.set_read_mark(busy.id, me, seqs[0], later(31))
    listed = await store.conversations(me, entity, 0, "activity", 10, 0)
    assert [c.room.id for c in listed] == [busy.id, quiet.id]
    state = listed[0].state
    assert (state.last_seq, state.read_seq, state.unread) == (6, 1, 2)
    assert state.last_activity_at == to_the_millisecond(later(30))
    assert state.last_message is not None and state.last_message.seq == 5
    empty = listed[1].state
    assert (empty.last_message, empty.last_activity_at, empty.unread) == (
        None,
        to_the_millisecond(T0),
        0,
    )
    by_id = await store.conversations(me, entity, 0, "id", 1, 1)
    assert [c.room.id for c in by_id] == [busy.id]
    states = await store.room_states(me, entity, 0, [quiet.id, busy.id, 10**12])
    assert states == {quiet.id: empty, busy.id: state}


async def test_conversation_last_message_is_a_tombstone_when_the_latest_message_was_deleted(
    store: Store,
) -> None:
    me, entity = new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    seq = await send(store, room.id, me, "oops")
    await store.delete_message(room.id, seq, me, False, later(1))
    [listed] = await store.conversations(me, entity, 0, "id", 10, 0)
    assert listed.state.last_message is not None
    assert listed.state.last_message.to_json()["content"] == ""
    assert listed.state.last_message.to_json()["deleted"] is True


async def test_conversation_stamps_are_written_as_the_wire_writes_them_cut_not_rounded(
    store: Store,
) -> None:
    me, entity = new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    at = datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=T0.tzinfo)
    message, _ = await store.append_message(NewMessage(room.id, me, "e", "late", None, at))
    [listed] = await store.conversations(me, entity, 0, "id", 10, 0)
    entry = listed.to_json()
    assert entry["last_message"] == message.to_json()
    assert entry["last_message"]["created_at"] == "2026-12-31T23:59:59.999Z"
    assert entry["last_activity_at"] == "2026-12-31T23:59:59.999Z"
    assert entry["createdAt"] == room.to_json()["createdAt"]


async def test_room_states_leave_out_rooms_the_user_may_not_read(store: Store) -> None:
    a, b, entity, foreign = new_id(), new_id(), new_id(), new_id()
    dm, _ = await store.open_dm(a, entity, b, 1000, T0)
    await send(store, dm.id, a, "private")
    await store.settle_dms(b, foreign, later(1))  # another entity: pending
    assert await store.room_states(b, foreign, 0, [dm.id]) == {}
    assert await store.conversations(b, foreign, 0, "id", 10, 0) == []
    assert set(await store.room_states(a, entity, 0, [dm.id])) == {dm.id}


# -- migration 3 --------------------------------------------------------------------------------

ROOM = (
    "INSERT INTO rooms (id, uuid, name, level_admin, type, entity_owner, max_entity_rules,"
    " last_seq, created_at, updated_at) VALUES ({})"
)
MESSAGE = (
    "INSERT INTO messages (room_id, seq, emitter, entity, content, client_id, created_at)"
    " VALUES ({})"
)


@pytest.fixture(params=["sqlite", "postgres"])
def version_two(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "v2.db")
    return "postgres", str(request.getfixturevalue("fresh_pg_url"))


async def test_migration_3_keeps_existing_messages_as_plain_messages_and_continues_their_seqs(
    version_two: tuple[str, str],
) -> None:
    kind, target = version_two
    emitter, owner = new_id(), new_id()
    room_row = [1, str(uuid.uuid4()), "old", 100, "group", owner, 100, 2]
    messages = [[1, seq, emitter, "e", f"m{seq}", None] for seq in (1, 2)]
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            db.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            for migration in load_migrations(sqlite_schema_path())[:2]:
                for statement in split_statements(migration.sql):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, 0)",
                    (migration.version, migration.name),
                )
            db.execute(ROOM.format(", ".join("?" * 10)), [*room_row, to_micros(T0), to_micros(T0)])
            for row in messages:
                db.execute(MESSAGE.format(", ".join("?" * 7)), [*row, to_micros(later(row[1]))])
        store: Store = SqliteStore(target)
    else:
        conn = await asyncpg.connect(target)
        try:
            await conn.execute(
                "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL)"
            )
            for migration in load_migrations(postgres_schema_path())[:2]:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2, now())",
                    migration.version,
                    migration.name,
                )
            await conn.execute(
                ROOM.format(", ".join(f"${n}" for n in range(1, 11))), *room_row, T0, T0
            )
            for row in messages:
                await conn.execute(
                    MESSAGE.format(", ".join(f"${n}" for n in range(1, 8))), *row, later(row[1])
                )
            await conn.execute("SELECT setval('rooms_id_seq', 1)")
        finally:
            await conn.close()
        store = PostgresStore(target)
    await store.open()
    try:
        [listed] = await store.conversations(emitter, owner, 100, "activity", 10, 0)
        # backfilled from the last message (the list's stamps are the wire's milliseconds)
        assert listed.state.last_activity_at == to_the_millisecond(later(2))
        old = await store.history(everything(1))
        assert [(m.seq, m.kind, m.content, m.system, m.deleted) for m in old] == [
            (1, "message", "m1", False, False),
            (2, "message", "m2", False, False),
        ]
        edit, _ = await store.edit_message(1, 2, emitter, "m2!", later(1))
        assert edit.seq == 3
        assert await store.set_read_mark(1, emitter, 9, later(2)) == 3
    finally:
        await store.close()


async def test_system_messages_are_stored_and_read_back_as_system(store: Store) -> None:
    room = await make_room(store)
    sent, _ = await store.append_message(
        NewMessage(room.id, new_id(), "e", "a document was attached", "doc-1", T0, system=True)
    )
    plain = await send(store, room.id, new_id(), "hello")
    again, created = await store.append_message(
        NewMessage(room.id, sent.emitter, "e", "again", "doc-1", T0, system=True)
    )
    assert sent.system and again.system and not created
    [first, second] = await store.history(everything(room.id))
    assert (first.system, second.system, second.seq) == (True, False, plain)
    assert first.to_json()["system"] is True and "system" not in second.to_json()


# -- migrations 4 and 5: the unread count's indexes -------------------------------------------


async def test_unread_count_probes_only_the_deleted_index_and_reads_own_messages_from_the_mark(
    store: Store, store_target: tuple[str, str]
) -> None:
    """The conversation list takes the messages after the mark from the room's message count
    and the mark's ordinal, the reader's own messages after it from their read row (migration
    8: no probe of ``messages_own_idx`` any more), and probes only ``messages_deleted_idx``
    for the others' deleted ones (index-only on PostgreSQL once the pages are all-visible, a
    covering index on SQLite); ``messages_unread_idx`` is gone."""
    kind, target = store_target
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    # Enough messages in the room for the planner to tell the indexes apart by their
    # statistics (with a handful, any index on room_id costs the same); a few of them mine.
    await store.append_batch(
        [
            NewMessage(room.id, me if n % 50 == 0 else other, "e", f"m{n}", None, later(n))
            for n in range(200)
        ]
    )
    params = {"user": me, "entity": entity, "level": 0, "limit": 10, "offset": 0}
    if kind == "postgres":
        sql, args = common.numbered(
            common.room_states_sql(common.conversation_page_sql(pg_visible_ids, "id"), "id"),
            params,
        )
        # (Whether the scan is index-only also depends on how much of the shared test table
        # autovacuum has marked visible.)
        plan = await pg_index_plan(target, sql, args)
        counting = plan[plan.index("SubPlan") :]
        assert "Scan using messages_deleted_idx" in counting, plan
        assert "messages_own_idx" not in plan, plan
        assert "messages_unread_idx" not in plan, plan
    else:
        sql = common.room_states_sql(common.conversation_page_sql(sqlite_visible_ids, "id"), "id")
        with sqlite3.connect(target) as db:
            rows = db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        plan = "\n".join(str(row[-1]) for row in rows)
        assert "USING COVERING INDEX messages_deleted_idx" in plan, plan
        assert "messages_own_idx" not in plan, plan
        assert "messages_unread_idx" not in plan, plan
    [listed] = await store.conversations(me, entity, 0, "id", 10, 0)
    assert listed.state.unread == 196  # not my 4


async def test_the_rooms_visible_through_the_entitys_level_are_an_index_range_alone(
    store: Store, store_target: tuple[str, str]
) -> None:
    """Migration 8: the entity's rooms a user may read by level come from one range of
    ``rooms_entity_level_idx`` (entity and level both index conditions, DMs and deleted rooms
    outside the index), so the rooms above the user's level are never read; the list still
    holds the rooms at or below it and not the others."""
    kind, target = store_target
    me, entity = new_id(), new_id()
    low, high = [
        await store.create_room(NewRoom("r", level, "group", entity, 10, new_id(), 0, T0))
        for level in (0, 50)
    ]
    params = {"user": me, "entity": entity, "level": 10, "limit": 10, "offset": 0}
    if kind == "postgres":
        sql, args = common.numbered(pg_visible_ids, params)
        plan = await pg_index_plan(target, sql, args)
        assert "rooms_entity_level_idx" in plan, plan
        assert "level_admin <=" in plan[plan.index("rooms_entity_level_idx") :].split("\n")[1]
    else:
        with sqlite3.connect(target) as db:
            rows = db.execute("EXPLAIN QUERY PLAN " + sqlite_visible_ids, params).fetchall()
        plan = "\n".join(str(row[-1]) for row in rows)
        assert "rooms_entity_level_idx (entity_owner=? AND level_admin<?)" in plan, plan
    listed = {c.id for c in await store.conversations(me, entity, 10, "id", 10, 0)}
    assert low.id in listed and high.id not in listed


async def test_a_history_page_with_a_date_window_reads_the_date_index_of_messages_only(
    store: Store, store_target: tuple[str, str]
) -> None:
    """Migration 6: ``messages_room_created_idx`` holds messages only (edits and deletes no
    longer write an entry to it); a history page with a date window, its one reader, reads
    messages only and still takes it, and finds what the window holds."""
    kind, target = store_target
    me = new_id()
    room = await make_room(store, creator=me)
    sent = await store.append_batch(
        [NewMessage(room.id, me, "e", f"m{n}", None, later(n)) for n in range(200)]
    )
    seqs = [outcome[0].seq for outcome in sent if isinstance(outcome, tuple)]
    await store.append_events(
        [MessageChange(room.id, seq, me, later(300 + n), "e") for n, seq in enumerate(seqs[:50])]
    )
    query = HistoryQuery(
        room_id=room.id, limit=10, date_from=later(100), date_to=later(104), newest=False
    )
    found = await store.history(query)
    assert [m.seq for m in found] == seqs[100:105]
    if kind == "postgres":
        sql, args = common.history_sql(query, lambda dt: dt, lambda n: f"${n}")
        plan = await pg_index_plan(target, sql, args)
        conn = await asyncpg.connect(target)
        try:
            definition = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_room_created_idx'"
            )
        finally:
            await conn.close()
        assert "messages_room_created_idx" in plan, plan
    else:
        sql, args = common.history_sql(query, to_micros, lambda n: "?")
        with sqlite3.connect(target) as db:
            db.execute("ANALYZE")
            plan = "\n".join(
                str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
            )
            definition = db.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'messages_room_created_idx'"
            ).fetchone()[0]
        assert "USING INDEX messages_room_created_idx" in plan, plan
    assert "kind = 'message'" in definition.replace("::text", ""), definition
