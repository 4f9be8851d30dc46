"""PostgreSQL backend: an asyncpg pool, for multi-node deployments.

Every call has a deadline (pool acquire timeout plus the pool's ``command_timeout``), and every
connection-level failure surfaces as StoreUnavailable. The pool replaces dead connections on
its own, so the store recovers without help once PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg

from nanomsg.models import Conversation, Message, ReadMark, Room, RoomAccess, RoomState, Rule
from nanomsg.store import common
from nanomsg.store.base import (
    ContentRefused,
    HistoryQuery,
    NewMessage,
    NewRoom,
    RoomChanges,
    RoomGone,
    Settled,
    StoreUnavailable,
    TooManyRules,
)
from nanomsg.store.migrate import load_migrations, postgres_schema_path

# The ids of the live rooms a caller may read (``rooms_visible_to`` explains the two
# branches), with named parameters :user, :entity, :level (see ``common.numbered``).
_VISIBLE_IDS = (
    "SELECT id FROM rooms"
    " WHERE entity_owner = :entity AND level_admin <= :level AND deleted_at IS NULL"
    " AND dm_key IS NULL"
    " UNION SELECT room_id FROM room_rules"
    " WHERE subject IN (:user, :entity) AND accepted"
    " AND ((kind = 'user' AND subject = :user)"
    "  OR (kind = 'entity' AND subject = :entity AND level <= :level))"
    " GROUP BY room_id"
    " HAVING bool_or(strpos(permissions, 'r') > 0 OR strpos(permissions, 'a') > 0)"
    " AND NOT bool_or(strpos(permissions, 'b') > 0)"
)
_RETURNED_MSG = common.MSG_COLS.replace("m.", "")

log = logging.getLogger(__name__)

# pg_advisory_lock key serialising migrations across nodes: "nanomsg" + version byte 1.
MIGRATION_LOCK_KEY = 0x6E616E6F6D736701

# Errors meaning "the database cannot be used now", as opposed to a bug in a query.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # a command_timeout or acquire deadline passed (asyncio.TimeoutError)
    asyncpg.InterfaceError,  # connection already closed, and similar client-side states
    asyncpg.PostgresConnectionError,  # class 08, and ConnectionDoesNotExistError (lost mid-call)
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # pointed at a standby after failover
    # Raised instead of a connection error when the server ends the session while the
    # connection is idle in the pool (asyncpg issue #1069); the connection is unusable.
    asyncpg.exceptions.InternalClientError,
)

# The subset meaning a pooled connection went stale; a fresh one may well work.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InternalClientError,
)

# One statement, so one round trip with its commit (an implicit transaction): either the
# whole batch is stored or nothing is. Inputs arrive as parallel arrays; ``ord`` is the
# 1-based position in them. ``existing`` finds messages already stored under an input's
# client_id; the other inputs are ``fresh`` and numbered per room in batch order. ``locked``
# takes the row locks of their live rooms in id order, so concurrent batches from several
# server processes queue instead of deadlocking, and the UPDATE (which can only touch rows
# ``locked`` has already emitted) hands each room ``n`` consecutive seqs after ``base`` (and
# ``n`` consecutive message ordinals after ``counted``, see schema.sql migration 5). NO KEY
# UPDATE is the lock the UPDATE takes anyway; unlike FOR UPDATE it does not block foreign-key
# checks. ``= ANY (ARRAY (...))`` keeps the lookup on the primary key whatever the estimates.
# Rooms absent or deleted are missing from ``bumped``: their inputs get no row back.
# INSERT ... RETURNING cannot return ``ord``, so rows are matched back by (room_id, seq).
_APPEND_BATCH_SQL = """
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::timestamptz[], $7::boolean[]) WITH ORDINALITY
        AS t(room_id, emitter, entity, content, client_id, created_at, system, ord)
), existing AS (
    SELECT i.ord, m.id, m.seq, m.entity, m.content, m.created_at, m.system
    FROM input i JOIN messages m
        ON m.room_id = i.room_id AND m.emitter = i.emitter AND m.client_id = i.client_id
    WHERE i.client_id IS NOT NULL  -- no index probe for the (usual) sends without one
), fresh AS (
    SELECT i.*, row_number() OVER (PARTITION BY i.room_id ORDER BY i.ord) AS n
    FROM input i WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE e.ord = i.ord)
), wanted AS (
    SELECT room_id, count(*) AS n, max(created_at) AS at FROM fresh GROUP BY room_id
), locked AS MATERIALIZED (
    SELECT r.id FROM rooms r
    WHERE r.id = ANY (ARRAY (SELECT room_id FROM wanted)) AND r.deleted_at IS NULL
    ORDER BY r.id FOR NO KEY UPDATE
), bumped AS (
    UPDATE rooms r SET last_seq = r.last_seq + w.n, message_count = r.message_count + w.n,
        last_activity_at = greatest(r.last_activity_at, w.at)
    FROM locked l JOIN wanted w ON w.room_id = l.id
    WHERE r.id = l.id AND r.deleted_at IS NULL
    RETURNING r.id, r.last_seq - w.n AS base, r.message_count - w.n AS counted
), planned AS (
    SELECT f.ord, f.room_id, b.base + f.n AS seq, f.emitter, f.entity, f.content,
           f.client_id, f.created_at, f.system, b.counted + f.n AS ordinal
    FROM fresh f JOIN bumped b ON b.id = f.room_id
), inserted AS (
    INSERT INTO messages (room_id, seq, emitter, entity, content, client_id, created_at, system,
                          ordinal)
    SELECT room_id, seq, emitter, entity, content, client_id, created_at, system, ordinal
    FROM planned
    RETURNING id, room_id, seq
)
SELECT p.ord, ins.id, p.seq, p.entity, p.content, p.created_at, p.system, TRUE AS created
FROM planned p JOIN inserted ins ON ins.room_id = p.room_id AND ins.seq = p.seq
UNION ALL
SELECT ord, id, seq, entity, content, created_at, system, FALSE AS created FROM existing
"""

# Tries of the batch statement when it collided with a concurrent writer (it was rolled back
# as a whole, so trying again is safe).
_BATCH_TRIES = 3


def redact(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))


def _timestamptz(value: datetime) -> datetime:
    """A timestamptz as read: asyncpg already decodes it as an aware UTC datetime."""
    return value


def _stamp_text(column: str) -> str:
    """The SQL writing a timestamptz column as a ``Conversation`` holds it: UTC, ISO 8601
    with microseconds, whatever the session's TimeZone and DateStyle. PostgreSQL writes it in
    ~0.45 us (1.7 ms for the 4 000 stamps of 1 000 rooms); decoding a binary timestamptz into a
    datetime and formatting that for JSON took ~1.4 us in the server."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"


def _placeholder(n: int) -> str:
    """PostgreSQL's numbered placeholder for the nth parameter."""
    return f"${n}"


def _affected(status: Any) -> int:
    """Rows touched according to a command status such as ``UPDATE 1``."""
    return int(str(status).rsplit(" ", 1)[-1])


class PostgresStore:
    """The Store protocol on PostgreSQL through an asyncpg pool of ``pool_size`` connections."""

    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        *,
        command_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        migration_lock_timeout: float = 60.0,
    ) -> None:
        self._url = url
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._migration_lock_timeout = migration_lock_timeout
        self._pool: Any = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Apply pending migrations, then start the pool; StoreUnavailable if PG is unreachable."""
        if self._pool is not None:
            return
        where = redact(self._url)
        try:
            await self._migrate()
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            # At startup any failure to reach the database (bad credentials or database name
            # included) means this store cannot serve; say where and why.
            raise StoreUnavailable(f"cannot prepare PostgreSQL at {where}: {exc!r}") from exc
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._command_timeout,
                timeout=self._connect_timeout,
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {where}: {exc!r}") from exc

    async def _migrate(self) -> None:
        """Apply pending schema.sql versions on one connection holding the advisory lock.

        Nodes starting together queue on the lock; each then reads schema_migrations and finds
        nothing left to do. Each version commits in its own transaction with its record.
        """
        migrations = load_migrations(postgres_schema_path())
        conn = await asyncpg.connect(
            self._url, timeout=self._connect_timeout, command_timeout=self._command_timeout
        )
        try:
            await conn.execute(
                "SELECT pg_advisory_lock($1)",
                MIGRATION_LOCK_KEY,
                timeout=self._migration_lock_timeout,
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)"
            )
            applied = {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    # Metadata only, so the database's own clock is fine here.
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES ($1, $2, now())",
                        migration.version,
                        migration.name,
                    )
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        finally:
            # Closing the session also releases the lock if the unlock above never ran.
            try:
                await asyncio.wait_for(conn.close(), self._connect_timeout)
            except Exception:
                conn.terminate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._command_timeout)
        except Exception:
            pool.terminate()

    async def ping(self) -> bool:
        """True when a pooled connection answers ``SELECT 1`` now."""
        try:
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; connection-level failures become StoreUnavailable."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"PostgreSQL store {redact(self._url)} is not open")
        try:
            conn = await pool.acquire(timeout=self._connect_timeout + 1.0)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        try:
            try:
                yield conn
            except _CONNECTION_LOST:
                # Never hand a possibly broken connection back: asyncpg may otherwise
                # return it to the pool in a bad protocol state. The pool reconnects.
                # Not on timeouts: there asyncpg cancels the statement server-side, whereas
                # dropping the socket would leave it running (and maybe committing).
                conn.terminate()
                raise
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        finally:
            # Handing the connection back runs a reset query. If the connection dies there,
            # the work above is already done (committed): reporting it as unavailable would
            # tell a sender "not stored" about a stored message. asyncpg closes it anyway.
            try:
                await pool.release(conn)
            except _UNAVAILABLE as exc:
                log.warning("PostgreSQL connection lost while returning it to the pool: %r", exc)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """Run a read; retried once when a pooled connection turns out to be dead.

        After a PostgreSQL restart the pool may still hold broken connections; a read is safe
        to repeat, and the pool hands out a fresh connection on the second try.
        """
        for attempt in (1, 2):
            try:
                async with self._connection() as conn:
                    return list(await conn.fetch(sql, *args))
            except StoreUnavailable as exc:
                if attempt == 2 or not isinstance(exc.__cause__, _CONNECTION_LOST):
                    raise
        raise AssertionError("unreachable")

    # -- rooms -------------------------------------------------------------------------------
    async def create_room(self, new: NewRoom) -> Room:
        """Insert the room (uuid4 made here) and its creator rules in one transaction."""
        common.check_room_type(new.type)
        now = common.utc(new.now)
        room_uuid = str(uuid4())
        async with self._connection() as conn, conn.transaction():
            room_id = int(
                await conn.fetchval(
                    "INSERT INTO rooms (uuid, name, level_admin, type, entity_owner,"
                    " max_entity_rules, last_seq, created_at, updated_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7) RETURNING id",
                    room_uuid,
                    new.name,
                    new.level_admin,
                    new.type,
                    new.entity_owner,
                    new.max_entity_rules,
                    now,
                )
            )
            await conn.executemany(
                "INSERT INTO room_rules (room_id, kind, subject, permissions, level, accepted,"
                " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                [(room_id, *rule, True, now) for rule in common.creator_rules(new)],
            )
        return common.created_room(new, room_id, room_uuid, now)

    async def update_room(self, room_id: int, changes: RoomChanges, now: datetime) -> Room:
        """Lock the room as ``put_rule`` does, count its rules, check the new limit, update."""
        async with self._connection() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT id FROM rooms WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
                room_id,
            )
            if locked is None:
                raise RoomGone(room_id)
            count = await conn.fetchval(
                "SELECT count(*) FROM room_rules WHERE room_id = $1", room_id
            )
            common.check_changes(room_id, changes, int(count))
            row = await conn.fetchrow(
                "UPDATE rooms r SET name = coalesce($2, r.name),"
                " level_admin = coalesce($3, r.level_admin),"
                " max_entity_rules = coalesce($4, r.max_entity_rules), updated_at = $5"
                f" WHERE r.id = $1 RETURNING {common.ROOM_COLS}",
                room_id,
                changes.name,
                changes.level_admin,
                changes.max_entity_rules,
                common.utc(now),
            )
        return common.room_from_row(row, _timestamptz)

    async def room_access(self, room_id: int) -> RoomAccess | None:
        """The live room and all its rules in one LEFT JOIN query."""
        rows = await self._fetch(
            f"SELECT {common.ROOM_COLS}, {common.RULE_COLS} FROM rooms r"
            " LEFT JOIN room_rules rr ON rr.room_id = r.id"
            # COLLATE "C": byte order, the same as SQLite's, so both backends agree.
            ' WHERE r.id = $1 AND r.deleted_at IS NULL ORDER BY rr.kind, rr.subject COLLATE "C"',
            room_id,
        )
        return common.room_access_from_rows(rows, _timestamptz)

    async def room_heads(self, room_ids: Sequence[int]) -> dict[int, int]:
        """Each existing room's last_seq, by primary key lookups in one statement."""
        if not room_ids:
            return {}
        rows = await self._fetch(
            "SELECT id, last_seq FROM rooms WHERE id = ANY($1::bigint[])", list(room_ids)
        )
        return {int(row[0]): int(row[1]) for row in rows}

    async def delete_room(self, room_id: int, now: datetime) -> bool:
        """Soft-delete: set deleted_at; messages and rules stay."""
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE rooms SET deleted_at = $2, updated_at = $2"
                " WHERE id = $1 AND deleted_at IS NULL",
                room_id,
                common.utc(now),
            )
        return _affected(status) == 1

    async def rooms_visible_to(
        self, user: str, entity: str, level: int, limit: int, offset: int
    ) -> list[Room]:
        """Live rooms the caller may read (``permissions.evaluate``), by id, paged in SQL.

        A UNION of two indexed lookups rather than one OR, so each branch uses its index: rooms
        where the caller is an owner-entity admin (no rule can ban them), and rooms whose
        applying accepted rules, grouped per room, hold ``r`` or ``a`` and no ``b``.
        """
        common.check_page(limit, offset)
        rows = await self._fetch(
            f"SELECT {common.ROOM_COLS} FROM rooms r WHERE r.deleted_at IS NULL AND r.id IN ("
            " SELECT id FROM rooms"
            "  WHERE entity_owner = $2 AND level_admin <= $3 AND deleted_at IS NULL"
            "  AND dm_key IS NULL"
            " UNION SELECT room_id FROM room_rules"
            "  WHERE subject IN ($1, $2) AND accepted"
            "  AND ((kind = 'user' AND subject = $1)"
            "   OR (kind = 'entity' AND subject = $2 AND level <= $3))"
            "  GROUP BY room_id"
            "  HAVING bool_or(strpos(permissions, 'r') > 0 OR strpos(permissions, 'a') > 0)"
            "  AND NOT bool_or(strpos(permissions, 'b') > 0)"
            ") ORDER BY r.id LIMIT $4 OFFSET $5",
            user,
            entity,
            level,
            limit,
            offset,
        )
        return [common.room_from_row(row, _timestamptz) for row in rows]

    # -- rules -------------------------------------------------------------------------------
    async def rules_of(
        self, user: str, entity: str, level: int, accepted: bool | None, limit: int, offset: int
    ) -> list[tuple[Rule, Room]]:
        """The caller's user rules and entity rules at or below ``level`` in live rooms."""
        common.check_page(limit, offset)
        rows = await self._fetch(
            f"SELECT {common.RULE_COLS}, {common.ROOM_COLS} FROM room_rules rr"
            " JOIN rooms r ON r.id = rr.room_id WHERE r.deleted_at IS NULL"
            " AND ((rr.kind = 'user' AND rr.subject = $1)"
            "  OR (rr.kind = 'entity' AND rr.subject = $2 AND rr.level <= $3))"
            " AND ($4::boolean IS NULL OR rr.accepted = $4::boolean)"
            ' ORDER BY rr.room_id, rr.kind, rr.subject COLLATE "C" LIMIT $5 OFFSET $6',
            user,
            entity,
            level,
            accepted,
            limit,
            offset,
        )
        return [common.rule_and_room_from_row(row, _timestamptz) for row in rows]

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
        """Create or update one rule, enforcing max_entity_rules under the room's row lock."""
        common.check_kind(kind)
        now = common.utc(now)
        async with self._connection() as conn, conn.transaction():
            # Lock first, count in a later statement: under READ COMMITTED the later statement
            # gets a fresh snapshot that includes rules committed by the previous lock holder.
            # NO KEY UPDATE serialises rule writers without blocking foreign-key checks.
            max_rules = await conn.fetchval(
                "SELECT max_entity_rules FROM rooms WHERE id = $1 AND deleted_at IS NULL"
                " FOR NO KEY UPDATE",
                room_id,
            )
            if max_rules is None:
                raise RoomGone(room_id)
            stats = await conn.fetchrow(
                "SELECT count(*) AS n,"
                " max(created_at) FILTER (WHERE kind = $2 AND subject = $3) AS existing"
                " FROM room_rules WHERE room_id = $1",
                room_id,
                kind,
                subject,
            )
            created_at: datetime = stats["existing"] or now
            created = stats["existing"] is None
            if created:
                if stats["n"] >= max_rules:
                    raise TooManyRules(
                        f"room {room_id} already holds {stats['n']} of {max_rules} rules"
                    )
                await conn.execute(
                    "INSERT INTO room_rules (room_id, kind, subject, permissions, level,"
                    " accepted, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                    room_id,
                    kind,
                    subject,
                    permissions,
                    level,
                    accepted,
                    now,
                )
            else:
                await conn.execute(
                    "UPDATE room_rules SET permissions = $4, level = $5, accepted = $6,"
                    " updated_at = $7 WHERE room_id = $1 AND kind = $2 AND subject = $3",
                    room_id,
                    kind,
                    subject,
                    permissions,
                    level,
                    accepted,
                    now,
                )
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
        if kind is not None:
            common.check_kind(kind)
        async with self._connection() as conn:
            status = await conn.execute(
                "DELETE FROM room_rules WHERE room_id = $1 AND subject = $2"
                " AND ($3::text IS NULL OR kind = $3::text)",
                room_id,
                subject,
                kind,
            )
        return _affected(status) > 0

    async def set_accepted(
        self, room_id: int, subject: str, kind: str, accepted: bool, now: datetime
    ) -> Rule | None:
        """Flip ``accepted`` on one rule of a live room."""
        common.check_kind(kind)
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE room_rules rr SET accepted = $4, updated_at = $5 FROM rooms r"
                " WHERE r.id = rr.room_id AND r.deleted_at IS NULL"
                " AND rr.room_id = $1 AND rr.kind = $2 AND rr.subject = $3"
                f" RETURNING {common.RULE_COLS}",
                room_id,
                kind,
                subject,
                accepted,
                common.utc(now),
            )
        return None if row is None else common.rule_from_row(row, _timestamptz)

    # -- messages ----------------------------------------------------------------------------
    async def append_message(self, new: NewMessage) -> tuple[Message, bool]:
        """Store one message: a batch of one (see _APPEND_BATCH_SQL), RoomGone raised."""
        return common.sole_outcome(await self.append_batch([new]))

    async def append_batch(self, batch: Sequence[NewMessage]) -> list[common.Outcome]:
        """Store the batch in one statement (see _APPEND_BATCH_SQL), hence one round trip.

        Repeated client_ids are dropped here, before sending, so the statement never inserts
        the same key twice; the copies get the first one's outcome.
        """
        stamps = [common.utc(new.now) for new in batch]  # rejects naive timestamps up front
        firsts, sent = common.first_copies(batch)
        if not sent:
            return []
        columns = (
            [batch[index].room_id for index in sent],
            [batch[index].emitter for index in sent],
            [batch[index].entity for index in sent],
            [batch[index].content for index in sent],
            [batch[index].client_id for index in sent],
            [stamps[index] for index in sent],
            [batch[index].system for index in sent],
        )
        rows = await self._run_batch(columns)
        by_ord = {int(row["ord"]): row for row in rows}
        outcomes: dict[int, common.Outcome] = {}  # by batch index, for the first copies
        for position, index in enumerate(sent, start=1):  # ``ord`` is the position in ``sent``
            new = batch[index]
            row = by_ord.get(position)
            if row is None:
                outcomes[index] = RoomGone(new.room_id)
                continue
            message = Message(
                id=int(row["id"]),
                room_id=new.room_id,
                seq=int(row["seq"]),
                emitter=new.emitter,
                entity=str(row["entity"]),
                content=str(row["content"]),
                created_at=row["created_at"],
                client_id=new.client_id,
                system=bool(row["system"]),
            )
            outcomes[index] = (message, bool(row["created"]))
        return common.with_copies(outcomes, firsts)

    async def _run_batch(self, columns: tuple[list[Any], ...]) -> list[Any]:
        """Run _APPEND_BATCH_SQL, again when it collided with a concurrent writer.

        A batch elsewhere may commit one of our client_ids while we wait on a room lock (our
        snapshot predates it, so ``existing`` missed it and the INSERT hits the unique index);
        the next try sees it. Deadlocks should not happen (rooms are locked in id order) but
        would be just as safe to retry: PostgreSQL rolled the whole statement back.
        """
        async with self._connection() as conn:
            for attempt in range(1, _BATCH_TRIES + 1):
                try:
                    return list(await conn.fetch(_APPEND_BATCH_SQL, *columns))
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name != "messages_client_id_idx":
                        raise  # (room_id, seq) cannot collide under the room locks: a bug
                    if attempt == _BATCH_TRIES:
                        raise StoreUnavailable(
                            f"batch kept colliding with concurrent writers: {exc!r}"
                        ) from exc
                except asyncpg.DataError as exc:
                    # Class 22: a value PostgreSQL will not store (U+0000 in text, text that
                    # is not encodable). The statement was rolled back as a whole.
                    raise ContentRefused(type(exc).__name__) from exc
                except asyncpg.DeadlockDetectedError as exc:
                    if attempt == _BATCH_TRIES:
                        raise StoreUnavailable(f"batch kept deadlocking: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def history(self, query: HistoryQuery) -> list[Message]:
        """Walk the (room_id, seq) index from the requested end, return oldest first."""
        sql, args = common.history_sql(query, common.utc, _placeholder)
        rows = await self._fetch(sql, *args)
        return common.history_messages(rows, query, _timestamptz)

    async def events(self, query: HistoryQuery) -> list[Message]:
        """Every event in the range, by the same index walk as ``history``."""
        sql, args = common.history_sql(query, common.utc, _placeholder, events=True)
        rows = await self._fetch(sql, *args)
        return common.history_messages(rows, query, _timestamptz)

    async def edit_message(
        self, room_id: int, seq: int, author: str, content: str, now: datetime
    ) -> tuple[Message, Message]:
        """The edit row and the message's new state, under the room's row lock."""
        return await self._change(room_id, seq, author, False, now, "edit", content, None)

    async def delete_message(
        self, room_id: int, seq: int, by: str, is_admin: bool, now: datetime, entity: str = ""
    ) -> tuple[Message, Message]:
        """The delete row and the tombstone, under the room's row lock."""
        return await self._change(room_id, seq, by, is_admin, now, "delete", "", entity)

    async def _change(
        self,
        room_id: int,
        seq: int,
        actor: str,
        admin: bool,
        now: datetime,
        kind: str,
        content: str,
        entity: str | None,
    ) -> tuple[Message, Message]:
        """Lock the room row (the lock ``append_batch`` takes), then check the target, take the
        next seq, insert the event and update the target in one statement: one transaction, so
        two deletes of one message queue and the second finds it deleted.

        Four round trips (BEGIN, lock, change, COMMIT). The lock is a statement of its own so
        that the change's snapshot, taken after the lock is granted, sees every event committed
        before (all writers of a room's rows take its lock). The change writes nothing unless
        the target passes the check ``common.check_target`` makes; when it does not, the
        target is read again (still under the lock) and that check names the refusal."""
        common.check_seq(seq)
        stamp = common.utc(now)
        if kind == "edit":
            change = (
                "first_content = coalesce(first_content, content), content = $7, edited_at = $5"
            )
        else:
            change = "deleted_at = $5, deleted_by = $3"
        statement = (
            "WITH target AS ("
            "  SELECT entity FROM messages WHERE room_id = $1 AND seq = $2 AND kind = 'message'"
            "  AND deleted_at IS NULL AND (emitter = $3 OR $4::boolean)"
            "), bump AS ("
            "  UPDATE rooms SET last_seq = last_seq + 1,"
            "  last_activity_at = greatest(last_activity_at, $5)"
            "  WHERE id = $1 AND EXISTS (SELECT 1 FROM target) RETURNING last_seq"
            "), event AS ("
            "  INSERT INTO messages (room_id, seq, emitter, entity, content, created_at, kind,"
            "  target_seq) SELECT $1, bump.last_seq, $3, coalesce($6, target.entity), $7, $5, $8,"
            f"  $2 FROM bump, target RETURNING {_RETURNED_MSG}"
            "), changed AS ("
            f"  UPDATE messages SET {change} WHERE room_id = $1 AND seq = $2"
            f"  AND EXISTS (SELECT 1 FROM bump) RETURNING {_RETURNED_MSG}"
            ")"
            " SELECT 0 AS part, * FROM event UNION ALL SELECT 1 AS part, * FROM changed"
            " ORDER BY part"
        )
        try:
            async with self._connection() as conn, conn.transaction():
                locked = await conn.fetchval(
                    "SELECT id FROM rooms WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
                    room_id,
                )
                if locked is None:
                    raise RoomGone(room_id)
                rows = await conn.fetch(
                    statement, room_id, seq, actor, admin, stamp, entity, content, kind
                )
                if len(rows) != 2:
                    target = await conn.fetchrow(
                        "SELECT kind, emitter, deleted_at, entity FROM messages"
                        " WHERE room_id = $1 AND seq = $2",
                        room_id,
                        seq,
                    )
                    common.check_target(room_id, seq, target, actor, admin=admin)
                    raise RuntimeError(f"change of room {room_id} seq {seq} wrote nothing")
                inserted, changed = rows[0][1:], rows[1][1:]
        except asyncpg.DataError as exc:
            raise ContentRefused(type(exc).__name__) from exc
        return (
            common.message_from_row(inserted, _timestamptz),
            common.message_from_row(changed, _timestamptz),
        )

    # -- read marks --------------------------------------------------------------------------
    async def set_read_mark(self, room_id: int, user: str, seq: int, now: datetime) -> int:
        """One upsert: max(held, least(seq, last_seq)) for a live room, with the ordinal of
        the latest message at or before the mark (a backward probe of the (room_id, seq)
        index), which the conversation list subtracts from the room's message count."""
        common.check_seq(seq)
        async with self._connection() as conn:
            held = await conn.fetchval(
                "INSERT INTO room_reads (room_id, user_uuid, seq, updated_at, ordinal)"
                " SELECT r.id, $2, c.seq, $4, coalesce((SELECT m.ordinal FROM messages m"
                "  WHERE m.room_id = r.id AND m.seq <= c.seq AND m.kind = 'message'"
                "  ORDER BY m.seq DESC LIMIT 1), 0)"
                " FROM rooms r CROSS JOIN LATERAL (SELECT least($3::bigint, r.last_seq) AS seq) c"
                " WHERE r.id = $1 AND r.deleted_at IS NULL"
                " ON CONFLICT (room_id, user_uuid) DO UPDATE"
                " SET seq = greatest(room_reads.seq, excluded.seq),"
                " ordinal = CASE WHEN excluded.seq > room_reads.seq"
                "  THEN excluded.ordinal ELSE room_reads.ordinal END,"
                " updated_at = CASE WHEN excluded.seq > room_reads.seq"
                "  THEN excluded.updated_at ELSE room_reads.updated_at END"
                " RETURNING seq",
                room_id,
                user,
                seq,
                common.utc(now),
            )
        if held is None:
            raise RoomGone(room_id)
        return int(held)

    async def read_marks(self, room_id: int) -> list[ReadMark]:
        rows = await self._fetch(
            "SELECT room_id, user_uuid, seq, updated_at FROM room_reads"
            ' WHERE room_id = $1 ORDER BY user_uuid COLLATE "C"',
            room_id,
        )
        return [ReadMark(int(r[0]), str(r[1]), int(r[2]), r[3]) for r in rows]

    # -- direct messages and the conversation list -------------------------------------------
    async def open_dm(
        self, user: str, entity: str, other: str, level_admin: int, now: datetime
    ) -> tuple[Room, bool]:
        """INSERT ... ON CONFLICT DO NOTHING on the unique ``dm_key``: a concurrent caller
        waits on the index entry until the first commits, then reads the committed room."""
        key = common.dm_key(user, other)
        stamp = common.utc(now)
        room_uuid = str(uuid4())
        async with self._connection() as conn, conn.transaction():
            room_id = await conn.fetchval(
                "INSERT INTO rooms (uuid, name, level_admin, type, entity_owner,"
                " max_entity_rules, last_seq, created_at, updated_at, dm_key, dm_pending)"
                " VALUES ($1, $2, $3, 'user2user', $4, $5, 0, $6, $6, $2, $7)"
                " ON CONFLICT (dm_key) WHERE dm_key IS NOT NULL DO NOTHING RETURNING id",
                room_uuid,
                key,
                level_admin,
                entity,
                common.DM_MAX_RULES,
                stamp,
                other,
            )
            if room_id is not None:
                await conn.executemany(
                    "INSERT INTO room_rules (room_id, kind, subject, permissions, level,"
                    " accepted, created_at, updated_at) VALUES ($1, 'user', $2, 'rw', 0, $3,"
                    " $4, $4)",
                    [(room_id, user, True, stamp), (room_id, other, False, stamp)],
                )
                return (
                    common.dm_room(int(room_id), room_uuid, key, level_admin, entity, now),
                    True,
                )
            row = await conn.fetchrow(
                f"SELECT {common.ROOM_COLS} FROM rooms r WHERE r.dm_key = $1", key
            )
            room = common.room_from_row(row, _timestamptz)
            if room.deleted_at is not None:
                raise RoomGone(room.id)
            await conn.execute(
                "UPDATE room_rules SET accepted = true, updated_at = $3"
                " WHERE room_id = $1 AND kind = 'user' AND subject = $2 AND NOT accepted",
                room.id,
                user,
                stamp,
            )
            await conn.execute(
                "UPDATE rooms SET dm_pending = NULL WHERE id = $1 AND dm_pending = $2",
                room.id,
                user,
            )
        return room, False

    async def settle_dms(self, user: str, entity: str, now: datetime) -> Settled:
        """One statement: clear the wait and accept the rules where the entity owns the DM."""
        rows = await self._fetch(
            "WITH settled AS (UPDATE rooms SET dm_pending = NULL WHERE dm_pending = $1"
            "  RETURNING id, entity_owner = $2 AND deleted_at IS NULL AS same),"
            " accepted AS (UPDATE room_rules SET accepted = true, updated_at = $3"
            "  WHERE kind = 'user' AND subject = $1"
            "  AND room_id IN (SELECT id FROM settled WHERE same) RETURNING room_id)"
            " SELECT id, same FROM settled ORDER BY id",
            user,
            entity,
            common.utc(now),
        )
        return Settled(
            added=tuple(int(r[0]) for r in rows if r[1]),
            invited=tuple(int(r[0]) for r in rows if not r[1]),
        )

    async def conversations(
        self, user: str, entity: str, level: int, order: str, limit: int, offset: int
    ) -> list[Conversation]:
        """One statement: the page of visible rooms, then their states."""
        common.check_page(limit, offset)
        sql, args = common.numbered(
            common.room_states_sql(
                common.conversation_page_sql(_VISIBLE_IDS, order),
                order,
                lateral=True,
                stamp_text=_stamp_text,
            ),
            {"user": user, "entity": entity, "level": level, "limit": limit, "offset": offset},
        )
        return common.conversations_from_rows(await self._fetch(sql, *args), None)

    async def room_states(
        self, user: str, entity: str, level: int, room_ids: Sequence[int]
    ) -> dict[int, RoomState]:
        """One statement over the given ids the user may read."""
        if not room_ids:
            return {}
        page = f"{common.ROOM_PAGE} WHERE r.id = ANY(:ids::bigint[]) AND r.id IN ({_VISIBLE_IDS})"
        sql, args = common.numbered(
            common.room_states_sql(page, "id", lateral=True, stamp_text=_stamp_text),
            {"user": user, "entity": entity, "level": level, "ids": list(room_ids)},
        )
        found = common.conversations_from_rows(await self._fetch(sql, *args), None)
        return {c.id: c.state for c in found}
