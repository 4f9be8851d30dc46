"""Seeding a room with many stored messages for the history scenario, through the server's own
schema, without going through the server.

Sending 1 000 000 messages over the protocol would take minutes and measure the write path, not
history reads. So the harness writes the rows directly, the way the server itself stores them:

1. ``python -m nanomsg migrate`` has created the schema (``ServerSet.migrate``; for a server
   you started yourself, run it first);
2. the room is created through the HTTP side-port like any other;
3. rows go into ``messages`` (room_id, seq, emitter, entity, content, created_at, ordinal)
   with seqs ``last_seq+1 .. last_seq+N`` and message ordinals following the room's
   ``message_count``: PostgreSQL with ``COPY`` (``copy_records_to_table``), SQLite
   with ``executemany`` in one ``BEGIN IMMEDIATE`` transaction; timestamps in each backend's
   own representation (``timestamptz``; integer microseconds since the epoch for SQLite);
4. in the same transaction ``rooms.last_seq`` is set to the new head (and
   ``rooms.message_count`` to the new count, and the room row's copy of its latest message
   to the last one seeded), so the server hands out the following seq to the next sender,
   ``select_room`` with ``since`` sees the messages and the conversation list shows the last.

The server keeps no cached copy of ``last_seq`` for a room nobody has selected, so this is safe
while it runs, as long as nobody sends to the room during the seeding.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from benchmarks.tokens import entity_uuid, user_uuid
from nanomsg.store.common import LATEST_FIELDS, OWN_COUNT_UPSERT

# The room row's copy of its latest message, from the seeded message ``m`` (schema.sql
# migration 7; seeded messages are never deleted, so their text is copied).
LATEST_COPY = ", ".join(f"latest_{field} = m.{field}" for field in LATEST_FIELDS)
SEED_CONTENT = "seeded history message number {seq} with some ordinary chat text padding"


def _rows(
    room_id: int, first: int, count: int, nonce: int
) -> Iterator[tuple[int, int, str, str, str]]:
    emitter = user_uuid(nonce, 0)
    entity = entity_uuid(nonce, 0)
    for seq in range(first, first + count):
        yield room_id, seq, emitter, entity, SEED_CONTENT.format(seq=seq)


async def seed_postgres(url: str, room_id: int, count: int, nonce: int) -> int:
    """COPY ``count`` messages into ``room_id``; returns the room's new last seq."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            found = await conn.fetchrow(
                "SELECT last_seq, message_count FROM rooms WHERE id = $1 FOR UPDATE", room_id
            )
            if found is None:
                raise RuntimeError(f"room {room_id} not found in {url}")
            head, counted = int(found[0]), int(found[1])
            base = datetime.now(UTC) - timedelta(milliseconds=count)
            records = (
                (r, s, e, n, c, base + timedelta(milliseconds=i), counted + i + 1)
                for i, (r, s, e, n, c) in enumerate(_rows(room_id, head + 1, count, nonce))
            )
            await conn.copy_records_to_table(
                "messages",
                records=records,
                columns=[
                    "room_id",
                    "seq",
                    "emitter",
                    "entity",
                    "content",
                    "created_at",
                    "ordinal",
                ],
            )
            new_head = head + count
            await conn.execute(
                "UPDATE rooms r SET last_seq = $2, message_count = message_count + $3,"
                f" {LATEST_COPY} FROM messages m WHERE r.id = $1 AND m.room_id = $1"
                " AND m.seq = $2 AND m.kind = 'message'",
                room_id,
                new_head,
                count,
            )
            await conn.execute(
                OWN_COUNT_UPSERT.format(rows="VALUES ($1::bigint, $2, 0, 0, $3::bigint)"),
                room_id,
                user_uuid(nonce, 0),
                count,
            )
        await conn.execute("ANALYZE messages")
    finally:
        await conn.close()
    return new_head


def seed_sqlite(path: str, room_id: int, count: int, nonce: int, batch: int = 50_000) -> int:
    """executemany ``count`` messages into ``room_id``; returns the room's new last seq."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 60000")
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT last_seq, message_count FROM rooms WHERE id = ?", (room_id,)
            ).fetchone()
            if row is None:
                raise RuntimeError(f"room {room_id} not found in {path}")
            head, counted = int(row[0]), int(row[1])
            base_us = time.time_ns() // 1000 - count * 1000
            rows = _rows(room_id, head + 1, count, nonce)
            sql = (
                "INSERT INTO messages (room_id, seq, emitter, entity, content, created_at,"
                " ordinal) VALUES (?, ?, ?, ?, ?, ?, ?)"
            )
            done = 0
            while done < count:
                chunk = []
                for _ in range(min(batch, count - done)):
                    r, s, e, n, c = next(rows)
                    ordinal = counted + s - head
                    chunk.append((r, s, e, n, c, base_us + (s - head) * 1000, ordinal))
                db.executemany(sql, chunk)
                done += len(chunk)
            db.execute(
                "UPDATE rooms AS r SET last_seq = ?, message_count = message_count + ?,"
                f" {LATEST_COPY} FROM messages m WHERE r.id = ? AND m.room_id = r.id"
                " AND m.seq = ? AND m.kind = 'message'",
                (head + count, count, room_id, head + count),
            )
            # the own count: schema_sqlite.sql's trigger on messages
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.close()
    return head + count


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    return url[len("sqlite:///") :]


async def count_messages(url: str, room_ids: list[int]) -> int:
    """Rows stored in ``room_ids`` (used to check every ack has a committed row)."""
    if url.startswith("sqlite://"):
        db = sqlite3.connect(sqlite_path(url), timeout=30)
        try:
            marks = ",".join("?" * len(room_ids))
            row = db.execute(
                f"SELECT count(*) FROM messages WHERE room_id IN ({marks})", room_ids
            ).fetchone()
            return int(row[0])
        finally:
            db.close()
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM messages WHERE room_id = ANY($1::bigint[])", room_ids
            )
        )
    finally:
        await conn.close()
