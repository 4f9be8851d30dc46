"""The Store contract (nanomsg/store/base.py), run identically on SQLite and real PostgreSQL.

The PostgreSQL database is shared by the session, so every test creates its own rooms with
fresh random subjects and never assumes empty tables. Migration and adversity tests use a
database of their own (``fresh_pg_url``).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from nanomsg.models import Message, Principal, Room
from nanomsg.permissions import evaluate
from nanomsg.store.base import (
    HistoryQuery,
    LimitBelowRules,
    NewMessage,
    NewRoom,
    RoomChanges,
    RoomGone,
    Store,
    StoreUnavailable,
    TooManyRules,
)
from nanomsg.store.factory import store_from_url
from nanomsg.store.migrate import (
    load_migrations,
    parse_migrations,
    postgres_schema_path,
    sqlite_schema_path,
)
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
PG_VERSIONS = [m.version for m in load_migrations(postgres_schema_path())]
SQLITE_VERSIONS = [m.version for m in load_migrations(sqlite_schema_path())]


def new_id() -> str:
    return str(uuid.uuid4())


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, target). Sync on purpose: the pg_url fixture runs its own event loop."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "store.db")
    return "postgres", str(request.getfixturevalue("pg_url"))


def make_store(kind: str, target: str, **options: Any) -> SqliteStore | PostgresStore:
    if kind == "sqlite":
        return SqliteStore(target, **options)
    return PostgresStore(target, **options)


@pytest_asyncio.fixture
async def store(store_target: tuple[str, str]) -> AsyncIterator[SqliteStore | PostgresStore]:
    opened = make_store(*store_target)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def make_room(
    store: Store,
    *,
    type: str = "group",
    owner: str | None = None,
    creator: str | None = None,
    creator_level: int = 50,
    max_rules: int = 10,
    now: datetime = T0,
) -> Room:
    return await store.create_room(
        NewRoom(
            name="room " + new_id()[:8],
            level_admin=80,
            type=type,
            entity_owner=owner or new_id(),
            max_entity_rules=max_rules,
            creator_user=creator or new_id(),
            creator_level=creator_level,
            now=now,
        )
    )


def message(
    room_id: int,
    content: str = "hi",
    *,
    emitter: str = "alice",
    entity: str = "acme",
    client_id: str | None = None,
    now: datetime = T0,
) -> NewMessage:
    return NewMessage(
        room_id=room_id,
        emitter=emitter,
        entity=entity,
        content=content,
        client_id=client_id,
        now=now,
    )


async def fill(store: Store, room_id: int, count: int) -> list[Message]:
    """``count`` messages, the i-th (seq i+1) stamped T0 + i seconds."""
    out = []
    for i in range(count):
        stored, _ = await store.append_message(
            message(room_id, f"m{i + 1}", now=T0 + timedelta(seconds=i))
        )
        out.append(stored)
    return out


@asynccontextmanager
async def recorded_sql(store: SqliteStore | PostgresStore) -> AsyncIterator[list[str]]:
    """Every SQL statement the store sends while the block runs.

    White-box (private handles) on purpose: "one query" is the property under test. The
    PostgreSQL pool starts with one connection and sequential calls reuse it. On SQLite the
    calls on its connection are counted (each a hop to aiosqlite's thread), not the trace
    callback's lines: that one also reports each statement a trigger runs inside the engine,
    and names it as the statement that fired it.
    """
    seen: list[str] = []
    if isinstance(store, SqliteStore):
        db = store._db
        assert db is not None
        names = ("execute", "execute_fetchall", "executemany", "execute_insert")

        def recording(method: Any) -> Any:
            def call(sql: str, *args: Any, **kwargs: Any) -> Any:
                seen.append(sql)
                return method(sql, *args, **kwargs)

            return call

        for name in names:
            setattr(db, name, recording(getattr(db, name)))
        try:
            yield seen
        finally:
            for name in names:
                delattr(db, name)
        return
    async with store._pool.acquire() as conn:
        conn.add_query_logger(lambda record: seen.append(record.query))
    yield seen


# -- rooms --------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_create_group_room_stores_room_with_creator_user_rule_and_owner_entity_rule(
    store: Store,
) -> None:
    owner, creator = new_id(), new_id()
    room = await make_room(store, owner=owner, creator=creator, creator_level=42, max_rules=7)

    assert uuid.UUID(room.uuid).version == 4
    assert (room.type, room.entity_owner, room.max_entity_rules, room.level_admin) == (
        "group",
        owner,
        7,
        80,
    )
    assert (room.last_seq, room.created_at, room.updated_at, room.deleted_at) == (0, T0, T0, None)
    access = await store.room_access(room.id)
    assert access is not None
    assert access.room == room
    rules = {(r.kind, r.subject): r for r in access.rules}
    assert set(rules) == {("user", creator), ("entity", owner)}
    user_rule, entity_rule = rules["user", creator], rules["entity", owner]
    assert (user_rule.permissions, user_rule.level, user_rule.accepted) == ("rwa", 42, True)
    assert (entity_rule.permissions, entity_rule.level, entity_rule.accepted) == ("rw", 100, True)
    assert user_rule.room_id == entity_rule.room_id == room.id
    assert user_rule.created_at == user_rule.updated_at == T0


@pytest.mark.asyncio
async def test_create_user2user_room_adds_only_the_creator_user_rule(store: Store) -> None:
    creator = new_id()
    room = await make_room(store, type="user2user", creator=creator)

    access = await store.room_access(room.id)
    assert access is not None
    assert [(r.kind, r.subject, r.permissions) for r in access.rules] == [("user", creator, "rwa")]


@pytest.mark.asyncio
async def test_rooms_get_distinct_ids_and_uuids(store: Store) -> None:
    first, second = await make_room(store), await make_room(store)
    assert first.id != second.id
    assert first.uuid != second.uuid


@pytest.mark.asyncio
async def test_timestamps_round_trip_as_the_same_instant_in_utc(store: Store) -> None:
    plus_two = datetime(2026, 3, 1, 14, 0, 0, 654321, tzinfo=timezone(timedelta(hours=2)))
    room = await make_room(store, now=plus_two)

    access = await store.room_access(room.id)
    assert access is not None
    assert access.room.created_at == plus_two
    assert access.room.created_at.utcoffset() == timedelta(0)
    assert room.created_at.utcoffset() == timedelta(0)
    assert access.room.created_at.microsecond == 654321


@pytest.mark.asyncio
async def test_naive_timestamps_are_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await make_room(store, now=datetime(2026, 3, 1, 12, 0, 0))


@pytest.mark.asyncio
async def test_room_access_reads_the_room_and_all_its_rules_in_one_query(
    store: SqliteStore | PostgresStore,
) -> None:
    room = await make_room(store, owner="owner-" + new_id(), creator="creator-" + new_id())
    extra = ["guest-b-" + new_id(), "guest-a-" + new_id()]
    for subject in extra:
        await store.put_rule(room.id, subject, "user", "r", 10, False, T0)
    await store.append_message(message(room.id))

    async with recorded_sql(store) as statements:
        access = await store.room_access(room.id)
    room_queries = [sql for sql in statements if "room" in sql.lower()]

    assert len(room_queries) == 1, statements
    assert access is not None
    assert access.room.last_seq == 1
    # Ordered by kind then subject, identically on both backends.
    assert [(r.kind, r.subject) for r in access.rules] == sorted(
        (r.kind, r.subject) for r in access.rules
    )
    assert len(access.rules) == 4
    assert {r.subject for r in access.rules} >= set(extra)


@pytest.mark.asyncio
async def test_room_access_is_none_for_absent_and_deleted_rooms(store: Store) -> None:
    room = await make_room(store)
    assert await store.room_access(10**12) is None

    assert await store.delete_room(room.id, T0 + timedelta(minutes=1)) is True
    assert await store.room_access(room.id) is None


@pytest.mark.asyncio
async def test_delete_room_is_soft_history_stays_readable_and_second_delete_is_false(
    store: Store,
) -> None:
    owner, creator = new_id(), new_id()
    room = await make_room(store, owner=owner, creator=creator)
    stored = await fill(store, room.id, 3)

    assert await store.delete_room(room.id, T0 + timedelta(hours=1)) is True
    assert await store.delete_room(room.id, T0 + timedelta(hours=2)) is False
    assert await store.delete_room(10**12, T0) is False

    assert await store.history(HistoryQuery(room_id=room.id, limit=10)) == stored
    assert await store.rooms_visible_to(creator, owner, 100, 10, 0) == []
    assert await store.rules_of(creator, owner, 100, None, 10, 0) == []


# -- messages -----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_append_stores_message_with_seq_starting_at_one(store: Store) -> None:
    room = await make_room(store)
    first, created = await store.append_message(
        message(room.id, "hello", emitter="u1", entity="e1", client_id="c-1")
    )
    second, _ = await store.append_message(message(room.id, "again"))

    assert created is True
    assert (first.seq, second.seq) == (1, 2)
    assert second.id > first.id
    assert (first.room_id, first.emitter, first.entity, first.content, first.client_id) == (
        room.id,
        "u1",
        "e1",
        "hello",
        "c-1",
    )
    assert first.created_at == T0
    assert await store.history(HistoryQuery(room_id=room.id, limit=10)) == [first, second]
    access = await store.room_access(room.id)
    assert access is not None and access.room.last_seq == 2


@pytest.mark.asyncio
async def test_seq_is_per_room(store: Store) -> None:
    a, b = await make_room(store), await make_room(store)
    await fill(store, a.id, 3)
    stored, _ = await store.append_message(message(b.id))
    assert stored.seq == 1


@pytest.mark.asyncio
async def test_fifty_concurrent_appends_get_seqs_one_to_fifty_without_gaps(store: Store) -> None:
    room = await make_room(store)

    results = await asyncio.gather(
        *(store.append_message(message(room.id, f"m{i}")) for i in range(50))
    )

    assert sorted(msg.seq for msg, _ in results) == list(range(1, 51))
    assert all(created for _, created in results)
    history = await store.history(HistoryQuery(room_id=room.id, limit=100))
    assert [m.seq for m in history] == list(range(1, 51))
    access = await store.room_access(room.id)
    assert access is not None and access.room.last_seq == 50


@pytest.mark.asyncio
async def test_repeated_client_id_from_same_emitter_returns_stored_message_and_stores_nothing(
    store: Store,
) -> None:
    room = await make_room(store)
    original, created = await store.append_message(
        message(room.id, "first", emitter="alice", client_id="abc")
    )
    retry, created_again = await store.append_message(
        message(room.id, "retry", emitter="alice", client_id="abc", now=T0 + timedelta(seconds=5))
    )

    assert created is True
    assert created_again is False
    assert retry == original
    assert retry.content == "first"
    assert await store.history(HistoryQuery(room_id=room.id, limit=10)) == [original]
    access = await store.room_access(room.id)
    assert access is not None and access.room.last_seq == 1


@pytest.mark.asyncio
async def test_same_client_id_from_another_emitter_or_room_is_a_new_message(store: Store) -> None:
    room, other_room = await make_room(store), await make_room(store)
    first, _ = await store.append_message(message(room.id, emitter="alice", client_id="abc"))

    by_bob, bob_created = await store.append_message(
        message(room.id, emitter="bob", client_id="abc")
    )
    elsewhere, elsewhere_created = await store.append_message(
        message(other_room.id, emitter="alice", client_id="abc")
    )

    assert bob_created is True and by_bob.id != first.id and by_bob.seq == 2
    assert elsewhere_created is True and elsewhere.seq == 1


@pytest.mark.asyncio
async def test_concurrent_sends_with_one_client_id_store_exactly_one_message(store: Store) -> None:
    room = await make_room(store)

    results = await asyncio.gather(
        *(store.append_message(message(room.id, f"copy {i}", client_id="dup")) for i in range(10))
    )

    assert sum(created for _, created in results) == 1
    assert len({msg.id for msg, _ in results}) == 1
    assert {msg.seq for msg, _ in results} == {1}
    # The losers' seq bumps were rolled back: the next message follows without a gap.
    following, _ = await store.append_message(message(room.id, "next"))
    assert following.seq == 2


@pytest.mark.asyncio
async def test_append_to_absent_or_deleted_room_raises_room_gone(store: Store) -> None:
    room = await make_room(store)
    await store.append_message(message(room.id))
    await store.delete_room(room.id, T0)

    with pytest.raises(RoomGone):
        await store.append_message(message(room.id))
    with pytest.raises(RoomGone):
        await store.append_message(message(room.id, client_id="new-id"))
    with pytest.raises(RoomGone):
        await store.append_message(message(10**12))
    assert [m.seq for m in await store.history(HistoryQuery(room_id=room.id, limit=10))] == [1]


@pytest.mark.asyncio
async def test_history_newest_returns_latest_matches_oldest_first(store: Store) -> None:
    room = await make_room(store)
    stored = await fill(store, room.id, 10)

    newest = await store.history(HistoryQuery(room_id=room.id, limit=3))
    oldest = await store.history(HistoryQuery(room_id=room.id, limit=3, newest=False))

    assert newest == stored[7:10]
    assert oldest == stored[0:3]


@pytest.mark.asyncio
async def test_history_before_and_after_are_exclusive_seq_bounds(store: Store) -> None:
    room = await make_room(store)
    await fill(store, room.id, 10)

    async def seqs(**bounds: Any) -> list[int]:
        return [m.seq for m in await store.history(HistoryQuery(room_id=room.id, **bounds))]

    assert await seqs(limit=2, before=5) == [3, 4]
    assert await seqs(limit=2, before=5, newest=False) == [1, 2]
    assert await seqs(limit=2, after=5, newest=False) == [6, 7]
    assert await seqs(limit=2, after=5) == [9, 10]
    assert await seqs(limit=10, after=2, before=6) == [3, 4, 5]
    assert await seqs(limit=10, after=5, before=6) == []


@pytest.mark.asyncio
async def test_history_date_range_is_inclusive_and_combines_with_limit(store: Store) -> None:
    room = await make_room(store)
    await fill(store, room.id, 10)

    async def seqs(**bounds: Any) -> list[int]:
        return [m.seq for m in await store.history(HistoryQuery(room_id=room.id, **bounds))]

    start, end = T0 + timedelta(seconds=3), T0 + timedelta(seconds=7)
    assert await seqs(limit=10, date_from=start, date_to=end) == [4, 5, 6, 7, 8]
    assert await seqs(limit=2, date_from=start, date_to=end) == [7, 8]
    assert await seqs(limit=2, date_from=start, date_to=end, newest=False) == [4, 5]
    assert await seqs(limit=10, date_from=T0 + timedelta(seconds=8)) == [9, 10]
    assert await seqs(limit=10, date_to=T0 + timedelta(seconds=1)) == [1, 2]
    # One microsecond past a message's stamp excludes it.
    assert await seqs(limit=10, date_from=start + timedelta(microseconds=1), date_to=end) == [
        5,
        6,
        7,
        8,
    ]
    assert await seqs(limit=10, date_from=start, before=6) == [4, 5]


@pytest.mark.asyncio
async def test_history_reads_only_its_room_and_honours_limit_zero(store: Store) -> None:
    room, other = await make_room(store), await make_room(store)
    await fill(store, other.id, 2)

    assert await store.history(HistoryQuery(room_id=room.id, limit=10)) == []
    assert await store.history(HistoryQuery(room_id=other.id, limit=0)) == []


# -- rules --------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_put_rule_creates_then_updates_keeping_created_at(store: Store) -> None:
    room = await make_room(store)
    guest = new_id()
    later = T0 + timedelta(minutes=5)

    created_rule, created = await store.put_rule(room.id, guest, "user", "r", 10, False, T0)
    updated_rule, created_again = await store.put_rule(
        room.id, guest, "user", "rw", 20, True, later
    )

    assert created is True
    assert created_again is False
    assert (created_rule.permissions, created_rule.level, created_rule.accepted) == ("r", 10, False)
    assert (updated_rule.permissions, updated_rule.level, updated_rule.accepted) == ("rw", 20, True)
    assert (updated_rule.created_at, updated_rule.updated_at) == (T0, later)
    access = await store.room_access(room.id)
    assert access is not None
    assert updated_rule in access.rules
    assert len(access.rules) == 3


@pytest.mark.asyncio
async def test_user_and_entity_rules_for_one_subject_are_distinct(store: Store) -> None:
    room = await make_room(store)
    subject = new_id()
    _, first = await store.put_rule(room.id, subject, "user", "r", 1, True, T0)
    _, second = await store.put_rule(room.id, subject, "entity", "r", 1, True, T0)
    assert (first, second) == (True, True)


@pytest.mark.asyncio
async def test_put_rule_on_absent_or_deleted_room_raises_room_gone(store: Store) -> None:
    room = await make_room(store)
    await store.delete_room(room.id, T0)
    with pytest.raises(RoomGone):
        await store.put_rule(room.id, new_id(), "user", "r", 1, True, T0)
    with pytest.raises(RoomGone):
        await store.put_rule(10**12, new_id(), "user", "r", 1, True, T0)


@pytest.mark.asyncio
async def test_put_rule_rejects_unknown_kind(store: Store) -> None:
    room = await make_room(store)
    with pytest.raises(ValueError, match="kind"):
        await store.put_rule(room.id, new_id(), "robot", "r", 1, True, T0)


@pytest.mark.asyncio
async def test_creating_a_rule_at_max_entity_rules_raises_but_updating_is_allowed(
    store: Store,
) -> None:
    # Group room: the two creator rules count towards the limit of 3.
    room = await make_room(store, max_rules=3)
    guest = new_id()
    await store.put_rule(room.id, guest, "user", "r", 1, False, T0)

    with pytest.raises(TooManyRules):
        await store.put_rule(room.id, new_id(), "user", "r", 1, False, T0)
    rule, created = await store.put_rule(room.id, guest, "user", "rw", 2, True, T0)

    assert created is False and rule.permissions == "rw"
    access = await store.room_access(room.id)
    assert access is not None and len(access.rules) == 3


@pytest.mark.asyncio
async def test_creator_rule_alone_can_fill_a_user2user_room_limit(store: Store) -> None:
    room = await make_room(store, type="user2user", max_rules=1)
    with pytest.raises(TooManyRules):
        await store.put_rule(room.id, new_id(), "user", "r", 1, True, T0)


@pytest.mark.asyncio
async def test_concurrent_rule_creates_never_pass_max_entity_rules(store: Store) -> None:
    room = await make_room(store, max_rules=5)  # 2 creator rules + 3 free slots

    results = await asyncio.gather(
        *(store.put_rule(room.id, new_id(), "user", "r", 1, True, T0) for _ in range(10)),
        return_exceptions=True,
    )

    assert sum(isinstance(r, tuple) and r[1] for r in results) == 3
    assert sum(isinstance(r, TooManyRules) for r in results) == 7
    access = await store.room_access(room.id)
    assert access is not None and len(access.rules) == 5


@pytest.mark.asyncio
async def test_update_room_changes_only_the_given_fields_and_stamps_updated_at(
    store: Store,
) -> None:
    room = await make_room(store, max_rules=10)
    later = T0 + timedelta(minutes=5)

    renamed = await store.update_room(room.id, RoomChanges(name="renamed"), later)
    changed = await store.update_room(
        room.id, RoomChanges(level_admin=7, max_entity_rules=4), later + timedelta(seconds=1)
    )

    assert (renamed.name, renamed.level_admin, renamed.max_entity_rules) == ("renamed", 80, 10)
    assert renamed.updated_at == later and renamed.created_at == room.created_at
    assert (changed.name, changed.level_admin, changed.max_entity_rules) == ("renamed", 7, 4)
    access = await store.room_access(room.id)
    assert access is not None and access.room == changed


@pytest.mark.asyncio
async def test_update_room_refuses_a_limit_below_the_rules_held_and_changes_nothing(
    store: Store,
) -> None:
    room = await make_room(store, max_rules=10)  # 2 creator rules
    await store.put_rule(room.id, new_id(), "user", "r", 1, True, T0)

    with pytest.raises(LimitBelowRules) as refused:
        await store.update_room(room.id, RoomChanges(name="x", max_entity_rules=2), T0)

    assert (refused.value.rules, refused.value.requested) == (3, 2)
    access = await store.room_access(room.id)
    assert access is not None and access.room == room
    exact = await store.update_room(room.id, RoomChanges(max_entity_rules=3), T0)
    assert exact.max_entity_rules == 3


@pytest.mark.asyncio
async def test_update_room_on_absent_or_deleted_room_raises_room_gone(store: Store) -> None:
    room = await make_room(store)
    await store.delete_room(room.id, T0)
    for room_id in (room.id, 2**62):
        with pytest.raises(RoomGone):
            await store.update_room(room_id, RoomChanges(name="x"), T0)


@pytest.mark.asyncio
async def test_rule_creates_racing_a_lowered_limit_never_leave_more_rules_than_it(
    store: Store,
) -> None:
    room = await make_room(store, max_rules=20)  # 2 creator rules

    results = await asyncio.gather(
        *(store.put_rule(room.id, new_id(), "user", "r", 1, True, T0) for _ in range(6)),
        store.update_room(room.id, RoomChanges(max_entity_rules=5), T0),
        *(store.put_rule(room.id, new_id(), "user", "r", 1, True, T0) for _ in range(6)),
        return_exceptions=True,
    )

    assert all(isinstance(r, tuple | Room | TooManyRules | LimitBelowRules) for r in results)
    access = await store.room_access(room.id)
    assert access is not None
    assert len(access.rules) <= access.room.max_entity_rules


@pytest.mark.asyncio
async def test_group_room_entity_rule_takes_the_requested_entity_level(store: Store) -> None:
    owner = new_id()
    room = await store.create_room(
        NewRoom("r", 80, "group", owner, 10, new_id(), 50, T0, entity_level=0)
    )
    access = await store.room_access(room.id)
    assert access is not None
    assert [(r.subject, r.level) for r in access.rules if r.kind == "entity"] == [(owner, 0)]


@pytest.mark.asyncio
async def test_delete_rule_of_one_kind_or_of_every_kind(store: Store) -> None:
    room = await make_room(store)
    subject = new_id()
    await store.put_rule(room.id, subject, "user", "r", 1, True, T0)
    await store.put_rule(room.id, subject, "entity", "r", 1, True, T0)
    other = new_id()
    await store.put_rule(room.id, other, "user", "r", 1, True, T0)
    await store.put_rule(room.id, other, "entity", "r", 1, True, T0)

    assert await store.delete_rule(room.id, subject, "user") is True
    assert await store.delete_rule(room.id, subject, "user") is False
    assert await store.delete_rule(room.id, other, None) is True
    assert await store.delete_rule(room.id, other, None) is False
    assert await store.delete_rule(room.id, new_id(), None) is False

    access = await store.room_access(room.id)
    assert access is not None
    remaining = {(r.kind, r.subject) for r in access.rules}
    assert ("entity", subject) in remaining
    assert ("user", subject) not in remaining
    assert not {("user", other), ("entity", other)} & remaining


@pytest.mark.asyncio
async def test_set_accepted_flips_one_rule_and_stamps_updated_at(store: Store) -> None:
    room = await make_room(store)
    guest = new_id()
    later = T0 + timedelta(hours=1)
    await store.put_rule(room.id, guest, "user", "r", 5, False, T0)

    accepted = await store.set_accepted(room.id, guest, "user", True, later)
    declined = await store.set_accepted(room.id, guest, "user", False, later + timedelta(1))

    assert accepted is not None and accepted.accepted is True
    assert (accepted.created_at, accepted.updated_at) == (T0, later)
    assert (accepted.subject, accepted.kind, accepted.permissions, accepted.level) == (
        guest,
        "user",
        "r",
        5,
    )
    assert declined is not None and declined.accepted is False
    access = await store.room_access(room.id)
    assert access is not None and declined in access.rules


@pytest.mark.asyncio
async def test_set_accepted_is_none_without_rule_or_in_deleted_room(store: Store) -> None:
    room = await make_room(store)
    guest = new_id()
    await store.put_rule(room.id, guest, "user", "r", 5, False, T0)

    assert await store.set_accepted(room.id, guest, "entity", True, T0) is None
    assert await store.set_accepted(room.id, new_id(), "user", True, T0) is None
    await store.delete_room(room.id, T0)
    assert await store.set_accepted(room.id, guest, "user", True, T0) is None


@pytest.mark.asyncio
async def test_rules_of_lists_callers_user_and_entity_rules_by_room_then_kind(
    store: Store,
) -> None:
    user, entity = new_id(), new_id()
    a = await make_room(store)
    b = await make_room(store, owner=entity)  # creator entity rule for our entity
    c = await make_room(store)
    gone = await make_room(store)
    await store.put_rule(a.id, user, "user", "r", 1, True, T0)
    await store.put_rule(b.id, user, "user", "rw", 1, False, T0)
    await store.put_rule(c.id, entity, "entity", "r", 7, False, T0)
    await store.put_rule(c.id, new_id(), "user", "r", 1, True, T0)  # someone else's
    await store.put_rule(gone.id, user, "user", "r", 1, True, T0)
    await store.delete_room(gone.id, T0)

    everything = await store.rules_of(user, entity, 100, None, 10, 0)

    assert [(rule.room_id, rule.kind, rule.subject) for rule, _ in everything] == [
        (a.id, "user", user),
        (b.id, "entity", entity),
        (b.id, "user", user),
        (c.id, "entity", entity),
    ]
    assert [room.id for _, room in everything] == [a.id, b.id, b.id, c.id]
    assert everything[0][1] == a

    accepted = await store.rules_of(user, entity, 100, True, 10, 0)
    pending = await store.rules_of(user, entity, 100, False, 10, 0)
    assert [(r.room_id, r.kind) for r, _ in accepted] == [(a.id, "user"), (b.id, "entity")]
    assert [(r.room_id, r.kind) for r, _ in pending] == [(b.id, "user"), (c.id, "entity")]

    page = await store.rules_of(user, entity, 100, None, 2, 1)
    assert [(r.room_id, r.kind) for r, _ in page] == [(b.id, "entity"), (b.id, "user")]
    assert await store.rules_of(user, entity, 100, None, 10, 4) == []


@pytest.mark.asyncio
async def test_rules_of_leaves_out_entity_rules_above_the_level_before_paging(
    store: Store,
) -> None:
    user, entity = new_id(), new_id()
    rooms = [await make_room(store) for _ in range(4)]
    for room in rooms:
        # Above the caller's level 50: never the caller's, whatever the page.
        await store.put_rule(room.id, entity, "entity", "rw", 51, True, T0)
        await store.put_rule(room.id, user, "user", "r", 99, True, T0)  # user rules: any level
    await store.put_rule(rooms[2].id, entity, "entity", "r", 50, True, T0)  # at the level: kept

    expected = [
        (rooms[0].id, "user"),
        (rooms[1].id, "user"),
        (rooms[2].id, "entity"),
        (rooms[2].id, "user"),
        (rooms[3].id, "user"),
    ]
    everything = await store.rules_of(user, entity, 50, None, 10, 0)
    assert [(r.room_id, r.kind) for r, _ in everything] == expected
    pages = [await store.rules_of(user, entity, 50, None, 2, offset) for offset in (0, 2, 4)]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [(r.room_id, r.kind) for page in pages for r, _ in page] == expected
    assert len(await store.rules_of(user, entity, 51, None, 10, 0)) == 8
    assert [(r.room_id, r.kind) for r, _ in await store.rules_of(user, entity, 0, True, 10, 0)] == [
        (room.id, "user") for room in rooms
    ]


async def visible_ids(store: Store, user: str, entity: str, level: int) -> list[int]:
    return [r.id for r in await store.rooms_visible_to(user, entity, level, 1000, 0)]


@pytest.mark.asyncio
async def test_rooms_visible_to_owner_admins_and_readable_rules_only(store: Store) -> None:
    user, entity = new_id(), new_id()
    owned = await make_room(store, owner=entity)  # level_admin 80; its entity rule is at 100
    by_user_rule = await make_room(store)
    await store.put_rule(by_user_rule.id, user, "user", "r", 1, True, T0)
    by_entity_rule = await make_room(store)
    await store.put_rule(by_entity_rule.id, entity, "entity", "r", 50, True, T0)
    pending = await make_room(store)
    await store.put_rule(pending.id, user, "user", "r", 1, False, T0)
    pending_entity = await make_room(store)
    await store.put_rule(pending_entity.id, entity, "entity", "r", 1, False, T0)
    deleted = await make_room(store, owner=entity)
    await store.delete_room(deleted.id, T0)
    await make_room(store)  # unrelated

    at_80 = await store.rooms_visible_to(user, entity, 80, 10, 0)
    at_50 = await store.rooms_visible_to(user, entity, 50, 10, 0)
    at_49 = await store.rooms_visible_to(user, entity, 49, 10, 0)
    other_entity = await store.rooms_visible_to(new_id(), new_id(), 100, 10, 0)

    assert [r.id for r in at_80] == [owned.id, by_user_rule.id, by_entity_rule.id]
    assert at_80[0] == owned
    assert [r.id for r in at_50] == [by_user_rule.id, by_entity_rule.id]
    assert [r.id for r in at_49] == [by_user_rule.id]
    assert other_entity == []
    assert [r.id for r in await store.rooms_visible_to(user, entity, 100, 2, 1)] == [
        by_user_rule.id,
        by_entity_rule.id,
    ]


@pytest.mark.asyncio
async def test_rooms_visible_to_lists_a_room_once_when_several_rules_admit(store: Store) -> None:
    user, entity = new_id(), new_id()
    room = await make_room(store, owner=entity, creator=user)
    await store.put_rule(room.id, entity, "entity", "r", 1, True, T0)

    assert [r.id for r in await store.rooms_visible_to(user, entity, 100, 10, 0)] == [room.id]


@pytest.mark.asyncio
async def test_rooms_visible_to_hides_owner_entity_rooms_below_level_admin(store: Store) -> None:
    user, entity = new_id(), new_id()
    direct = await make_room(store, type="user2user", owner=entity)  # no entity rule at all
    group = await make_room(store, owner=entity)  # entity rule rw at level 100

    assert await visible_ids(store, user, entity, 79) == []
    assert await visible_ids(store, user, entity, 80) == [direct.id, group.id]


@pytest.mark.asyncio
async def test_rooms_visible_to_hides_banned_callers_despite_readable_rules(store: Store) -> None:
    user, entity = new_id(), new_id()
    user_ban = await make_room(store)
    await store.put_rule(user_ban.id, user, "user", "b", 0, True, T0)
    await store.put_rule(user_ban.id, entity, "entity", "rw", 0, True, T0)
    entity_ban = await make_room(store)
    await store.put_rule(entity_ban.id, user, "user", "rw", 0, True, T0)
    await store.put_rule(entity_ban.id, entity, "entity", "b", 10, True, T0)
    ban_in_same_rule = await make_room(store)
    await store.put_rule(ban_in_same_rule.id, user, "user", "rwb", 0, True, T0)
    ban_only = await make_room(store)
    await store.put_rule(ban_only.id, user, "user", "b", 0, True, T0)
    pending_ban = await make_room(store)
    await store.put_rule(pending_ban.id, user, "user", "r", 0, True, T0)
    await store.put_rule(pending_ban.id, entity, "entity", "b", 0, False, T0)
    ban_for_others = await make_room(store)
    await store.put_rule(ban_for_others.id, user, "user", "r", 0, True, T0)
    await store.put_rule(ban_for_others.id, new_id(), "user", "b", 0, True, T0)
    await store.put_rule(ban_for_others.id, user, "entity", "b", 0, True, T0)  # not my entity
    await store.put_rule(ban_for_others.id, entity, "user", "b", 0, True, T0)  # not my user

    assert await visible_ids(store, user, entity, 50) == [pending_ban.id, ban_for_others.id]
    # Below the entity ban's level it no longer applies, and the user rule admits.
    assert await visible_ids(store, user, entity, 9) == [
        entity_ban.id,
        pending_ban.id,
        ban_for_others.id,
    ]


@pytest.mark.asyncio
async def test_rooms_visible_to_needs_read_or_admin_not_write_alone(store: Store) -> None:
    user, entity = new_id(), new_id()
    write_only = await make_room(store)
    await store.put_rule(write_only.id, user, "user", "w", 0, True, T0)
    write_only_entity = await make_room(store)
    await store.put_rule(write_only_entity.id, entity, "entity", "w", 0, True, T0)
    no_flags = await make_room(store)
    await store.put_rule(no_flags.id, user, "user", "", 0, True, T0)
    admin_only = await make_room(store)
    await store.put_rule(admin_only.id, user, "user", "a", 0, True, T0)
    read_by_union = await make_room(store)
    await store.put_rule(read_by_union.id, user, "user", "w", 0, True, T0)
    await store.put_rule(read_by_union.id, entity, "entity", "r", 0, True, T0)

    assert await visible_ids(store, user, entity, 50) == [admin_only.id, read_by_union.id]


@pytest.mark.asyncio
async def test_rooms_visible_to_ignores_pending_rules(store: Store) -> None:
    user, entity = new_id(), new_id()
    pending = await make_room(store)
    await store.put_rule(pending.id, user, "user", "rwa", 0, False, T0)
    pending_entity = await make_room(store)
    await store.put_rule(pending_entity.id, entity, "entity", "r", 0, False, T0)

    assert await visible_ids(store, user, entity, 100) == []
    await store.set_accepted(pending.id, user, "user", True, T0)
    assert await visible_ids(store, user, entity, 100) == [pending.id]


@pytest.mark.asyncio
async def test_rooms_visible_to_owner_entity_admin_sees_room_despite_bans(store: Store) -> None:
    user, entity = new_id(), new_id()
    room = await make_room(store, owner=entity)  # level_admin 80
    await store.put_rule(room.id, user, "user", "b", 0, True, T0)
    await store.put_rule(room.id, entity, "entity", "b", 0, True, T0)

    assert await visible_ids(store, user, entity, 80) == [room.id]
    assert await visible_ids(store, user, entity, 79) == []


@pytest.mark.asyncio
async def test_rooms_visible_to_pages_are_full_around_hidden_rooms(store: Store) -> None:
    user, entity = new_id(), new_id()
    visible: list[int] = []
    for i in range(7):
        # Before every visible room, rooms where a rule names the caller but does not admit.
        banned = await make_room(store)
        await store.put_rule(banned.id, user, "user", "rb", 0, True, T0)
        await make_room(store, owner=entity)  # owner entity, but below level_admin 80
        room = await make_room(store)
        await store.put_rule(room.id, user, "user", "r", 0, True, T0)
        if i % 2:
            await store.put_rule(room.id, entity, "entity", "w", 0, True, T0)
        visible.append(room.id)

    pages = [
        [r.id for r in await store.rooms_visible_to(user, entity, 50, 2, offset)]
        for offset in (0, 2, 4, 6, 8)
    ]
    assert [len(page) for page in pages] == [2, 2, 2, 1, 0]
    assert [room_id for page in pages for room_id in page] == visible


@pytest.mark.asyncio
async def test_rooms_visible_to_agrees_with_evaluate_on_random_rules(store: Store) -> None:
    """Seeded random rooms and rules: the SQL listing equals ``evaluate(...).read``."""
    rng = random.Random(20260301)
    user, entity = new_id(), new_id()
    levels = (0, 10, 50, 80, 100)

    def flags() -> str:
        chosen = [flag for flag in "rwba" if rng.random() < 0.35]
        rng.shuffle(chosen)
        return "".join(chosen)

    room_ids: list[int] = []
    for _ in range(40):
        room = await make_room(
            store,
            type=rng.choice(["group", "user2user"]),
            owner=entity if rng.random() < 0.3 else None,
            creator=user if rng.random() < 0.1 else None,
        )
        if rng.random() < 0.7:
            await store.put_rule(
                room.id, user, "user", flags(), rng.choice(levels), rng.random() < 0.8, T0
            )
        if rng.random() < 0.7:
            await store.put_rule(
                room.id, entity, "entity", flags(), rng.choice(levels), rng.random() < 0.8, T0
            )
        if rng.random() < 0.3:  # rules naming someone else, or my ids under the wrong kind
            subject, kind = rng.choice(
                [(new_id(), "user"), (new_id(), "entity"), (entity, "user"), (user, "entity")]
            )
            await store.put_rule(room.id, subject, kind, flags(), 0, True, T0)
        if rng.random() < 0.05:
            await store.delete_room(room.id, T0)
        room_ids.append(room.id)

    accesses = {room_id: await store.room_access(room_id) for room_id in room_ids}
    checked = 0
    for level in (0, 9, 10, 49, 50, 79, 80, 100):
        principal = Principal(user=user, entity=entity, level=level, exp=0, claims={})
        expected = [
            room_id
            for room_id, found in accesses.items()
            if evaluate(
                principal,
                None if found is None else found.room,
                () if found is None else found.rules,
            ).read
        ]
        assert await visible_ids(store, user, entity, level) == expected, f"level {level}"
        checked += len(expected)
    assert 0 < checked < 8 * len(room_ids)  # the seed yields both visible and hidden rooms


# -- lifecycle ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_ping_is_true_when_open_and_false_after_close(store_target: tuple[str, str]) -> None:
    opened = make_store(*store_target)
    await opened.open()
    assert await opened.ping() is True
    await opened.close()
    assert await opened.ping() is False


@pytest.mark.asyncio
async def test_calls_on_a_store_that_is_not_open_raise_store_unavailable(
    store_target: tuple[str, str],
) -> None:
    closed = make_store(*store_target)
    with pytest.raises(StoreUnavailable, match="not open"):
        await closed.room_access(1)


@pytest.mark.asyncio
async def test_open_fails_with_store_unavailable_naming_an_unreachable_postgres() -> None:
    store = PostgresStore("postgresql://postgres:s3cret@127.0.0.1:1/nowhere", connect_timeout=2)
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1/nowhere") as raised:
        await store.open()
    assert "s3cret" not in str(raised.value)


@pytest.mark.asyncio
async def test_open_fails_with_store_unavailable_for_an_unopenable_sqlite_path(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "missing-dir" / "x.db"))
    with pytest.raises(StoreUnavailable, match="missing-dir"):
        await store.open()


@pytest.mark.asyncio
async def test_sqlite_memory_database_works() -> None:
    store = SqliteStore(":memory:")
    await store.open()
    try:
        room = await make_room(store)
        stored, _ = await store.append_message(message(room.id))
        assert stored.seq == 1
    finally:
        await store.close()


# -- migrations ---------------------------------------------------------------------------------
async def pg_migration_rows(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [(int(r["version"]), str(r["name"])) for r in rows]


def sqlite_migration_rows(path: str) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(int(v), str(n)) for v, n in rows]


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """An empty database of the given kind, for migration tests."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "fresh.db")
    return "postgres", str(request.getfixturevalue("fresh_pg_url"))


async def migration_rows(kind: str, target: str) -> list[tuple[int, str]]:
    if kind == "sqlite":
        return sqlite_migration_rows(target)
    return await pg_migration_rows(target)


def expected_versions(kind: str) -> list[int]:
    return SQLITE_VERSIONS if kind == "sqlite" else PG_VERSIONS


@pytest.mark.asyncio
async def test_opening_a_database_twice_applies_each_migration_once_and_keeps_data(
    fresh_backend: tuple[str, str],
) -> None:
    kind, target = fresh_backend
    first = make_store(kind, target)
    await first.open()
    room = await make_room(first)
    await first.close()

    second = make_store(kind, target)
    await second.open()
    try:
        await second.open()  # re-opening an open store is a no-op
        assert await second.room_access(room.id) is not None
    finally:
        await second.close()
    assert [v for v, _ in await migration_rows(kind, target)] == expected_versions(kind)


@pytest.mark.asyncio
async def test_stores_opening_a_fresh_database_together_both_succeed_and_migrate_once(
    fresh_backend: tuple[str, str],
) -> None:
    kind, target = fresh_backend
    stores = [make_store(kind, target) for _ in range(3)]

    await asyncio.gather(*(s.open() for s in stores))
    try:
        rooms = [await make_room(s) for s in stores]
        assert len({r.id for r in rooms}) == 3
    finally:
        for s in stores:
            await s.close()
    assert [v for v, _ in await migration_rows(kind, target)] == expected_versions(kind)


def test_both_schema_files_declare_the_same_versions() -> None:
    pg = [(m.version, m.name) for m in load_migrations(postgres_schema_path())]
    lite = [(m.version, m.name) for m in load_migrations(sqlite_schema_path())]
    assert pg == lite
    assert pg[0] == (1, "initial")


def test_schema_sql_is_found_at_the_repository_root_in_a_checkout() -> None:
    assert postgres_schema_path() == Path(__file__).resolve().parents[2] / "schema.sql"


def test_parse_migrations_splits_on_markers_and_ignores_a_comment_header() -> None:
    text = "-- header\n\n-- migration: 1 one\nCREATE TABLE a (x int);\n-- migration: 2 two\nB;\n"
    assert parse_migrations(text) == [
        (1, "one", "CREATE TABLE a (x int);\n"),
        (2, "two", "B;\n"),
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("CREATE TABLE a (x int);\n-- migration: 1 one\nB;\n", "before the first"),
        ("-- migration: 2 two\nA;\n-- migration: 1 one\nB;\n", "must increase"),
        ("-- migration: 1 one\nA;\n-- migration: 1 again\nB;\n", "must increase"),
        ("-- migration: 1 one\n-- only a comment\n", "empty"),
        ("-- nothing here\n", "no '-- migration"),
    ],
)
def test_parse_migrations_rejects_malformed_files(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_migrations(text)


# -- factory ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("sqlite:///data/chat.db", SqliteStore, "data/chat.db"),
        ("sqlite:////var/lib/chat.db", SqliteStore, "/var/lib/chat.db"),
        ("sqlite:///:memory:", SqliteStore, ":memory:"),
        ("postgresql://u@db:5432/chat", PostgresStore, "postgresql://u@db:5432/chat"),
        ("postgres://u@db/chat", PostgresStore, "postgres://u@db/chat"),
    ],
)
def test_store_from_url_maps_schemes_to_backends(url: str, kind: type, target: str) -> None:
    store = store_from_url(url, pg_pool_size=3)
    assert isinstance(store, kind)
    if isinstance(store, SqliteStore):
        assert store._path == target
    else:
        assert isinstance(store, PostgresStore)
        assert (store._url, store._pool_size) == (target, 3)


def test_store_from_url_gives_postgresql_a_list_cache_of_the_bytes_asked_and_none_for_0() -> None:
    store = store_from_url("postgresql://u@db/chat", list_cache_bytes=5 << 20)
    assert isinstance(store, PostgresStore) and store._list_cache is not None
    assert store._list_cache._max_bytes == 5 << 20
    bare = store_from_url("postgresql://u@db/chat", list_cache_bytes=0)
    assert isinstance(bare, PostgresStore) and bare._list_cache is None


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://relative.db", "sqlite:///"])
def test_store_from_url_rejects_unsupported_urls(url: str) -> None:
    with pytest.raises(ValueError):
        store_from_url(url)


# -- PostgreSQL adversity -----------------------------------------------------------------------
TERMINATE_OTHERS = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@pytest.mark.asyncio
async def test_postgres_store_recovers_after_its_connections_are_terminated(
    fresh_pg_url: str,
) -> None:
    store = PostgresStore(fresh_pg_url, pool_size=4)
    await store.open()
    try:
        room = await make_room(store)
        await store.append_message(message(room.id, "before"))

        # The pool cannot notice the kill before the next call (see the helper).
        assert terminate_backends_blocking(fresh_pg_url) >= 1

        with suppress(StoreUnavailable):  # either outcome is fine for the first call
            await store.append_message(message(room.id, "during"))
        after, created = await store.append_message(message(room.id, "after"))
        assert created is True
        assert await store.ping() is True
        seqs = [m.seq for m in await store.history(HistoryQuery(room_id=room.id, limit=10))]
        assert seqs == list(range(1, after.seq + 1))
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_postgres_read_right_after_connections_are_terminated_succeeds(
    fresh_pg_url: str,
) -> None:
    store = PostgresStore(fresh_pg_url, pool_size=4)
    await store.open()
    try:
        room = await make_room(store)
        # Blocks this event loop on purpose: the pool cannot notice the kill before the read,
        # so the read's first attempt deterministically meets the dead connection.
        assert terminate_backends_blocking(fresh_pg_url) >= 1

        # Reads are retried once on a stale pooled connection, so this one never fails.
        access = await store.room_access(room.id)
        assert access is not None and access.room.id == room.id
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_postgres_call_whose_connection_dies_mid_query_raises_store_unavailable(
    fresh_pg_url: str,
) -> None:
    store = PostgresStore(fresh_pg_url, pool_size=2)
    await store.open()
    locker = await asyncpg.connect(fresh_pg_url)
    try:
        room = await make_room(store)
        await store.append_message(message(room.id, "one"))
        # Hold the room row so the next append waits inside PostgreSQL, then kill its backend.
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", room.id)
            pending = asyncio.create_task(store.append_message(message(room.id, "lost")))
            await wait_for_lock_waiter(locker)
            await locker.fetchval(TERMINATE_OTHERS)
            with pytest.raises(StoreUnavailable):
                await pending

        recovered, _ = await store.append_message(message(room.id, "two"))
        assert recovered.seq == 2  # the killed append had no effect
    finally:
        await locker.close()
        await store.close()


@pytest.mark.asyncio
async def test_postgres_call_past_command_timeout_raises_store_unavailable_then_recovers(
    fresh_pg_url: str,
) -> None:
    store = PostgresStore(fresh_pg_url, pool_size=2, command_timeout=0.5)
    await store.open()
    locker = await asyncpg.connect(fresh_pg_url)
    try:
        room = await make_room(store)
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", room.id)
            with pytest.raises(StoreUnavailable):
                await store.append_message(message(room.id, "stuck"))

        stored, _ = await store.append_message(message(room.id, "free"))
        assert stored.seq == 1  # the timed-out append was cancelled and left no gap
    finally:
        await locker.close()
        await store.close()


@pytest.mark.asyncio
async def test_postgres_duplicate_client_ids_racing_behind_the_room_lock_store_one_message(
    fresh_pg_url: str,
) -> None:
    store = PostgresStore(fresh_pg_url, pool_size=6)
    await store.open()
    locker = await asyncpg.connect(fresh_pg_url)
    try:
        room = await make_room(store)
        # All five sends see "no such client_id yet" and then queue on the room row; the first
        # one through inserts, the others collide on the unique index and must return it.
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", room.id)
            sends = [
                asyncio.create_task(store.append_message(message(room.id, client_id="same")))
                for _ in range(5)
            ]
            await wait_for_lock_waiter(locker, count=5)
        results = await asyncio.gather(*sends)

        assert sum(created for _, created in results) == 1
        assert len({msg.id for msg, _ in results}) == 1
        following, _ = await store.append_message(message(room.id))
        assert following.seq == 2
    finally:
        await locker.close()
        await store.close()


# -- SQLite adversity ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_sqlite_write_locked_beyond_busy_timeout_raises_store_unavailable_then_recovers(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "locked.db")
    store = SqliteStore(path, busy_timeout_ms=100)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        room = await make_room(store)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.append_message(message(room.id, "blocked"))
        other.execute("ROLLBACK")

        stored, _ = await store.append_message(message(room.id, "free"))
        assert stored.seq == 1
    finally:
        other.close()
        await store.close()


def terminate_backends_blocking(url: str) -> int:
    """Terminate the database's other backends from another thread, waiting until they exit."""
    killed: list[int] = []

    async def kill() -> None:
        conn = await asyncpg.connect(url)
        try:
            killed.append(
                await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(kill(),))
    thread.start()
    thread.join()
    return killed[0]


async def wait_for_lock_waiter(conn: Any, deadline: float = 5.0, count: int = 1) -> None:
    """Wait until ``count`` other backends of this database are blocked on a lock."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end:
        # pg_stat_activity is frozen for the rest of a transaction unless cleared.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no backend started waiting on the room lock")


@pytest.mark.asyncio
async def test_room_heads_reports_last_seq_of_existing_rooms_in_one_call(store: Store) -> None:
    busy, quiet = await make_room(store), await make_room(store)
    for i in range(3):
        await store.append_message(message(busy.id, f"m{i}"))
    heads = await store.room_heads([busy.id, quiet.id, 987_654_321])
    assert heads == {busy.id: 3, quiet.id: 0}
    assert await store.room_heads([]) == {}
