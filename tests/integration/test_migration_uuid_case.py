"""Migration 2 (lower-case UUIDs) on both backends, from a database left at version 1 with
mixed-case rows: UUIDs end in lower case, colliding rules merge into the one that grants least
(an accepted ban wins), and a client_id two spellings of one emitter shared stays on the first
message.
"""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from nanomsg.models import Principal, Rule
from nanomsg.permissions import evaluate
from nanomsg.store.base import HistoryQuery, NewMessage
from nanomsg.store.migrate import load_migrations, postgres_schema_path, sqlite_schema_path
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import SqliteStore, split_statements, to_micros

pytestmark = pytest.mark.asyncio

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def later(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


OWNER = str(uuid.uuid4())
BANNED = str(uuid.uuid4())  # rw in upper case, an accepted ban in lower case
ADMIN_TOO = str(uuid.uuid4())  # rwa in upper case, r in lower case
PENDING = str(uuid.uuid4())  # a pending rw in upper case, an accepted rw in lower case
ONLY_UPPER = str(uuid.uuid4())  # one rule, in upper case
ENTITY = str(uuid.uuid4())  # entity rules rw at levels 50 (lower) and 100 (upper)

# (kind, subject, permissions, level, accepted, updated_at)
RULES: list[tuple[str, str, str, int, bool, datetime]] = [
    ("user", OWNER.upper(), "rwa", 100, True, later(0)),
    ("user", BANNED.upper(), "rw", 0, True, later(5)),
    ("user", BANNED, "b", 0, True, later(1)),
    ("user", ADMIN_TOO.upper(), "rwa", 0, True, later(1)),
    ("user", ADMIN_TOO, "r", 0, True, later(2)),
    ("user", PENDING.upper(), "rw", 0, False, later(1)),
    ("user", PENDING, "rw", 0, True, later(2)),
    ("user", ONLY_UPPER.upper(), "rw", 0, True, later(1)),
    ("entity", ENTITY.upper(), "rw", 100, True, later(1)),
    ("entity", ENTITY, "rw", 50, True, later(2)),
]
# (seq, emitter, client_id)
MESSAGES = [(1, OWNER.upper(), "c-1"), (2, OWNER, "c-1"), (3, OWNER.upper(), "c-2")]


def _rows(stamp: Any) -> tuple[list[Any], list[Any], list[Any]]:
    room = [1, str(uuid.uuid4()), "old", 100, "group", OWNER.upper(), 100, 3, stamp(T0), stamp(T0)]
    rules = [
        [1, kind, subject, flags, level, accepted, stamp(T0), stamp(updated)]
        for kind, subject, flags, level, accepted, updated in RULES
    ]
    messages = [
        [1, seq, emitter, ENTITY.upper(), f"m{seq}", client_id, stamp(later(seq))]
        for seq, emitter, client_id in MESSAGES
    ]
    return [room], rules, messages


ROOM_SQL = (
    "INSERT INTO rooms (id, uuid, name, level_admin, type, entity_owner, max_entity_rules,"
    " last_seq, created_at, updated_at) VALUES ({})"
)
RULE_SQL = (
    "INSERT INTO room_rules (room_id, kind, subject, permissions, level, accepted, created_at,"
    " updated_at) VALUES ({})"
)
MESSAGE_SQL = (
    "INSERT INTO messages (room_id, seq, emitter, entity, content, client_id, created_at)"
    " VALUES ({})"
)


def seed_sqlite(path: str) -> None:
    """A SQLite file at schema version 1 holding the mixed-case rows."""
    first = load_migrations(sqlite_schema_path())[0]
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        for statement in split_statements(first.sql):
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (first.version, first.name))
        rooms, rules, messages = _rows(to_micros)
        for sql, rows, width in ((ROOM_SQL, rooms, 10), (RULE_SQL, rules, 8)):
            db.executemany(sql.format(", ".join("?" * width)), rows)
        db.executemany(MESSAGE_SQL.format(", ".join("?" * 7)), messages)


async def seed_postgres(url: str) -> None:
    """A PostgreSQL database at schema version 1 holding the mixed-case rows."""
    first = load_migrations(postgres_schema_path())[0]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)"
        )
        await conn.execute(first.sql)
        await conn.execute(
            "INSERT INTO schema_migrations VALUES ($1, $2, now())", first.version, first.name
        )
        rooms, rules, messages = _rows(lambda stamp: stamp)
        for sql, rows, width in (
            (ROOM_SQL, rooms, 10),
            (RULE_SQL, rules, 8),
            (MESSAGE_SQL, messages, 7),
        ):
            marks = ", ".join(f"${n}" for n in range(1, width + 1))
            await conn.executemany(sql.format(marks), rows)
        await conn.execute("SELECT setval('rooms_id_seq', 1)")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def version_one(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, target) of an empty database, seeded by the test."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "v1.db")
    return "postgres", str(request.getfixturevalue("fresh_pg_url"))


def principal(user: str, entity: str, level: int) -> Principal:
    return Principal(user=user, entity=entity, level=level, exp=0, claims={})


def by_subject(rules: tuple[Rule, ...]) -> dict[tuple[str, str], tuple[str, int, bool]]:
    return {(r.kind, r.subject): (r.permissions, r.level, r.accepted) for r in rules}


async def test_migration_lower_cases_uuids_and_merges_colliding_rules_keeping_the_ban(
    version_one: tuple[str, str],
) -> None:
    kind, target = version_one
    if kind == "sqlite":
        seed_sqlite(target)
        store: SqliteStore | PostgresStore = SqliteStore(target)
    else:
        await seed_postgres(target)
        store = PostgresStore(target)
    await store.open()
    try:
        found = await store.room_access(1)
        assert found is not None
        assert found.room.entity_owner == OWNER
        assert by_subject(found.rules) == {
            ("user", OWNER): ("rwa", 100, True),
            ("user", BANNED): ("b", 0, True),  # an accepted ban wins
            ("user", ADMIN_TOO): ("r", 0, True),  # fewer flags, no admin
            ("user", PENDING): ("rw", 0, False),  # grants nothing until accepted
            ("user", ONLY_UPPER): ("rw", 0, True),
            ("entity", ENTITY): ("rw", 100, True),  # the higher level admits fewer members
        }
        banned = evaluate(principal(BANNED, str(uuid.uuid4()), 0), found.room, found.rules)
        assert not banned.read
        owner = evaluate(principal(OWNER, ENTITY, 100), found.room, found.rules)
        assert owner.admin  # an owner-entity admin, through the lower-cased entity_owner

        history = await store.history(HistoryQuery(room_id=1, limit=10, newest=False))
        assert [(m.seq, m.emitter, m.entity, m.client_id) for m in history] == [
            (1, OWNER, ENTITY, "c-1"),
            (2, OWNER, ENTITY, None),
            (3, OWNER, ENTITY, "c-2"),
        ]
        resent, created = await store.append_message(
            NewMessage(1, OWNER, ENTITY, "m1", "c-1", later(9))
        )
        assert (resent.seq, created) == (1, False)
    finally:
        await store.close()
