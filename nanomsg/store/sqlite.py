"""SQLite backend: one aiosqlite connection, WAL, for single-node and development deployments.

SQLite serialises writers anyway, so one connection guarded by an asyncio lock is enough; the
lock also keeps one coroutine's open transaction invisible to the others sharing the
connection. Timestamps are stored as integer microseconds since the epoch (see
schema_sqlite.sql) and returned as aware UTC datetimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import aiosqlite

from nanomsg.clock import iso_utc
from nanomsg.models import Conversation, Message, ReadMark, Room, RoomAccess, RoomState, Rule
from nanomsg.store import common
from nanomsg.store.base import (
    EventOutcome,
    HistoryQuery,
    MessageChange,
    NewMessage,
    NewRoom,
    RoomChanges,
    RoomEvent,
    RoomGone,
    Settled,
    StoreUnavailable,
    TooManyRules,
)
from nanomsg.store.migrate import load_migrations, sqlite_schema_path

# The ids of the live rooms a caller may read (``rooms_visible_to`` explains the two
# branches), with named parameters :user, :entity, :level.
_VISIBLE_IDS = (
    "SELECT id FROM rooms"
    " WHERE entity_owner = :entity AND level_admin <= :level AND deleted_at IS NULL"
    " AND dm_key IS NULL"
    " UNION SELECT room_id FROM room_rules"
    " WHERE subject IN (:user, :entity) AND accepted = 1"
    " AND ((kind = 'user' AND subject = :user)"
    "  OR (kind = 'entity' AND subject = :entity AND level <= :level))"
    " GROUP BY room_id"
    " HAVING max(instr(permissions, 'r') > 0 OR instr(permissions, 'a') > 0) = 1"
    " AND max(instr(permissions, 'b') > 0) = 0"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Bound parameters per statement: SQLite's default SQLITE_MAX_VARIABLE_NUMBER since 3.32
# (RETURNING, used throughout, already needs 3.35). Batches are split to stay within it.
_MAX_VARIABLES = 32766

_T = TypeVar("_T")


def to_micros(dt: datetime) -> int:
    """Microseconds since the epoch for an aware datetime.

    Integer arithmetic on the difference, not ``//`` by a timedelta: a third cheaper, and it
    runs for several stamps of every stored event."""
    if dt.tzinfo is not UTC:
        dt = common.utc(dt)  # rejects naive datetimes
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    """The aware UTC datetime for stored microseconds (exact inverse of ``to_micros``)."""
    return _EPOCH + timedelta(microseconds=value)


def message_from_row(row: Sequence[Any], start: int = 0) -> Message:
    """The Message in a row whose columns from ``start`` are ``common.MSG_COLS``.

    ``common.message_from_row`` for SQLite, whose INTEGER and TEXT columns already come back
    as the fields hold them: only the stamps and ``system`` are converted (measured: 2.5 us a
    row against 3.3, for every target of an edit or delete).
    """
    created, edited, deleted = row[start + 6], row[start + 11], row[start + 12]
    return Message(
        row[start],
        row[start + 1],
        row[start + 2],
        row[start + 3],
        row[start + 4],
        row[start + 5],
        from_micros(created),
        row[start + 7],
        row[start + 8],
        row[start + 9],
        bool(row[start + 10]),
        None if edited is None else from_micros(edited),
        None if deleted is None else from_micros(deleted),
        row[start + 13],
    )


def micros_text(value: int) -> str:
    """Stored microseconds as a ``Conversation`` holds a stamp: as the wire writes it
    (``iso_utc``)."""
    return iso_utc(from_micros(value))


def _placeholder(n: int) -> str:
    """SQLite's positional placeholder, the same for every parameter."""
    return "?"


def _unavailable(exc: BaseException) -> bool:
    """Errors meaning "the database file cannot be used now" rather than a bug in a query."""
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.DataError):
        return False
    return isinstance(exc, sqlite3.DatabaseError | OSError)


def split_statements(sql: str) -> list[str]:
    """Split a migration into single statements (sqlite3 runs one per call).

    ``executescript`` cannot be used because it commits the open transaction first, which
    would let two processes migrate the same file at once.
    """
    statements: list[str] = []
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if any(ln.strip() and not ln.strip().startswith("--") for ln in pending.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return statements


class SqliteStore:
    """The Store protocol on one SQLite file (or ``:memory:``)."""

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the file (WAL, foreign keys, busy timeout) and apply pending migrations."""
        if self._db is not None:
            return
        db = aiosqlite.connect(self._path, isolation_level=None)
        try:
            await db
        except Exception as exc:
            await _worker_finished(db)
            if _unavailable(exc):
                raise StoreUnavailable(
                    f"cannot open SQLite database {self._path!r}: {exc}"
                ) from exc
            raise
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            await db.execute("PRAGMA foreign_keys = ON")
            await self._enable_wal(db)
            await self._migrate(db)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, Exception) and _unavailable(exc):
                raise StoreUnavailable(
                    f"cannot prepare SQLite database {self._path!r}: {exc}"
                ) from exc
            raise
        self._db = db

    async def _enable_wal(self, db: aiosqlite.Connection) -> None:
        """Switch to WAL (readers never block the writer), retrying within busy_timeout.

        Changing the journal mode needs an exclusive lock and SQLite reports "database is
        locked" at once, without calling the busy handler, while another connection holds the
        file (e.g. another process opening it at the same moment), so retry here.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout_ms / 1000
        while True:
            try:
                await db.execute_fetchall("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.01)

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Apply pending versions in one BEGIN IMMEDIATE transaction.

        BEGIN IMMEDIATE takes the write lock before reading schema_migrations, so a second
        process opening the same file waits (busy_timeout) and then sees the versions applied.
        """
        migrations = load_migrations(sqlite_schema_path())
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            rows = await db.execute_fetchall("SELECT version FROM schema_migrations")
            applied = {int(row[0]) for row in rows}
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in split_statements(migration.sql):
                    await db.execute(statement)
                # Metadata only, so the database's own clock is fine here.
                await db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at)"
                    " VALUES (?, ?, CAST(strftime('%s', 'now') AS INTEGER) * 1000000)",
                    (migration.version, migration.name),
                )
            await db.execute("COMMIT")
        except BaseException:
            await _rollback_quietly(db)
            raise

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    async def ping(self) -> bool:
        """True when the connection answers ``SELECT 1``."""
        try:
            async with self._read() as db:
                await db.execute_fetchall("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable(f"SQLite store {self._path!r} is not open")
        return self._db

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection for single-statement reads (autocommit)."""
        db = self._require()
        async with self._lock:
            try:
                yield db
            except Exception as exc:
                if _unavailable(exc):
                    raise StoreUnavailable(f"SQLite error on {self._path!r}: {exc}") from exc
                raise

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A BEGIN IMMEDIATE transaction, committed on success and rolled back on any error."""
        async with self._read() as db:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException:
                await _rollback_quietly(db)
                raise

    # -- rooms -------------------------------------------------------------------------------
    async def create_room(self, new: NewRoom) -> Room:
        """Insert the room and its creator rules in one transaction."""
        common.check_room_type(new.type)
        created = common.utc(new.now)
        now = to_micros(created)
        room_uuid = str(uuid.uuid4())
        async with self._write() as db:
            rows = await db.execute_fetchall(
                "INSERT INTO rooms (uuid, name, level_admin, type, entity_owner,"
                " max_entity_rules, last_seq, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?) RETURNING id",
                (
                    room_uuid,
                    new.name,
                    new.level_admin,
                    new.type,
                    new.entity_owner,
                    new.max_entity_rules,
                    now,
                    now,
                ),
            )
            room_id = int(next(iter(rows))[0])
            await db.executemany(
                "INSERT INTO room_rules (room_id, kind, subject, permissions, level, accepted,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(room_id, *rule, 1, now, now) for rule in common.creator_rules(new)],
            )
        return common.created_room(new, room_id, room_uuid, created)

    async def update_room(self, room_id: int, changes: RoomChanges, now: datetime) -> Room:
        """Count the rules, check the new limit and update, in one write transaction."""
        stamp = to_micros(now)
        async with self._write() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT (SELECT count(*) FROM room_rules WHERE room_id = r.id)"
                    " FROM rooms r WHERE r.id = ? AND r.deleted_at IS NULL",
                    (room_id,),
                )
            )
            if not rows:
                raise RoomGone(room_id)
            common.check_changes(room_id, changes, int(rows[0][0]))
            await db.execute(
                "UPDATE rooms SET name = coalesce(?, name),"
                " level_admin = coalesce(?, level_admin),"
                " max_entity_rules = coalesce(?, max_entity_rules), updated_at = ? WHERE id = ?",
                (changes.name, changes.level_admin, changes.max_entity_rules, stamp, room_id),
            )
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {common.ROOM_COLS} FROM rooms r WHERE r.id = ?", (room_id,)
                )
            )
        return common.room_from_row(rows[0], from_micros)

    async def room_access(self, room_id: int) -> RoomAccess | None:
        """The live room and all its rules in one LEFT JOIN query."""
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {common.ROOM_COLS}, {common.RULE_COLS} FROM rooms r"
                    " LEFT JOIN room_rules rr ON rr.room_id = r.id"
                    " WHERE r.id = ? AND r.deleted_at IS NULL ORDER BY rr.kind, rr.subject",
                    (room_id,),
                )
            )
        return common.room_access_from_rows(rows, from_micros)

    async def room_heads(self, room_ids: Sequence[int]) -> dict[int, int]:
        """Each existing room's last_seq, in one statement."""
        if not room_ids:
            return {}
        ids = list(room_ids)
        heads: dict[int, int] = {}
        for start in range(0, len(ids), 500):  # stay far below SQLite's bound on parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with self._read() as db:
                rows = await db.execute_fetchall(
                    f"SELECT id, last_seq FROM rooms WHERE id IN ({marks})", chunk
                )
            heads.update((int(row[0]), int(row[1])) for row in rows)
        return heads

    async def delete_room(self, room_id: int, now: datetime) -> bool:
        """Soft-delete: set deleted_at; messages and rules stay."""
        stamp = to_micros(now)
        async with (
            self._write() as db,
            db.execute(
                "UPDATE rooms SET deleted_at = ?, updated_at = ?"
                " WHERE id = ? AND deleted_at IS NULL",
                (stamp, stamp, room_id),
            ) as cursor,
        ):
            return cursor.rowcount == 1

    async def rooms_visible_to(
        self, user: str, entity: str, level: int, limit: int, offset: int
    ) -> list[Room]:
        """Live rooms the caller may read (``permissions.evaluate``), by id, paged in SQL.

        Candidates come from two indexed lookups: rooms where the caller is an owner-entity
        admin (no rule can ban them), and rooms whose applying accepted rules, grouped per
        room, hold ``r`` or ``a`` and no ``b``.
        """
        common.check_page(limit, offset)
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"SELECT {common.ROOM_COLS} FROM rooms r WHERE r.deleted_at IS NULL"
                f" AND r.id IN ({_VISIBLE_IDS}) ORDER BY r.id LIMIT :limit OFFSET :offset",
                {
                    "user": user,
                    "entity": entity,
                    "level": level,
                    "limit": limit,
                    "offset": offset,
                },
            )
        return [common.room_from_row(row, from_micros) for row in rows]

    # -- rules -------------------------------------------------------------------------------
    async def rules_of(
        self, user: str, entity: str, level: int, accepted: bool | None, limit: int, offset: int
    ) -> list[tuple[Rule, Room]]:
        """The caller's user rules and entity rules at or below ``level`` in live rooms."""
        common.check_page(limit, offset)
        sql = (
            f"SELECT {common.RULE_COLS}, {common.ROOM_COLS} FROM room_rules rr"
            " JOIN rooms r ON r.id = rr.room_id WHERE r.deleted_at IS NULL"
            " AND ((rr.kind = 'user' AND rr.subject = ?)"
            "  OR (rr.kind = 'entity' AND rr.subject = ? AND rr.level <= ?))"
        )
        params: list[Any] = [user, entity, level]
        if accepted is not None:
            sql += " AND rr.accepted = ?"
            params.append(int(accepted))
        sql += " ORDER BY rr.room_id, rr.kind, rr.subject LIMIT ? OFFSET ?"
        params += [limit, offset]
        async with self._read() as db:
            rows = await db.execute_fetchall(sql, params)
        return [common.rule_and_room_from_row(row, from_micros) for row in rows]

    async def put_rule(
        self,
        room_id: int,
        subject: str,
        kind: str,
        permissions: str,
        level: int,
        accepted: bool,
        now: datetime,
    ) -> tuple[Rule, bool]:
        """Create or update one rule; the limit check and insert share a write transaction."""
        common.check_kind(kind)
        now = common.utc(now)
        stamp = to_micros(now)
        async with self._write() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT r.max_entity_rules,"
                    " (SELECT count(*) FROM room_rules WHERE room_id = r.id),"
                    " (SELECT created_at FROM room_rules"
                    "   WHERE room_id = r.id AND kind = ? AND subject = ?)"
                    " FROM rooms r WHERE r.id = ? AND r.deleted_at IS NULL",
                    (kind, subject, room_id),
                )
            )
            if not rows:
                raise RoomGone(room_id)
            max_rules, count, existing_created = rows[0]
            if existing_created is not None:
                await db.execute(
                    "UPDATE room_rules SET permissions = ?, level = ?, accepted = ?,"
                    " updated_at = ? WHERE room_id = ? AND kind = ? AND subject = ?",
                    (permissions, level, int(accepted), stamp, room_id, kind, subject),
                )
                created_at, created = from_micros(existing_created), False
            else:
                if count >= max_rules:
                    raise TooManyRules(f"room {room_id} already holds {count} of {max_rules} rules")
                await db.execute(
                    "INSERT INTO room_rules (room_id, kind, subject, permissions, level,"
                    " accepted, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (room_id, kind, subject, permissions, level, int(accepted), stamp, stamp),
                )
                created_at, created = now, True
        rule = Rule(
            room_id=room_id,
            subject=subject,
            kind=kind,
            permissions=permissions,
            level=level,
            accepted=accepted,
            created_at=created_at,
            updated_at=now,
        )
        return rule, created

    async def delete_rule(self, room_id: int, subject: str, kind: str | None) -> bool:
        """Delete the subject's rule of ``kind`` (or of every kind)."""
        sql = "DELETE FROM room_rules WHERE room_id = ? AND subject = ?"
        params: list[Any] = [room_id, subject]
        if kind is not None:
            common.check_kind(kind)
            sql += " AND kind = ?"
            params.append(kind)
        async with self._write() as db, db.execute(sql, params) as cursor:
            return cursor.rowcount > 0

    async def set_accepted(
        self, room_id: int, subject: str, kind: str, accepted: bool, now: datetime
    ) -> Rule | None:
        """Flip ``accepted`` on one rule of a live room."""
        common.check_kind(kind)
        async with self._write() as db:
            rows = list(
                await db.execute_fetchall(
                    "UPDATE room_rules SET accepted = ?, updated_at = ?"
                    " WHERE room_id = ? AND kind = ? AND subject = ? AND EXISTS"
                    " (SELECT 1 FROM rooms WHERE id = ? AND deleted_at IS NULL)"
                    " RETURNING room_id, subject, kind, permissions, level, accepted,"
                    " created_at, updated_at",
                    (int(accepted), to_micros(now), room_id, kind, subject, room_id),
                )
            )
        return common.rule_from_row(rows[0], from_micros) if rows else None

    # -- messages ----------------------------------------------------------------------------
    async def append_message(self, new: NewMessage) -> tuple[Message, bool]:
        """Store one message: a batch of one, RoomGone raised."""
        return common.sole_outcome(await self.append_batch([new]))

    async def append_batch(self, batch: Sequence[NewMessage]) -> list[common.Outcome]:
        """Store the batch in one BEGIN IMMEDIATE transaction, in few statements.

        Each aiosqlite call hops to its thread, so the work is one lookup of the client_ids
        already stored, one UPDATE taking every room's seqs, and one INSERT ... RETURNING for
        all the messages (each split only past SQLite's limit on bound parameters).
        """
        stamps = [to_micros(new.now) for new in batch]  # rejects naive timestamps up front
        firsts, sent = common.first_copies(batch)
        if not sent:
            return []
        outcomes: dict[int, common.Outcome] = {}
        async with self._write() as db:
            stored = await _stored_client_ids(db, [batch[i] for i in sent])
            fresh: list[int] = []
            for index in sent:
                new = batch[index]
                key = (new.room_id, new.emitter, new.client_id)
                found = None if new.client_id is None else stored.get(key)
                if found is not None:
                    outcomes[index] = (found, False)
                else:
                    fresh.append(index)
            latest: dict[int, int] = {}  # the newest stamp sent to each room
            for index in fresh:
                room_id = batch[index].room_id
                latest[room_id] = max(latest.get(room_id, stamps[index]), stamps[index])
            counts = Counter(batch[index].room_id for index in fresh)
            bases = await _take_seqs(db, counts, latest)
            planned: list[tuple[int, int, int]] = []  # (batch index, seq, ordinal)
            for index in fresh:
                room_id = batch[index].room_id
                if room_id not in bases:
                    outcomes[index] = RoomGone(room_id)
                    continue
                # Each live room's ranges of seqs and ordinals are handed out in batch order.
                seq, ordinal = bases[room_id]
                bases[room_id] = (seq + 1, ordinal + 1)
                planned.append((index, seq + 1, ordinal + 1))
            ids = await _insert_messages(
                db, [(batch[i], seq, stamps[i], ordinal) for i, seq, ordinal in planned]
            )
            newest: dict[int, int | None] = {}
            for index, seq, _ in planned:  # in batch order: each room's seqs increase
                newest[batch[index].room_id] = seq
            await _copy_latest(db, newest)
        for index, seq, _ in planned:
            new = batch[index]
            message = Message(
                id=ids[new.room_id, seq],
                room_id=new.room_id,
                seq=seq,
                emitter=new.emitter,
                entity=new.entity,
                content=new.content,
                created_at=from_micros(stamps[index]),
                client_id=new.client_id,
                system=new.system,
            )
            outcomes[index] = (message, True)
        return common.with_copies(outcomes, firsts)

    async def history(self, query: HistoryQuery) -> list[Message]:
        """Walk the (room_id, seq) index from the requested end, return oldest first."""
        sql, params = common.history_sql(query, to_micros, _placeholder)
        async with self._read() as db:
            rows = await db.execute_fetchall(sql, params)
        return common.history_messages(list(rows), query, from_micros)

    async def events(self, query: HistoryQuery) -> list[Message]:
        """Every event in the range, by the same index walk as ``history``."""
        sql, params = common.history_sql(query, to_micros, _placeholder, events=True)
        async with self._read() as db:
            rows = await db.execute_fetchall(sql, params)
        return common.history_messages(list(rows), query, from_micros)

    async def edit_message(
        self, room_id: int, seq: int, author: str, content: str, now: datetime
    ) -> tuple[Message, Message]:
        """The edit row and the message's new state: a batch of one change."""
        change = MessageChange(room_id, seq, author, now, content)
        return common.sole_change(await self.append_events([change]))

    async def delete_message(
        self, room_id: int, seq: int, by: str, is_admin: bool, now: datetime, entity: str = ""
    ) -> tuple[Message, Message]:
        """The delete row and the tombstone: a batch of one change."""
        change = MessageChange(room_id, seq, by, now, None, is_admin, entity)
        return common.sole_change(await self.append_events([change]))

    async def append_events(self, batch: Sequence[RoomEvent]) -> list[EventOutcome]:
        """A batch of messages only is ``append_batch``; with changes, one BEGIN IMMEDIATE
        transaction reads what the batch depends on (the rooms' last seqs and message counts,
        the targets, the client_ids already stored), ``common.plan_events`` decides every
        input, and few statements write it: the rooms (last_seq and message_count), the new
        rows (each new message with its ordinal), the targets edited, the targets deleted.

        The write lock is held from the first read, so nothing changes in between."""
        if all(isinstance(event, NewMessage) for event in batch):
            return list(await self.append_batch(cast(Sequence[NewMessage], batch)))
        for event in batch:
            common.utc(event.now)  # rejects naive timestamps up front
        wanted = common.change_targets(batch)
        rooms = sorted({event.room_id for event in batch})
        news = [event for event in batch if isinstance(event, NewMessage)]
        async with self._write() as db:
            heads, targets = await _rooms_and_targets(db, rooms, wanted)
            stored = await _stored_client_ids(db, news)
            plan = common.plan_events(batch, heads, targets, stored)
            if not plan.rooms:
                return plan.finish({})
            for rooms_chunk in _chunks(list(plan.rooms.items()), 4):
                await db.execute(
                    "UPDATE rooms SET last_seq = c.column2, message_count = c.column4,"
                    " last_activity_at = max(coalesce(last_activity_at, c.column3), c.column3)"
                    f" FROM (VALUES {_values(len(rooms_chunk), 4)}) AS c"
                    " WHERE rooms.id = c.column1",
                    [
                        value
                        for room_id, (_, after, latest, count) in rooms_chunk
                        for value in (room_id, after, to_micros(latest), count)
                    ],
                )
            ids: dict[tuple[int, int], int] = {}
            inserts = [
                common.row_values(
                    row, plan.first_contents.get(key), plan.ordinals.get(key), to_micros
                )
                for key, row in plan.rows.items()
            ]
            for rows_chunk in _chunks(inserts, common.INSERT_WIDTH):
                returned = await db.execute_fetchall(
                    f"INSERT INTO messages ({common.INSERT_COLS})"
                    f" VALUES {_values(len(rows_chunk), common.INSERT_WIDTH)}"
                    " RETURNING room_id, seq, id",
                    [value for values in rows_chunk for value in values],
                )
                ids.update(((int(r[0]), int(r[1])), int(r[2])) for r in returned)
            # Edits alone set only the columns an edit changes: naming deleted_at in the SET
            # makes SQLite rewrite the entries of the partial indexes over it for every edited
            # row (measured on the 64-item micro benchmark when messages_own_idx still had
            # deleted_at in its predicate: that UPDATE from 11-14 to 4.4-4.9 us per edit, and
            # the COMMIT writing the pages from 21-25 to 13-14 us). Since schema migration 6
            # only messages_deleted_idx does, which a delete enters and nothing else touches.
            # Merging these UPDATEs into the INSERT (ON CONFLICT (room_id, seq) DO UPDATE,
            # one hop to aiosqlite's thread less) was measured and left out: the upsert cost
            # SQLite 6-7 us more per change than the separate statements, more than the hop
            # saves a batch of 8 or more.
            edits = [
                (m.room_id, m.seq, m.content, _micros_or_none(m.edited_at))
                for m, _ in plan.updates.values()
                if m.deleted_at is None
            ]
            for edits_chunk in _chunks(edits, 4):
                await db.execute(
                    "UPDATE messages SET first_content = coalesce(first_content, content),"
                    " content = c.column3, edited_at = c.column4"
                    f" FROM (VALUES {_values(len(edits_chunk), 4)}) AS c"
                    " WHERE messages.room_id = c.column1 AND messages.seq = c.column2",
                    [value for values in edits_chunk for value in values],
                )
            # A delete of a message the batch did not edit (the usual one) sets the deletion
            # alone: half the parameters and no expression per row (measured: ~1.5 us less
            # per delete, the UPDATE and its COMMIT). One the batch edited first also takes
            # the edit's columns.
            deletes = [
                (m.room_id, m.seq, to_micros(m.deleted_at), m.deleted_by)
                for m, edited in plan.updates.values()
                if m.deleted_at is not None and not edited
            ]
            for deletes_chunk in _chunks(deletes, 4):
                await db.execute(
                    "UPDATE messages SET deleted_at = c.column3, deleted_by = c.column4"
                    f" FROM (VALUES {_values(len(deletes_chunk), 4)}) AS c"
                    " WHERE messages.room_id = c.column1 AND messages.seq = c.column2",
                    [value for values in deletes_chunk for value in values],
                )
            edited_deletes = [
                (
                    m.room_id,
                    m.seq,
                    m.content,
                    _micros_or_none(m.edited_at),
                    _micros_or_none(m.deleted_at),
                    m.deleted_by,
                )
                for m, edited in plan.updates.values()
                if m.deleted_at is not None and edited
            ]
            for edited_chunk in _chunks(edited_deletes, 6):
                await db.execute(
                    "UPDATE messages SET first_content = coalesce(first_content, content),"
                    " content = c.column3, edited_at = c.column4, deleted_at = c.column5,"
                    " deleted_by = c.column6"
                    f" FROM (VALUES {_values(len(edited_chunk), 6)}) AS c"
                    " WHERE messages.room_id = c.column1 AND messages.seq = c.column2",
                    [value for values in edited_chunk for value in values],
                )
            newest = dict.fromkeys(plan.rooms, None)
            for room_id, seq in plan.rows:
                if plan.rows[room_id, seq].kind == "message":
                    newest[room_id] = max(seq, newest[room_id] or 0)
            await _copy_latest(db, newest)
        return plan.finish(ids)

    # -- read marks --------------------------------------------------------------------------
    async def set_read_mark(self, room_id: int, user: str, seq: int, now: datetime) -> int:
        """Upsert the mark to max(held, min(seq, last_seq)) in one write transaction, with
        the ordinal of the latest message at or before it (the conversation list subtracts it
        from the room's message count) and the user's own messages at or before it
        (``common.READ_MARK_MOVED``; a new row counts none: a post makes the row)."""
        common.check_seq(seq)
        stamp = to_micros(now)
        async with self._write() as db:
            rows = list(
                await db.execute_fetchall(
                    "INSERT INTO room_reads (room_id, user_uuid, seq, updated_at, ordinal)"
                    " SELECT c.id, :user, c.seq, :now, coalesce((SELECT m.ordinal FROM messages m"
                    "  WHERE m.room_id = c.id AND m.seq <= c.seq AND m.kind = 'message'"
                    "  ORDER BY m.seq DESC LIMIT 1), 0)"
                    " FROM (SELECT id, min(:seq, last_seq) AS seq FROM rooms"
                    "  WHERE id = :room AND deleted_at IS NULL) c"
                    " WHERE true"  # without it SQLite would read ON CONFLICT as a join constraint
                    " ON CONFLICT (room_id, user_uuid) DO UPDATE"
                    f"{common.READ_MARK_MOVED.format(greatest='max')}"
                    " RETURNING seq",
                    {"user": user, "seq": seq, "now": stamp, "room": room_id},
                )
            )
        if not rows:
            raise RoomGone(room_id)
        return int(rows[0][0])

    async def read_marks(self, room_id: int) -> list[ReadMark]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT room_id, user_uuid, seq, updated_at FROM room_reads"
                " WHERE room_id = ? AND updated_at IS NOT NULL"  # not a row a post made
                " ORDER BY user_uuid",
                (room_id,),
            )
        return [ReadMark(int(r[0]), str(r[1]), int(r[2]), from_micros(int(r[3]))) for r in rows]

    # -- direct messages and the conversation list -------------------------------------------
    async def open_dm(
        self, user: str, entity: str, other: str, level_admin: int, now: datetime
    ) -> tuple[Room, bool]:
        """Find the pair's room by ``dm_key`` or create it, in one write transaction (which
        SQLite serialises, so two callers cannot both create it)."""
        key = common.dm_key(user, other)
        stamp = to_micros(now)
        async with self._write() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {common.ROOM_COLS}, r.dm_pending FROM rooms r WHERE r.dm_key = ?",
                    (key,),
                )
            )
            if rows:
                room = common.room_from_row(rows[0], from_micros)
                if room.deleted_at is not None:
                    raise RoomGone(room.id)
                await db.execute(
                    "UPDATE room_rules SET accepted = 1, updated_at = ?"
                    " WHERE room_id = ? AND kind = 'user' AND subject = ? AND accepted = 0",
                    (stamp, room.id, user),
                )
                await db.execute(
                    "UPDATE rooms SET dm_pending = NULL WHERE id = ? AND dm_pending = ?",
                    (room.id, user),
                )
                return room, False
            room_uuid = str(uuid.uuid4())
            inserted = list(
                await db.execute_fetchall(
                    "INSERT INTO rooms (uuid, name, level_admin, type, entity_owner,"
                    " max_entity_rules, last_seq, created_at, updated_at, dm_key, dm_pending)"
                    " VALUES (?, ?, ?, 'user2user', ?, ?, 0, ?, ?, ?, ?) RETURNING id",
                    (
                        room_uuid,
                        key,
                        level_admin,
                        entity,
                        common.DM_MAX_RULES,
                        stamp,
                        stamp,
                        key,
                        other,
                    ),
                )
            )
            room_id = int(inserted[0][0])
            await db.executemany(
                "INSERT INTO room_rules (room_id, kind, subject, permissions, level, accepted,"
                " created_at, updated_at) VALUES (?, 'user', ?, 'rw', 0, ?, ?, ?)",
                [(room_id, user, 1, stamp, stamp), (room_id, other, 0, stamp, stamp)],
            )
        return common.dm_room(room_id, room_uuid, key, level_admin, entity, now), True

    async def settle_dms(self, user: str, entity: str, now: datetime) -> Settled:
        """Accept the user's rule in the waiting DMs their entity owns; clear the wait.

        A read first: drivers call this on every authentication, and almost always nothing
        waits, which must not cost SQLite's one write lock.
        """
        async with self._read() as db:
            waiting = list(
                await db.execute_fetchall(
                    "SELECT 1 FROM rooms WHERE dm_pending = ? LIMIT 1", (user,)
                )
            )
        if not waiting:
            return Settled()
        async with self._write() as db:
            rows = list(
                await db.execute_fetchall(
                    "UPDATE rooms SET dm_pending = NULL WHERE dm_pending = ?"
                    " RETURNING id, entity_owner = ? AND deleted_at IS NULL",
                    (user, entity),
                )
            )
            added = sorted(int(row[0]) for row in rows if row[1])
            if added:
                marks = ",".join("?" * len(added))
                await db.execute(
                    "UPDATE room_rules SET accepted = 1, updated_at = ?"
                    f" WHERE kind = 'user' AND subject = ? AND room_id IN ({marks})",
                    (to_micros(now), user, *added),
                )
        invited = sorted(int(row[0]) for row in rows if not row[1])
        return Settled(added=tuple(added), invited=tuple(invited))

    async def conversations(
        self, user: str, entity: str, level: int, order: str, limit: int, offset: int
    ) -> list[Conversation]:
        """One statement: the page of visible rooms, then their states."""
        common.check_page(limit, offset)
        sql = common.room_states_sql(common.conversation_page_sql(_VISIBLE_IDS, order), order)
        params = {"user": user, "entity": entity, "level": level}
        async with self._read() as db:
            rows = await db.execute_fetchall(sql, {**params, "limit": limit, "offset": offset})
        return common.conversations_from_rows(list(rows), micros_text)

    async def entries_json(self, user: str, conversations: Sequence[Conversation]) -> list[Any]:
        """Each entry's ``to_json``: SQLite keeps no list cache."""
        return [conversation.to_json() for conversation in conversations]

    async def room_states(
        self, user: str, entity: str, level: int, room_ids: Sequence[int]
    ) -> dict[int, RoomState]:
        """One statement over the given ids (passed as one JSON array) the user may read."""
        if not room_ids:
            return {}
        page = (
            f"{common.ROOM_PAGE} WHERE r.id IN (SELECT value FROM json_each(:ids))"
            f" AND r.id IN ({_VISIBLE_IDS})"
        )
        params = {"user": user, "entity": entity, "level": level, "ids": json.dumps(list(room_ids))}
        async with self._read() as db:
            rows = await db.execute_fetchall(common.room_states_sql(page, "id"), params)
        found = common.conversations_from_rows(list(rows), micros_text)
        return {c.id: c.state for c in found}


async def _rooms_and_targets(
    db: aiosqlite.Connection, rooms: Sequence[int], wanted: Sequence[tuple[int, int]]
) -> tuple[dict[int, tuple[int, int]], dict[tuple[int, int], Message]]:
    """The last seq and message count of each live room of ``rooms``, and the rows at the
    (room, seq) pairs of ``wanted``: one statement when its parameters fit in one (every call
    hops to aiosqlite's thread), else one per chunk of each."""
    heads: dict[int, tuple[int, int]] = {}
    targets: dict[tuple[int, int], Message] = {}
    pad = ", ".join(["NULL"] * (common.MSG_WIDTH - 3))
    rooms_sql = (
        "SELECT 0, id, last_seq, message_count, {pad} FROM rooms"
        " WHERE id IN ({ids}) AND deleted_at IS NULL"
    )
    targets_sql = (
        "SELECT 1, {cols} FROM t JOIN messages m ON m.room_id = t.room_id AND m.seq = t.seq"
    )
    if len(rooms) + 2 * len(wanted) <= _MAX_VARIABLES:
        statements = [(list(rooms), list(wanted))]
    else:
        statements = [(list(chunk), []) for chunk in _chunks(rooms, 1)]
        statements += [([], list(chunk)) for chunk in _chunks(wanted, 2)]
    for ids, pairs in statements:
        parts = []
        if pairs:
            parts.append(targets_sql.format(cols=common.MSG_COLS))
        if ids:
            parts.append(rooms_sql.format(pad=pad, ids=", ".join("?" * len(ids))))
        head = f"WITH t(room_id, seq) AS (VALUES {_values(len(pairs), 2)}) " if pairs else ""
        rows = await db.execute_fetchall(
            head + " UNION ALL ".join(parts), [v for pair in pairs for v in pair] + ids
        )
        for row in rows:
            if row[0] == 0:
                heads[int(row[1])] = (int(row[2]), int(row[3]))
            else:
                message = message_from_row(row, 1)
                targets[message.room_id, message.seq] = message
    return heads, targets


def _chunks(items: Sequence[_T], width: int) -> list[Sequence[_T]]:
    """``items`` in slices small enough that ``width`` parameters each fit in one statement."""
    size = max(1, _MAX_VARIABLES // width)
    return [items[start : start + size] for start in range(0, len(items), size)]


def _values(rows: int, width: int) -> str:
    """A VALUES list of ``rows`` rows of ``width`` parameters."""
    row = "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * rows)


async def _stored_client_ids(
    db: aiosqlite.Connection, batch: Sequence[NewMessage]
) -> dict[tuple[int, str, str | None], Message]:
    """The messages already stored under the batch's client_ids, by (room, emitter, client_id).

    One indexed join per chunk; ``m.client_id IS NOT NULL`` lets SQLite use the partial
    unique index on (room_id, emitter, client_id).
    """
    keys = [(new.room_id, new.emitter, new.client_id) for new in batch if new.client_id is not None]
    stored: dict[tuple[int, str, str | None], Message] = {}
    for chunk in _chunks(keys, 3):
        rows = await db.execute_fetchall(
            f"WITH k(room_id, emitter, client_id) AS (VALUES {_values(len(chunk), 3)})"
            f" SELECT {common.MSG_COLS} FROM k JOIN messages m ON m.room_id = k.room_id"
            " AND m.emitter = k.emitter AND m.client_id = k.client_id"
            " WHERE m.client_id IS NOT NULL",
            [value for key in chunk for value in key],
        )
        for row in rows:
            message = message_from_row(row)
            stored[message.room_id, message.emitter, message.client_id] = message
    return stored


async def _take_seqs(
    db: aiosqlite.Connection, wanted: Mapping[int, int], latest: Mapping[int, int]
) -> dict[int, tuple[int, int]]:
    """Reserve ``wanted[room]`` seqs and message ordinals in each live room, stamping its
    last activity with ``latest[room]`` (micros) unless it is already later; its last seq and
    message count before them, by room.

    Rooms absent or deleted are left out (and keep their last_seq).
    """
    bases: dict[int, tuple[int, int]] = {}
    triples = [(room_id, n, latest[room_id]) for room_id, n in wanted.items()]
    for chunk in _chunks(triples, 3):
        rows = await db.execute_fetchall(
            "UPDATE rooms SET last_seq = last_seq + c.column2,"
            " message_count = message_count + c.column2,"
            " last_activity_at = max(coalesce(last_activity_at, c.column3), c.column3)"
            f" FROM (VALUES {_values(len(chunk), 3)}) AS c"
            " WHERE rooms.id = c.column1 AND rooms.deleted_at IS NULL"
            " RETURNING id, last_seq, message_count",
            [value for triple in chunk for value in triple],
        )
        for row in rows:
            n = wanted[int(row[0])]
            bases[int(row[0])] = (int(row[1]) - n, int(row[2]) - n)
    return bases


# The room row's copy of its latest message (schema.sql migration 7), read back in the write
# transaction that changed it, by one probe of the unique (room_id, seq) index per room the
# batch wrote: at the seq of the room's newest new message (``c.column2``), or, with none,
# at the seq of the copy (a change of that message is in the row by then). Never a walk from
# the top of the room's events down to its latest message: after edits and deletes that
# walk steps over their rows (measured: a delete's store CPU from 48 to 88 us).
_COPY_LATEST_SQL = (
    f"UPDATE rooms SET ({', '.join('latest_' + f for f in common.LATEST_FIELDS)}) = ("
    f"SELECT {', '.join(common.latest_values_sql('m'))}"
    " FROM messages m WHERE m.room_id = rooms.id"
    " AND m.seq = coalesce(c.column2, rooms.latest_seq))"
    " FROM (VALUES {values}) AS c"
    " WHERE rooms.id = c.column1 AND coalesce(c.column2, rooms.latest_seq) IS NOT NULL"
)


async def _copy_latest(db: aiosqlite.Connection, newest: Mapping[int, int | None]) -> None:
    """Set the latest-message copy of the rooms ``newest`` names, each at the seq of its
    newest new message (None: the room's copy is read again at its own seq)."""
    pairs = list(newest.items())
    for chunk in _chunks(pairs, 2):
        await db.execute(
            _COPY_LATEST_SQL.format(values=_values(len(chunk), 2)),
            [value for pair in chunk for value in pair],
        )


async def _insert_messages(
    db: aiosqlite.Connection, rows: Sequence[tuple[NewMessage, int, int, int]]
) -> dict[tuple[int, int], int]:
    """Insert (message, seq, created_at micros, ordinal) rows; the new ids by (room_id, seq).

    RETURNING rows come in no promised order, hence the (room_id, seq) key.
    """
    ids: dict[tuple[int, int], int] = {}
    for chunk in _chunks(rows, 9):
        returned = await db.execute_fetchall(
            "INSERT INTO messages (room_id, seq, emitter, entity, content, client_id,"
            f" created_at, system, ordinal) VALUES {_values(len(chunk), 9)}"
            " RETURNING room_id, seq, id",
            [
                value
                for new, seq, stamp, ordinal in chunk
                for value in (
                    new.room_id,
                    seq,
                    new.emitter,
                    new.entity,
                    new.content,
                    new.client_id,
                    stamp,
                    int(new.system),
                    ordinal,
                )
            ],
        )
        ids.update(((int(row[0]), int(row[1])), int(row[2])) for row in returned)
    return ids


def _micros_or_none(value: datetime | None) -> int | None:
    return None if value is None else to_micros(value)


async def _worker_finished(db: aiosqlite.Connection) -> None:
    """Wait (at most a second) for the worker thread of a connection that failed to open.

    aiosqlite stops the thread without awaiting it; if the event loop closed first, the thread
    would then fail posting its result to the closed loop.
    """
    thread = getattr(db, "_thread", None)
    if thread is not None and thread.is_alive():
        await asyncio.to_thread(thread.join, 1.0)


async def _rollback_quietly(db: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open; the original error matters more than this one."""
    with contextlib.suppress(Exception):
        if db.in_transaction:
            await db.execute("ROLLBACK")
