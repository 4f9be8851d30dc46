"""The unread count of the conversation list from message ordinals (schema migration 5), on
SQLite and real PostgreSQL: every case of "after the mark, not the reader's, not deleted"
against a count of the room's events, and the migration's backfill of a database at version 4.
The list's latest message too, against the room's events, after every kind of write path and
after the upgrade.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from nanomsg.models import Conversation
from nanomsg.store.base import (
    Changed,
    HistoryQuery,
    MessageChange,
    NewMessage,
    RoomEvent,
    Store,
)
from nanomsg.store.migrate import load_migrations, postgres_schema_path, sqlite_schema_path
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import SqliteStore, split_statements, to_micros
from nanomsg.store.writer import BatchWriter
from tests.integration.test_store import T0, make_room, new_id, store, store_target

__all__ = ["store", "store_target"]  # fixtures, imported for pytest

pytestmark = pytest.mark.asyncio


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def send(store: Store, room_id: int, emitter: str, at: float = 0) -> int:
    message, _ = await store.append_message(
        NewMessage(room_id, emitter, "e", f"from {emitter[:4]}", None, later(at))
    )
    return message.seq


async def listed(store: Store, user: str, entity: str, room_id: int) -> Conversation:
    """The room's entry in the user's list (at level 100 the owner entity's rule lets every
    member of ``entity`` read the group rooms ``make_room`` creates)."""
    found = {c.id: c for c in await store.conversations(user, entity, 100, "id", 500, 0)}
    return found[room_id]


async def counted(store: Store, room_id: int, user: str, mark: int) -> int:
    """The unread count by its definition, from the room's whole event stream: messages
    after ``mark``, not sent by ``user``, not deleted."""
    events = await store.events(HistoryQuery(room_id=room_id, limit=1000, newest=False))
    return sum(
        1
        for e in events
        if e.kind == "message" and e.seq > mark and e.emitter != user and not e.deleted
    )


async def test_deleted_messages_after_the_mark_are_not_unread_and_those_before_change_nothing(
    store: Store,
) -> None:
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    seqs = [await send(store, room.id, other, at=n) for n in range(6)]
    await store.delete_message(room.id, seqs[1], other, False, later(10))  # before the mark
    await store.set_read_mark(room.id, me, seqs[2], later(11))
    assert (await listed(store, me, entity, room.id)).unread == 3
    await store.delete_message(room.id, seqs[4], other, False, later(12))  # after it
    entry = await listed(store, me, entity, room.id)
    assert entry.unread == 2 == await counted(store, room.id, me, seqs[2])
    # The deletions took seqs 7 and 8 of the stream; reading up to them leaves nothing.
    await store.set_read_mark(room.id, me, 100, later(13))
    assert (await listed(store, me, entity, room.id)).unread == 0


async def test_own_messages_after_the_mark_are_never_unread_deleted_or_not(
    store: Store,
) -> None:
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    await send(store, room.id, other)
    await store.set_read_mark(room.id, me, 1, later(1))
    mine = [await send(store, room.id, me, at=2 + n) for n in range(3)]
    theirs = await send(store, room.id, other, at=5)
    await store.delete_message(room.id, mine[0], me, False, later(6))  # own and deleted
    await store.delete_message(room.id, theirs, other, False, later(7))
    await send(store, room.id, other, at=8)
    entry = await listed(store, me, entity, room.id)
    assert entry.unread == 1 == await counted(store, room.id, me, 1)
    # The other user sees my two live messages as unread, and not the one I deleted.
    assert (await listed(store, other, entity, room.id)).unread == 2


async def test_edits_are_not_messages_and_a_mark_on_an_edit_counts_the_messages_before_it(
    store: Store,
) -> None:
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    first = await send(store, room.id, other)
    second = await send(store, room.id, other, at=1)
    edit, _ = await store.edit_message(room.id, first, other, "again", later(2))
    assert (await listed(store, me, entity, room.id)).unread == 2  # the edit is no message
    # A mark on the edit's seq: both messages before it are read.
    assert await store.set_read_mark(room.id, me, edit.seq, later(3)) == edit.seq
    assert (await listed(store, me, entity, room.id)).unread == 0
    await store.edit_message(room.id, second, other, "again", later(4))
    after = await send(store, room.id, other, at=5)
    entry = await listed(store, me, entity, room.id)
    assert entry.unread == 1 and entry.last_message is not None
    assert entry.last_message.seq == after


async def test_a_room_without_messages_has_no_unread_whatever_the_mark(store: Store) -> None:
    me, entity = new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    entry = await listed(store, me, entity, room.id)
    assert (entry.unread, entry.read_seq, entry.last_message) == (0, 0, None)
    assert await store.set_read_mark(room.id, me, 5, later(1)) == 0  # clamped to last_seq 0
    entry = await listed(store, me, entity, room.id)
    assert (entry.unread, entry.read_seq, entry.to_json()["last_message"]) == (0, 0, None)


async def test_a_mark_moved_backwards_keeps_its_ordinal(store: Store) -> None:
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    for n in range(4):
        await send(store, room.id, other, at=n)
    assert await store.set_read_mark(room.id, me, 3, later(5)) == 3
    assert await store.set_read_mark(room.id, me, 1, later(6)) == 3  # never backwards
    assert (await listed(store, me, entity, room.id)).unread == 1


def pick(rng: random.Random, live: list[tuple[int, str]]) -> int:
    """A random index of the live messages, the latest one half of the time (so that edits
    and deletes often change the message the conversation list shows)."""
    return len(live) - 1 if rng.random() < 0.5 else rng.randrange(len(live))


async def latest_json(store: Store, room_id: int) -> dict[str, Any] | None:
    """The room's latest message (kind 'message', as it is now: edited, or a tombstone) as
    the conversation list writes it, from the room's whole event stream."""
    events = await store.events(HistoryQuery(room_id=room_id, limit=1000, newest=False))
    messages = [e for e in events if e.kind == "message"]
    return messages[-1].to_json() if messages else None


async def test_unread_matches_the_event_stream_after_random_sends_batches_edits_deletes_marks(
    store: Store,
) -> None:
    """Sends in batches over several rooms (client_ids repeated inside a batch and resent
    later: stored once, counted once), edits, deletes by author or admin and marks, in random
    order: every room's unread count for every user equals the count from its events."""
    rng = random.Random(5)
    users, entity = [new_id() for _ in range(3)], new_id()
    rooms = [(await make_room(store, creator=users[0], owner=entity)).id for _ in range(3)]
    for user in users[1:]:
        for room_id in rooms:
            await store.put_rule(room_id, user, "user", "rw", 0, True, T0)
    marks = {(room_id, user): 0 for room_id in rooms for user in users}
    live: dict[int, list[tuple[int, str]]] = {room_id: [] for room_id in rooms}
    for at in range(1, 61):
        action = rng.random()
        if action < 0.5:
            batch = []
            for _ in range(rng.randint(1, 6)):
                room_id, user = rng.choice(rooms), rng.choice(users)
                client = f"c{rng.randint(0, 15)}" if rng.random() < 0.5 else None
                batch.append(NewMessage(room_id, user, "e", "hi", client, later(at)))
            for outcome in await store.append_batch(batch):
                assert isinstance(outcome, tuple)
                message, created = outcome
                if created:
                    live[message.room_id].append((message.seq, message.emitter))
        elif action < 0.7:
            room_id = rng.choice(rooms)
            if live[room_id]:
                seq, author = live[room_id].pop(pick(rng, live[room_id]))
                await store.delete_message(room_id, seq, users[0], True, later(at))
                entry = await listed(store, users[0], entity, room_id)
                assert entry.to_json()["last_message"] == await latest_json(store, room_id)
        elif action < 0.8:
            room_id = rng.choice(rooms)
            if live[room_id]:
                seq, author = live[room_id][pick(rng, live[room_id])]
                await store.edit_message(room_id, seq, author, f"edited at {at}", later(at))
                entry = await listed(store, users[0], entity, room_id)
                assert entry.to_json()["last_message"] == await latest_json(store, room_id)
        else:
            room_id, user = rng.choice(rooms), rng.choice(users)
            mark = await store.set_read_mark(room_id, user, rng.randint(0, 80), later(at))
            marks[room_id, user] = mark
        if at % 5 == 0:  # as the marks move over own messages and others', not only at the end
            for user in users:
                entries = {c.id: c for c in await store.conversations(user, entity, 0, "id", 9, 0)}
                for room_id in rooms:
                    expected = await counted(store, room_id, user, marks[room_id, user])
                    assert entries[room_id].unread == expected, (at, room_id, user)
    for user in users:
        entries = {c.id: c for c in await store.conversations(user, entity, 0, "id", 10, 0)}
        for room_id in rooms:
            expected = await counted(store, room_id, user, marks[room_id, user])
            assert entries[room_id].read_seq == marks[room_id, user]
            assert entries[room_id].unread == expected, (room_id, user)
            assert entries[room_id].to_json()["last_message"] == await latest_json(
                store, room_id
            ), room_id


async def stored_positions(
    kind: str, target: str, room_ids: list[int]
) -> tuple[dict[int, list[Any]], dict[int, int]]:
    """Each room's (kind, ordinal) rows in seq order and its message_count, as stored."""
    events_sql = "SELECT room_id, kind, ordinal FROM messages WHERE room_id = {p} ORDER BY seq"
    count_sql = "SELECT message_count FROM rooms WHERE id = {p}"
    rows: dict[int, list[Any]] = {}
    counts: dict[int, int] = {}
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            for room_id in room_ids:
                found = db.execute(events_sql.format(p="?"), (room_id,)).fetchall()
                rows[room_id] = [(k, o) for _, k, o in found]
                counts[room_id] = db.execute(count_sql.format(p="?"), (room_id,)).fetchone()[0]
        return rows, counts
    conn = await asyncpg.connect(target)
    try:
        for room_id in room_ids:
            found = await conn.fetch(events_sql.format(p="$1"), room_id)
            rows[room_id] = [(r["kind"], r["ordinal"]) for r in found]
            counts[room_id] = await conn.fetchval(count_sql.format(p="$1"), room_id)
    finally:
        await conn.close()
    return rows, counts


async def test_unread_matches_the_event_stream_after_mixed_batches_through_the_writer(
    store: Store, store_target: tuple[str, str]
) -> None:
    """Sends, edits and deletes submitted together to the batching writer, so that each batch
    mixes them (``append_events``): every new message must take its room's next ordinal and
    bump its message_count, edits and deletes neither. Two shapes of batch, so that both of
    PostgreSQL's mixed paths run: changes naming distinct stored messages (one statement), and
    changes naming a message of the batch itself or one message twice (read, plan, write).
    Then every room's stored ordinals run 1..n over its messages, and every user's unread
    count, after random marks, equals the count from the events."""
    rng = random.Random(11)
    users, entity = [new_id() for _ in range(3)], new_id()
    rooms = [(await make_room(store, creator=users[0], owner=entity)).id for _ in range(3)]
    for user in users[1:]:
        for room_id in rooms:
            await store.put_rule(room_id, user, "user", "rw", 0, True, T0)
    marks = {(room_id, user): 0 for room_id in rooms for user in users}
    live: dict[int, list[tuple[int, str]]] = {room_id: [] for room_id in rooms}
    writer = BatchWriter(store, shards=1, max_batch=500)
    writer.start()
    try:
        for at in range(1, 41):
            heads = await store.room_heads(rooms)
            events: list[RoomEvent] = []
            # Changes of stored messages, each named once (by its author, or by an admin).
            touched: set[tuple[int, int]] = set()
            for _ in range(rng.randint(1, 4)):
                room_id = rng.choice(rooms)
                if not live[room_id]:
                    continue
                seq, author = live[room_id][pick(rng, live[room_id])]
                if (room_id, seq) in touched:
                    continue
                touched.add((room_id, seq))
                if rng.random() < 0.5:
                    events.append(MessageChange(room_id, seq, author, later(at), "edited"))
                else:
                    events.append(MessageChange(room_id, seq, users[0], later(at), None, True))
            for _ in range(rng.randint(1, 5)):
                room_id, user = rng.choice(rooms), rng.choice(users)
                client = f"c{rng.randint(0, 15)}" if rng.random() < 0.5 else None
                events.append(NewMessage(room_id, user, "e", "hi", client, later(at)))
            rng.shuffle(events)
            if at % 2 == 0:
                # A new message first in its room takes the room's next seq: edit it (and
                # sometimes delete it) in the same batch; or name a stored message twice.
                room_id, user = rng.choice(rooms), rng.choice(users)
                first = heads[room_id] + 1
                events.insert(0, NewMessage(room_id, user, "e", "own", None, later(at)))
                events.append(MessageChange(room_id, first, user, later(at), "edited"))
                if rng.random() < 0.5:
                    events.append(MessageChange(room_id, first, user, later(at), None))
                elif live[room_id]:
                    seq, author = rng.choice(live[room_id])
                    events.append(MessageChange(room_id, seq, author, later(at), "again"))
                    events.append(MessageChange(room_id, seq, author, later(at), "again"))
            batches = writer.batches
            futures = [writer.submit(event) for event in events]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert writer.batches == batches + 1  # all of them in one mixed batch
            for event, outcome in zip(events, outcomes, strict=True):
                if isinstance(event, NewMessage):
                    assert isinstance(outcome, tuple)
                    message, created = outcome
                    if created:
                        live[message.room_id].append((message.seq, message.emitter))
                elif isinstance(outcome, Changed) and event.content is None:
                    live[event.room_id].remove((event.seq, outcome.message.emitter))
            for room_id in rooms:  # the list shows each room's latest message as it is now
                entry = await listed(store, users[0], entity, room_id)
                assert entry.to_json()["last_message"] == await latest_json(store, room_id)
            for _ in range(rng.randint(0, 2)):
                room_id, user = rng.choice(rooms), rng.choice(users)
                mark = await store.set_read_mark(room_id, user, rng.randint(0, 120), later(at))
                marks[room_id, user] = mark
    finally:
        await writer.close()
    rows, counts = await stored_positions(*store_target, rooms)
    for room_id in rooms:
        messages = [ordinal for kind, ordinal in rows[room_id] if kind == "message"]
        assert messages == list(range(1, len(messages) + 1)), room_id
        assert all(ordinal is None for kind, ordinal in rows[room_id] if kind != "message")
        assert counts[room_id] == len(messages)
        assert any(kind != "message" for kind, _ in rows[room_id])
    for user in users:
        entries = {c.id: c for c in await store.conversations(user, entity, 0, "id", 10, 0)}
        for room_id in rooms:
            expected = await counted(store, room_id, user, marks[room_id, user])
            assert entries[room_id].read_seq == marks[room_id, user]
            assert entries[room_id].unread == expected, (room_id, user)
            assert entries[room_id].to_json()["last_message"] == await latest_json(
                store, room_id
            ), room_id


# -- migration 5 from a database at version 4 ---------------------------------------------------

READER, WRITER, OWNER = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
# Room 1's stream at version 4: messages at seqs 1, 2, 3, 5, 7 and 8 (the third deleted), an
# edit of seq 1 at seq 4 and the deletion of seq 3 at seq 6. Room 2 has no event.
# (seq, emitter, kind, target_seq, deleted)
STREAM = [
    (1, WRITER, "message", None, False),
    (2, READER, "message", None, False),
    (3, WRITER, "message", None, True),
    (4, WRITER, "edit", 1, False),
    (5, WRITER, "message", None, False),
    (6, WRITER, "delete", 3, False),
    (7, READER, "message", None, False),
    (8, WRITER, "message", None, False),
]
# (room_id, user, seq): the reader's mark on the edit at seq 4, the writer's at the end, and a
# mark in the empty room.
READS = [(1, READER, 4), (1, WRITER, 8), (2, READER, 0)]


@pytest.fixture(params=["sqlite", "postgres"])
def version_four(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "v4.db")
    return "postgres", str(request.getfixturevalue("fresh_pg_url"))


def room_values(room_id: int) -> list[Any]:
    return [room_id, str(uuid.UUID(int=100 + room_id)), f"r{room_id}", 100, "group", OWNER, 10]


async def build_version_four(kind: str, target: str) -> None:
    """Migrations 1-4 and the rows above, written as version 4 would have stored them."""
    rooms = [(1, 8), (2, 0)]
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            db.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            for migration in load_migrations(sqlite_schema_path())[:4]:
                for statement in split_statements(migration.sql):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, 0)",
                    (migration.version, migration.name),
                )
            for room_id, last_seq in rooms:
                db.execute(
                    "INSERT INTO rooms (id, uuid, name, level_admin, type, entity_owner,"
                    " max_entity_rules, last_seq, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [*room_values(room_id), last_seq, to_micros(T0), to_micros(T0)],
                )
            for seq, emitter, event, target_seq, deleted in STREAM:
                db.execute(
                    "INSERT INTO messages (room_id, seq, emitter, entity, content, created_at,"
                    " kind, target_seq, deleted_at, deleted_by) VALUES (1, ?, ?, 'e', 'x', ?,"
                    " ?, ?, ?, ?)",
                    [
                        seq,
                        emitter,
                        to_micros(later(seq)),
                        event,
                        target_seq,
                        to_micros(later(6)) if deleted else None,
                        WRITER if deleted else None,
                    ],
                )
            for room_id, user, seq in READS:
                db.execute(
                    "INSERT INTO room_reads (room_id, user_uuid, seq, updated_at)"
                    " VALUES (?, ?, ?, ?)",
                    (room_id, user, seq, to_micros(T0)),
                )
        return
    conn = await asyncpg.connect(target)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL)"
        )
        for migration in load_migrations(postgres_schema_path())[:4]:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2, now())",
                migration.version,
                migration.name,
            )
        for room_id, last_seq in rooms:
            await conn.execute(
                "INSERT INTO rooms (id, uuid, name, level_admin, type, entity_owner,"
                " max_entity_rules, last_seq, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
                *room_values(room_id),
                last_seq,
                T0,
            )
        for seq, emitter, event, target_seq, deleted in STREAM:
            await conn.execute(
                "INSERT INTO messages (room_id, seq, emitter, entity, content, created_at,"
                " kind, target_seq, deleted_at, deleted_by) VALUES (1, $1, $2, 'e', 'x', $3,"
                " $4, $5, $6, $7)",
                seq,
                emitter,
                later(seq),
                event,
                target_seq,
                later(6) if deleted else None,
                WRITER if deleted else None,
            )
        for room_id, user, seq in READS:
            await conn.execute(
                "INSERT INTO room_reads (room_id, user_uuid, seq, updated_at)"
                " VALUES ($1, $2, $3, $4)",
                room_id,
                user,
                seq,
                T0,
            )
        await conn.execute("SELECT setval('rooms_id_seq', 2)")
    finally:
        await conn.close()


async def stored_ordinals(kind: str, target: str) -> tuple[list[Any], list[Any], list[Any]]:
    """(seq, ordinal) of room 1's events, (id, message_count) of the rooms and (room_id, user,
    ordinal) of the marks, as stored."""
    queries = (
        "SELECT seq, ordinal FROM messages WHERE room_id = 1 ORDER BY seq",
        "SELECT id, message_count FROM rooms ORDER BY id",
        "SELECT room_id, user_uuid, ordinal FROM room_reads ORDER BY room_id, user_uuid",
    )
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            first, second, third = (db.execute(sql).fetchall() for sql in queries)
    else:
        conn = await asyncpg.connect(target)
        try:
            first, second, third = [[tuple(r) for r in await conn.fetch(sql)] for sql in queries]
        finally:
            await conn.close()
    return list(first), list(second), list(third)


async def test_migration_5_backfills_ordinals_counts_and_marks_so_unread_is_unchanged(
    version_four: tuple[str, str],
) -> None:
    kind, target = version_four
    await build_version_four(kind, target)
    store: Store = SqliteStore(target) if kind == "sqlite" else PostgresStore(target)
    await store.open()
    try:
        ordinals, counts, marks = await stored_ordinals(kind, target)
        assert ordinals == [(1, 1), (2, 2), (3, 3), (4, None), (5, 4), (6, None), (7, 5), (8, 6)]
        assert counts == [(1, 6), (2, 0)]
        # The reader's mark on the edit at seq 4 follows messages 1-3; the writer read all six.
        assert sorted(marks) == sorted([(1, READER, 3), (1, WRITER, 6), (2, READER, 0)])
        entries = {c.id: c for c in await store.conversations(READER, OWNER, 100, "id", 10, 0)}
        # After seq 4: the writer's messages 5 and 8 (7 is the reader's own).
        assert (entries[1].unread, entries[2].unread) == (2, 0)
        assert entries[1].unread == await counted(store, 1, READER, 4)
        # The latest message as stored before the upgrade; none in the empty room.
        assert entries[1].to_json()["last_message"] == await latest_json(store, 1)
        assert entries[1].last_message is not None and entries[1].last_message.seq == 8
        assert entries[2].last_message is None
        writer = {c.id: c for c in await store.conversations(WRITER, OWNER, 100, "id", 10, 0)}
        assert writer[1].unread == 0
        # The writer goes on from the backfilled count: the next message is the seventh.
        sent, _ = await store.append_message(NewMessage(1, WRITER, "e", "new", None, later(9)))
        ordinals, counts, _ = await stored_ordinals(kind, target)
        assert (sent.seq, ordinals[-1], counts[0]) == (9, (9, 7), (1, 7))
        entries = {c.id: c for c in await store.conversations(READER, OWNER, 100, "id", 10, 0)}
        assert entries[1].unread == 3
        assert entries[1].last_message is not None and entries[1].last_message.content == "new"
    finally:
        await store.close()


# -- migration 6 from a database at version 5 ---------------------------------------------------


async def version_five(kind: str, target: str, upto: int = 5) -> None:
    """The version-4 database above, then migrations 5 to ``upto`` applied as a server of that
    version did."""
    await build_version_four(kind, target)
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            for migration in load_migrations(sqlite_schema_path())[4:upto]:
                for statement in split_statements(migration.sql):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, 0)",
                    (migration.version, migration.name),
                )
        return
    conn = await asyncpg.connect(target)
    try:
        for migration in load_migrations(postgres_schema_path())[4:upto]:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2, now())",
                migration.version,
                migration.name,
            )
    finally:
        await conn.close()


async def unread_index_definitions(kind: str, target: str) -> dict[str, str]:
    """The SQL of the indexes migration 6 rebuilds, by name."""
    names = ("messages_own_idx", "messages_deleted_idx", "messages_room_created_idx")
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            rows = db.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name IN (?, ?, ?)",
                names,
            ).fetchall()
        return {str(name): str(sql) for name, sql in rows}
    conn = await asyncpg.connect(target)
    try:
        rows = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname = ANY($1::text[])",
            list(names),
        )
    finally:
        await conn.close()
    return {str(r[0]): str(r[1]) for r in rows}


async def test_migration_6_rebuilds_the_indexes_for_fewer_entries_and_unread_is_unchanged(
    version_four: tuple[str, str],
) -> None:
    """Upgraded from version 5, the own messages' index holds deleted messages too, the
    deleted messages' index carries the emitter and the date index holds messages only; the
    unread counts stay those of the event stream, before and after new sends and deletions
    (own and others') after the marks."""
    kind, target = version_four
    await version_five(kind, target)
    store: Store = SqliteStore(target) if kind == "sqlite" else PostgresStore(target)
    await store.open()
    try:
        indexes = await unread_index_definitions(kind, target)
        assert "deleted_at" not in indexes["messages_own_idx"], indexes
        assert "emitter" in indexes["messages_deleted_idx"], indexes
        assert "WHERE" in indexes["messages_room_created_idx"], indexes  # messages only

        async def unread(user: str, mark: int) -> int:
            entries = {c.id: c for c in await store.conversations(user, OWNER, 100, "id", 10, 0)}
            assert entries[1].unread == await counted(store, 1, user, mark)
            return entries[1].unread

        # As migrated: after the reader's mark at seq 4, the writer's 5 and 8.
        assert (await unread(READER, 4), await unread(WRITER, 8)) == (2, 0)
        # The reader sends and deletes a message of their own after their mark (seqs 9, 10),
        # the writer deletes their message 5 (seq 11) and sends one (seq 12).
        mine = await send(store, 1, READER, 9)
        await store.delete_message(1, mine, READER, False, later(10))
        await store.delete_message(1, 5, WRITER, False, later(11))
        last = await send(store, 1, WRITER, 12)
        assert (mine, last) == (9, 12)
        # Reader: 8 and 12 (5 deleted, 7 and 9 their own). Writer after 8: nothing of theirs
        # counts, the reader's 9 is deleted.
        assert (await unread(READER, 4), await unread(WRITER, 8)) == (2, 0)
        await store.set_read_mark(1, WRITER, 0, later(13))  # never backwards: still 8
        assert await unread(WRITER, 8) == 0
    finally:
        await store.close()


# -- migration 7 from a database at version 6 ---------------------------------------------------


async def raw(kind: str, target: str, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` (no parameters) on the database as it is stored, outside any store."""
    if kind == "sqlite":
        with sqlite3.connect(target) as db:
            return [tuple(row) for row in db.execute(sql).fetchall()]
    conn = await asyncpg.connect(target)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


COPIES = "SELECT id, latest_seq, latest_content, latest_deleted_by FROM rooms ORDER BY id"


async def test_migration_7_copies_each_rooms_latest_message_onto_its_row_without_deleted_text(
    version_four: tuple[str, str],
) -> None:
    """Upgraded from version 6, room 1's row holds its latest message (seq 8, deleted at
    version 6: a tombstone, its text not copied) and the empty room none; the list shows what
    the event stream holds; then a send, an edit of it and a delete of an older message keep
    the copy as the stream is."""
    kind, target = version_four
    await version_five(kind, target, upto=6)
    stamp = to_micros(later(8.5)) if kind == "sqlite" else f"'{later(8.5).isoformat()}'"
    await raw(
        kind,
        target,
        f"UPDATE messages SET deleted_at = {stamp}, deleted_by = '{WRITER}'"
        " WHERE room_id = 1 AND seq = 8",
    )
    store: Store = SqliteStore(target) if kind == "sqlite" else PostgresStore(target)
    await store.open()
    try:
        assert await raw(kind, target, COPIES) == [(1, 8, "", WRITER), (2, None, None, None)]
        assert await raw(kind, target, "SELECT content FROM messages WHERE seq = 8") == [("x",)]
        entries = {c.id: c for c in await store.conversations(READER, OWNER, 100, "id", 10, 0)}
        tombstone = entries[1].to_json()["last_message"]
        assert tombstone == await latest_json(store, 1)
        assert tombstone["deleted"] is True and tombstone["content"] == ""
        assert entries[2].to_json()["last_message"] is None
        sent = await send(store, 1, WRITER, 9)
        await store.edit_message(1, sent, WRITER, "edited", later(10))
        await store.delete_message(1, 5, WRITER, False, later(11))  # an older one
        assert await raw(kind, target, COPIES) == [(1, sent, "edited", None), (2, None, None, None)]
        entries = {c.id: c for c in await store.conversations(READER, OWNER, 100, "id", 10, 0)}
        assert entries[1].to_json()["last_message"] == await latest_json(store, 1)
        assert entries[1].to_json()["last_message"]["edited_at"] is not None
    finally:
        await store.close()


# -- migration 8 from a database at version 7 ---------------------------------------------------

POSTER = str(uuid.UUID(int=4))
READ_ROWS = (
    "SELECT room_id, user_uuid, seq, own_count, own_at_mark, updated_at IS NOT NULL"
    " FROM room_reads ORDER BY room_id, user_uuid"
)


async def test_migration_8_counts_each_members_own_messages_on_their_read_row(
    version_four: tuple[str, str],
) -> None:
    """Upgraded from version 7, each (room, author) pair has a read row counting the author's
    messages, and each mark how many of them are at or before it; a row made for an author
    without a mark is no read mark. The unread counts stay those of the event stream, then
    after a send by that author (a count raised by the writer, on SQLite by the trigger the
    migration made) and marks moved over own messages."""
    kind, target = version_four
    await version_five(kind, target, upto=7)
    # The writer's message at seq 5 becomes a third user's, who never read the room.
    await raw(
        kind, target, f"UPDATE messages SET emitter = '{POSTER}' WHERE room_id = 1 AND seq = 5"
    )
    store: Store = SqliteStore(target) if kind == "sqlite" else PostgresStore(target)
    await store.open()
    try:
        # READER wrote 2 and 7 (mark at 4: one of them before it); WRITER 1, 3 and 8 (mark at
        # 8: all); POSTER 5, no mark.
        assert await raw(kind, target, READ_ROWS) == [
            (1, READER, 4, 2, 1, True),
            (1, WRITER, 8, 3, 3, True),
            (1, POSTER, 0, 1, 0, False),
            (2, READER, 0, 0, 0, True),
        ]
        assert [m.user for m in await store.read_marks(1)] == sorted([READER, WRITER])

        async def unread(user: str, mark: int) -> int:
            entries = {c.id: c for c in await store.conversations(user, OWNER, 100, "id", 10, 0)}
            assert entries[1].unread == await counted(store, 1, user, mark), user
            return entries[1].unread

        assert [await unread(READER, 4), await unread(WRITER, 8), await unread(POSTER, 0)] == [
            2,
            0,
            4,
        ]
        assert await send(store, 1, POSTER, 9) == 9
        assert await unread(POSTER, 0) == 4  # their own second message is not unread
        assert await store.set_read_mark(1, READER, 9, later(10)) == 9  # over their own 7
        assert await store.set_read_mark(1, POSTER, 9, later(10)) == 9
        assert await raw(kind, target, READ_ROWS) == [
            (1, READER, 9, 2, 2, True),
            (1, WRITER, 8, 3, 3, True),
            (1, POSTER, 9, 2, 2, True),
            (2, READER, 0, 0, 0, True),
        ]
        assert [m.user for m in await store.read_marks(1)] == sorted([READER, WRITER, POSTER])
        assert [await unread(READER, 9), await unread(WRITER, 8), await unread(POSTER, 9)] == [
            0,
            1,
            0,
        ]
        if kind == "postgres":
            options = await raw(
                kind,
                target,
                "SELECT relname, reloptions FROM pg_class"
                " WHERE relname IN ('rooms', 'room_reads') ORDER BY relname",
            )
            assert options == [("room_reads", ["fillfactor=80"]), ("rooms", ["fillfactor=50"])]
        indexes = await raw(
            kind,
            target,
            "SELECT indexname FROM pg_indexes WHERE tablename = 'rooms' ORDER BY indexname"
            if kind == "postgres"
            else "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'rooms'"
            " AND sql IS NOT NULL ORDER BY name",
        )
        assert ("rooms_entity_level_idx",) in indexes
        assert ("rooms_entity_owner_idx",) not in indexes
    finally:
        await store.close()


async def test_a_post_makes_a_read_row_that_is_no_read_mark_until_the_author_reads(
    store: Store,
) -> None:
    """Posting before reading gives the author a row counting their messages, which the read
    marks ("seen by") leave out; reading at 0 makes it a mark with its stamp, as a mark made
    without a post would be."""
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    await send(store, room.id, other)
    await send(store, room.id, other)
    assert await store.read_marks(room.id) == []
    assert (await listed(store, me, entity, room.id)).unread == 2
    assert await store.set_read_mark(room.id, other, 0, later(5)) == 0
    [mark] = await store.read_marks(room.id)
    assert (mark.user, mark.seq, mark.updated_at) == (other, 0, later(5))
    assert (await listed(store, other, entity, room.id)).unread == 0


async def test_own_sends_racing_own_marks_keep_the_unread_count_exact(store: Store) -> None:
    """One user's sends and mark moves race (two devices), with another user's sends: after
    every round the list's unread count for each user equals the count from the events, so
    no own message is counted twice or lost between the send's count and the mark's."""
    me, other, entity = new_id(), new_id(), new_id()
    room = await make_room(store, creator=me, owner=entity)
    await store.put_rule(room.id, other, "user", "rw", 0, True, T0)
    marks = {me: 0, other: 0}
    for at in range(1, 16):
        sends = [send(store, room.id, me, at), send(store, room.id, other, at)]
        reads = [
            store.set_read_mark(room.id, me, 10**6, later(at)),
            store.set_read_mark(room.id, other, at, later(at)),
        ]
        results = await asyncio.gather(*sends, *reads, send(store, room.id, me, at))
        marks = {me: max(marks[me], results[2]), other: max(marks[other], results[3])}
        for user in (me, other):
            entry = await listed(store, user, entity, room.id)
            assert entry.read_seq == marks[user]
            assert entry.unread == await counted(store, room.id, user, marks[user]), (at, user)
