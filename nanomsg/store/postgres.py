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
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg

from nanomsg.models import ROOM_TYPES, RULE_KINDS, Message, Room, RoomAccess, Rule
from nanomsg.store.base import (
    HistoryQuery,
    NewMessage,
    NewRoom,
    RoomGone,
    StoreUnavailable,
    TooManyRules,
)
from nanomsg.store.migrate import load_migrations, postgres_schema_path

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

_ROOM_COLS = (
    "r.id, r.uuid, r.name, r.level_admin, r.type, r.entity_owner, r.max_entity_rules, "
    "r.last_seq, r.created_at, r.updated_at, r.deleted_at"
)
_ROOM_WIDTH = 11
_RULE_COLS = (
    "rr.room_id, rr.subject, rr.kind, rr.permissions, rr.level, rr.accepted, "
    "rr.created_at, rr.updated_at"
)
_RULE_WIDTH = 8
_MSG_COLS = "m.id, m.room_id, m.seq, m.emitter, m.entity, m.content, m.created_at, m.client_id"

# One round trip whatever the case. ``existing`` finds a message already stored under this
# client_id; only when there is none does ``bumped`` take the room's next seq, whose row lock
# serialises concurrent senders so seqs have no gaps; ``inserted`` stores the message.
# The final SELECT yields the new row (created = true), the existing one (false), or nothing
# when the room is absent or deleted.
_APPEND_SQL = """
WITH existing AS (
    SELECT m.id, m.seq, m.entity, m.content, m.created_at FROM messages m
    WHERE $5::text IS NOT NULL AND m.room_id = $1 AND m.emitter = $2 AND m.client_id = $5::text
), bumped AS (
    UPDATE rooms SET last_seq = last_seq + 1
    WHERE id = $1 AND deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING last_seq
), inserted AS (
    INSERT INTO messages (room_id, seq, emitter, entity, content, client_id, created_at)
    SELECT $1, bumped.last_seq, $2, $3, $4, $5::text, $6 FROM bumped
    RETURNING id, seq, entity, content, created_at
)
SELECT id, seq, entity, content, created_at, TRUE AS created FROM inserted
UNION ALL
SELECT id, seq, entity, content, created_at, FALSE AS created FROM existing
"""

Row = Sequence[Any]


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


def _aware(dt: datetime) -> datetime:
    """The same instant in UTC; naive datetimes are rejected (their zone is unknown)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got {dt!r}")
    return dt.astimezone(UTC)


def _room(row: Row) -> Room:
    return Room(
        id=int(row[0]),
        uuid=str(row[1]),
        name=str(row[2]),
        level_admin=int(row[3]),
        type=str(row[4]),
        entity_owner=str(row[5]),
        max_entity_rules=int(row[6]),
        last_seq=int(row[7]),
        created_at=row[8],
        updated_at=row[9],
        deleted_at=row[10],
    )


def _rule(row: Row) -> Rule:
    return Rule(
        room_id=int(row[0]),
        subject=str(row[1]),
        kind=str(row[2]),
        permissions=str(row[3]),
        level=int(row[4]),
        accepted=bool(row[5]),
        created_at=row[6],
        updated_at=row[7],
    )


def _message(row: Row) -> Message:
    return Message(
        id=int(row[0]),
        room_id=int(row[1]),
        seq=int(row[2]),
        emitter=str(row[3]),
        entity=str(row[4]),
        content=str(row[5]),
        created_at=row[6],
        client_id=row[7],
    )


def _affected(status: Any) -> int:
    """Rows touched according to a command status such as ``UPDATE 1``."""
    return int(str(status).rsplit(" ", 1)[-1])


def _check_page(limit: int, offset: int = 0) -> None:
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit}, {offset}")


def _check_kind(kind: str) -> None:
    if kind not in RULE_KINDS:
        raise ValueError(f"rule kind must be one of {RULE_KINDS}, got {kind!r}")


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
        if new.type not in ROOM_TYPES:
            raise ValueError(f"room type must be one of {ROOM_TYPES}, got {new.type!r}")
        now = _aware(new.now)
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
            rules = [(room_id, "user", new.creator_user, "rwa", new.creator_level, True, now)]
            if new.type == "group":
                rules.append((room_id, "entity", new.entity_owner, "rw", 100, True, now))
            await conn.executemany(
                "INSERT INTO room_rules (room_id, kind, subject, permissions, level, accepted,"
                " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                rules,
            )
        return Room(
            id=room_id,
            uuid=room_uuid,
            name=new.name,
            level_admin=new.level_admin,
            type=new.type,
            entity_owner=new.entity_owner,
            max_entity_rules=new.max_entity_rules,
            last_seq=0,
            created_at=now,
            updated_at=now,
        )

    async def room_access(self, room_id: int) -> RoomAccess | None:
        """The live room and all its rules in one LEFT JOIN query."""
        rows = await self._fetch(
            f"SELECT {_ROOM_COLS}, {_RULE_COLS} FROM rooms r"
            " LEFT JOIN room_rules rr ON rr.room_id = r.id"
            # COLLATE "C": byte order, the same as SQLite's, so both backends agree.
            ' WHERE r.id = $1 AND r.deleted_at IS NULL ORDER BY rr.kind, rr.subject COLLATE "C"',
            room_id,
        )
        if not rows:
            return None
        rules = tuple(
            _rule(tuple(row)[_ROOM_WIDTH:]) for row in rows if row[_ROOM_WIDTH] is not None
        )
        return RoomAccess(room=_room(rows[0]), rules=rules)

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
                _aware(now),
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
        _check_page(limit, offset)
        rows = await self._fetch(
            f"SELECT {_ROOM_COLS} FROM rooms r WHERE r.deleted_at IS NULL AND r.id IN ("
            " SELECT id FROM rooms"
            "  WHERE entity_owner = $2 AND level_admin <= $3 AND deleted_at IS NULL"
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
        return [_room(row) for row in rows]

    # -- rules -------------------------------------------------------------------------------
    async def rules_of(
        self, user: str, entity: str, level: int, accepted: bool | None, limit: int, offset: int
    ) -> list[tuple[Rule, Room]]:
        """The caller's user rules and entity rules at or below ``level`` in live rooms."""
        _check_page(limit, offset)
        rows = await self._fetch(
            f"SELECT {_RULE_COLS}, {_ROOM_COLS} FROM room_rules rr"
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
        return [(_rule(tuple(row)[:_RULE_WIDTH]), _room(tuple(row)[_RULE_WIDTH:])) for row in rows]

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
        _check_kind(kind)
        now = _aware(now)
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
            _check_kind(kind)
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
        _check_kind(kind)
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE room_rules rr SET accepted = $4, updated_at = $5 FROM rooms r"
                " WHERE r.id = rr.room_id AND r.deleted_at IS NULL"
                " AND rr.room_id = $1 AND rr.kind = $2 AND rr.subject = $3"
                f" RETURNING {_RULE_COLS}",
                room_id,
                kind,
                subject,
                accepted,
                _aware(now),
            )
        return None if row is None else _rule(row)

    # -- messages ----------------------------------------------------------------------------
    async def append_message(self, new: NewMessage) -> tuple[Message, bool]:
        """Store the message with the room's next seq in one statement (see _APPEND_SQL)."""
        now = _aware(new.now)
        args = (new.room_id, new.emitter, new.entity, new.content, new.client_id, now)
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_APPEND_SQL, *args)
            except asyncpg.UniqueViolationError:
                # A concurrent send with the same client_id committed first (we waited on the
                # room lock, then collided); our statement, seq bump included, was rolled back.
                if new.client_id is None:
                    raise
                row = await conn.fetchrow(
                    "SELECT id, seq, entity, content, created_at, FALSE AS created"
                    " FROM messages WHERE room_id = $1 AND emitter = $2 AND client_id = $3",
                    new.room_id,
                    new.emitter,
                    new.client_id,
                )
                if row is None:
                    raise
        if row is None:
            raise RoomGone(new.room_id)
        message = Message(
            id=int(row["id"]),
            room_id=new.room_id,
            seq=int(row["seq"]),
            emitter=new.emitter,
            entity=str(row["entity"]),
            content=str(row["content"]),
            created_at=row["created_at"],
            client_id=new.client_id,
        )
        return message, bool(row["created"])

    async def history(self, query: HistoryQuery) -> list[Message]:
        """Walk the (room_id, seq) index from the requested end, return oldest first."""
        _check_page(query.limit)
        conditions = ["m.room_id = $1"]
        args: list[Any] = [query.room_id]

        def add(condition: str, value: Any) -> None:
            args.append(value)
            conditions.append(condition.replace("?", f"${len(args)}"))

        # Only the bounds given make it into the SQL, so the planner sees a plain index range.
        if query.before is not None:
            add("m.seq < ?", query.before)
        if query.after is not None:
            add("m.seq > ?", query.after)
        if query.date_from is not None:
            add("m.created_at >= ?", _aware(query.date_from))
        if query.date_to is not None:
            add("m.created_at <= ?", _aware(query.date_to))
        args.append(query.limit)
        order = "DESC" if query.newest else "ASC"
        rows = await self._fetch(
            f"SELECT {_MSG_COLS} FROM messages m WHERE {' AND '.join(conditions)}"
            f" ORDER BY m.seq {order} LIMIT ${len(args)}",
            *args,
        )
        messages = [_message(row) for row in rows]
        if query.newest:
            messages.reverse()
        return messages
